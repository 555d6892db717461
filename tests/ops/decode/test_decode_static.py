"""The static (graph-capturable) decode step and chunked prefill.

* decode_static_step, step by step after a prefill, against the float64 naive reference
  (docs/correctness.md) and against the host-position decode op, PyTorch and Triton
  (interpreted) paths; the split-window kernel with splits that hold only empty slots, at
  batch 1 and 2, and a split step replayed on the same state (as a CUDA graph replays it);
* no tensor of the static cache changes shape or address, and a compiled step
  (fullgraph) does not recompile as the position advances;
* chunked prefill (prefill_chunk) against the naive reference;
* errors: a layer without window beyond max_length, decoding an empty cache.
"""

import pytest
import torch

from gatedfwa.ops.backend import use_backend
from gatedfwa.ops.decode import StaticWindowLayerCache, WindowLayerCache, decode_gated_window_attention, decode_static_step
from gatedfwa.ops.decode.chunked import attend_chunk, prefill_chunk
from gatedfwa.ops.decode.kernels import launch_decode
from gatedfwa.ops.decode.naive import naive_decoded_outputs
from gatedfwa.ops.decode.torch_path import decode_attention_torch
from gatedfwa.testing import assert_within_rule, max_abs_error


def static_decode_all(q, k, v, g, window, prompt, chunk, max_length=None):
    """Prefill `prompt` tokens into a StaticWindowLayerCache, decode the rest `chunk` at a time."""
    cache = StaticWindowLayerCache(window, max_length or q.shape[1])
    cache.prefill(k[:, :prompt], v[:, :prompt], None if g is None else g[:, :prompt], num_q_heads=q.shape[2])
    outs = []
    for start in range(prompt, q.shape[1], chunk):
        sl = slice(start, min(start + chunk, q.shape[1]))
        outs.append(decode_static_step(q[:, sl], k[:, sl], v[:, sl], None if g is None else g[:, sl], cache))
    return torch.cat(outs, dim=1), cache


CASES = [
    # (q_heads, kv_heads, head_dim, window, gated)
    (4, 2, 24, 6, True),
    (4, 2, 24, 6, False),
    (6, 2, 20, None, True),  # a layer without window: max_length slots
    (4, 1, 16, None, False),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"hq{c[0]}-h{c[1]}-d{c[2]}-w{c[3]}-{'gate' if c[4] else 'nogate'}")
def test_static_step_matches_reference(case, chunk, backend, device, make_inputs):
    q_heads, kv_heads, head_dim, window, gated = case
    seqlen = 3 * (window or 6) + 4  # the ring wraps several times
    q, k, v, g = make_inputs(2, seqlen, q_heads, kv_heads, head_dim, torch.float32, gated, device=device)
    prompt = 5
    ref64 = naive_decoded_outputs(q.double(), k.double(), v.double(), None if g is None else g.double(), window, prompt)
    naive32 = naive_decoded_outputs(q, k, v, g, window, prompt)
    with use_backend(backend):
        out, cache = static_decode_all(q, k, v, g, window, prompt, chunk)
    assert_within_rule(f"static decode ({backend})", out, naive32, ref64)
    assert int(cache.next_position) == seqlen
    assert cache.token_counts.tolist() == [seqlen, seqlen]
    # The same cache state as the host-position decode op.
    host = WindowLayerCache(window)
    host.prefill(k[:, :prompt], v[:, :prompt], None if g is None else g[:, :prompt], num_q_heads=q_heads)
    with use_backend(backend):
        for start in range(prompt, seqlen, chunk):
            sl = slice(start, min(start + chunk, seqlen))
            decode_gated_window_attention(q[:, sl], k[:, sl], v[:, sl], None if g is None else g[:, sl], host)
    used = host.slots_in_use
    slot_views = {"keys": lambda c: c.keys[:, :, :used], "values": lambda c: c.values[:, :, :used],
                  "decays": lambda c: c.decays[:, :, :used], "positions": lambda c: c.positions[:, :used]}
    for name, view in slot_views.items():
        if getattr(host, name) is not None:
            assert torch.allclose(view(cache).double(), view(host).double(), atol=1e-5), name


@pytest.mark.parametrize("gated", [True, False])
def test_split_kernel_with_empty_splits(gated, device, make_inputs):
    """Four splits over 64 slots of which 5 hold tokens: three splits see only empty slots
    (maximum -inf, sum 0) and the log-sum-exp combine must ignore them."""
    batch, q_heads, kv_heads, head_dim = 1, 8, 2, 32
    _, k, v, g = make_inputs(batch, 5, q_heads, kv_heads, head_dim, torch.float32, gated, device=device)
    cache = StaticWindowLayerCache(64)
    cache.prefill(k, v, g, num_q_heads=q_heads)
    q, k_new, v_new, g_new = make_inputs(batch, 1, q_heads, kv_heads, head_dim, torch.float32, gated, device=device)
    scale = head_dim**-0.5
    expected = decode_attention_torch(q, k_new, v_new, g_new, cache, scale, first_position=cache.next_position)
    got = launch_decode(q, k_new, v_new, g_new, cache.keys, cache.values, cache.decays, cache.positions,
                        cache.split_counters, cache.next_position, 0, cache.capacity, cache.window_size, scale,
                        num_splits=4, block_n=16)
    assert torch.isfinite(got).all()
    assert max_abs_error(got, expected) < 1e-5
    # And against float64 over the whole stream.
    qs = torch.cat((torch.zeros(batch, 5, q_heads, head_dim, device=device), q), 1)
    ks, vs = torch.cat((k, k_new), 1), torch.cat((v, v_new), 1)
    gs = None if g is None else torch.cat((g, g_new), 1)
    ref64 = naive_decoded_outputs(qs.double(), ks.double(), vs.double(), None if gs is None else gs.double(), 64, 5)
    naive32 = naive_decoded_outputs(qs, ks, vs, gs, 64, 5)
    assert_within_rule("split kernel", got, naive32, ref64)


@pytest.mark.parametrize("batch, chunk, gated", [(1, 1, True), (1, 3, True), (2, 3, True), (1, 1, False)])
def test_static_split_step_matches_reference(batch, chunk, gated, device, make_inputs, force_splits, decode_launches):
    """The Triton static step with its 40 slots split in 3 (16, 16, 8; empty slots at first,
    then a ring that wraps) against the float64 reference, at batch 1 and 2, L = 1 and 3."""
    force_splits(3)
    window, prompt, seqlen = 40, 20, 48
    q, k, v, g = make_inputs(batch, seqlen, 4, 2, 16, torch.float32, gated, device=device)
    ref64 = naive_decoded_outputs(q.double(), k.double(), v.double(), None if g is None else g.double(), window, prompt)
    naive32 = naive_decoded_outputs(q, k, v, g, window, prompt)
    with use_backend("triton"):
        out, cache = static_decode_all(q, k, v, g, window, prompt, chunk)
    assert decode_launches.most_splits == 3
    assert_within_rule("static split decode", out, naive32, ref64)
    assert not cache.split_counters.any()


@pytest.mark.parametrize("gated", [True, False])
def test_static_split_step_replays(gated, device, make_inputs, force_splits, decode_launches):
    """A step replayed on the same cache state (what a captured CUDA graph does) gives the
    same output both times: the split kernel leaves its counters at zero and needs nothing
    reset between the two."""
    force_splits(3)
    q, k, v, g = make_inputs(1, 31, 32, 8, 16, torch.float32, gated, device=device)
    cache = StaticWindowLayerCache(40)
    cache.prefill(k[:, :30], v[:, :30], None if g is None else g[:, :30], num_q_heads=32)
    state = {name: t.clone() for name, t in cache.tensors().items()}
    position = cache.next_position.clone()
    step = (q[:, 30:], k[:, 30:], v[:, 30:], None if g is None else g[:, 30:], cache)
    with use_backend("triton"):
        first = decode_static_step(*step)
        assert not cache.split_counters.any()
        for name, tensor in cache.tensors().items():
            tensor.copy_(state[name])
        cache.next_position.copy_(position)
        second = decode_static_step(*step)
    assert len(decode_launches.grids) == 2 and decode_launches.most_splits == 3
    assert torch.equal(first, second)
    assert not cache.split_counters.any()
    ref64 = naive_decoded_outputs(q.double(), k.double(), v.double(), None if g is None else g.double(), 40, 30)
    naive32 = naive_decoded_outputs(q, k, v, g, 40, 30)
    assert_within_rule("replayed split step", second, naive32, ref64)


def test_compiled_split_step(device, make_inputs, force_splits, decode_launches):
    """The Triton custom op with split slots inside a compiled step (fullgraph): the counters it
    mutates and restores go through functionalisation, and every step matches float64."""
    torch._dynamo.reset()
    force_splits(3)
    q, k, v, g = make_inputs(1, 36, 8, 2, 16, torch.float32, True, device=device)
    cache = StaticWindowLayerCache(40)
    cache.prefill(k[:, :32], v[:, :32], g[:, :32], num_q_heads=8)
    step = torch.compile(decode_static_step, backend="aot_eager", fullgraph=True)
    with use_backend("triton"):
        outs = [step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1], cache) for t in range(32, 36)]
    assert decode_launches.most_splits == 3
    assert not cache.split_counters.any()
    ref64 = naive_decoded_outputs(q.double(), k.double(), v.double(), g.double(), 40, 32)
    naive32 = naive_decoded_outputs(q, k, v, g, 40, 32)
    assert_within_rule("compiled split step", torch.cat(outs, 1), naive32, ref64)


@use_backend("torch")
def test_static_cache_keeps_shapes_and_addresses(make_inputs):
    window = 4
    q, k, v, g = make_inputs(2, 3 + 10 * window, 4, 2, 16, torch.float32, True)
    cache = StaticWindowLayerCache(window)
    cache.prefill(k[:, :3], v[:, :3], g[:, :3], num_q_heads=4)
    before = {name: (t.shape, t.data_ptr()) for name, t in cache.tensors().items()}
    position_ptr = cache.next_position.data_ptr()
    for t in range(3, q.shape[1]):
        decode_static_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1], cache)
    assert {name: (t.shape, t.data_ptr()) for name, t in cache.tensors().items()} == before
    assert cache.next_position.data_ptr() == position_ptr


@use_backend("torch")
def test_compiled_step_does_not_recompile(make_inputs):
    """The step compiles whole (fullgraph) and its one graph serves every position: nothing
    in it depends on a host value that changes from step to step."""
    torch._dynamo.reset()
    q, k, v, g = make_inputs(1, 20, 4, 2, 16, torch.float32, True)
    cache = StaticWindowLayerCache(5)
    cache.prefill(k[:, :4], v[:, :4], g[:, :4], num_q_heads=4)
    step = torch.compile(decode_static_step, backend="aot_eager", fullgraph=True)
    outs = [step(q[:, 4:5], k[:, 4:5], v[:, 4:5], g[:, 4:5], cache)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for t in range(5, 20):
            outs.append(step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1], cache))
    expected = naive_decoded_outputs(q.double(), k.double(), v.double(), g.double(), 5, first=4)
    assert max_abs_error(torch.cat(outs, 1), expected) < 1e-5


@pytest.mark.parametrize("window, gated", [(6, True), (6, False), (None, True)])
@pytest.mark.parametrize("static", [False, True])
@use_backend("torch")
def test_chunked_prefill_matches_reference(window, gated, static, make_inputs):
    seqlen, first, chunk = 40, 7, 9  # chunks longer than the window
    q, k, v, g = make_inputs(2, seqlen, 4, 2, 16, torch.float32, gated, gate_scale=3.0)
    ref64 = naive_decoded_outputs(q.double(), k.double(), v.double(), None if g is None else g.double(), window, first)
    naive32 = naive_decoded_outputs(q, k, v, g, window, first)
    cache = StaticWindowLayerCache(window, seqlen) if static else WindowLayerCache(window)
    cache.prefill(k[:, :first], v[:, :first], None if g is None else g[:, :first], num_q_heads=4)
    outs = []
    for start in range(first, seqlen, chunk):
        sl = slice(start, start + chunk)
        outs.append(prefill_chunk(q[:, sl], k[:, sl], v[:, sl], None if g is None else g[:, sl], cache, 16**-0.5))
    assert_within_rule("chunked prefill", torch.cat(outs, 1), naive32, ref64)
    assert cache.seen_tokens == seqlen
    if window is not None:
        assert cache.capacity == window  # O(w) cache whatever the prompt length


def test_attend_chunk_needs_the_chunk_in_the_keys(make_inputs):
    q, k, v, _ = make_inputs(1, 5, 2, 2, 16, torch.float32, False)
    with pytest.raises(ValueError, match="k must hold the chunk"):
        attend_chunk(q, k[:, :3], v[:, :3], None, 4, 0.25)


@use_backend("torch")
def test_static_errors(make_inputs):
    with pytest.raises(ValueError, match="max_length"):
        StaticWindowLayerCache(None)
    q, k, v, g = make_inputs(1, 6, 2, 2, 16, torch.float32, True)
    with pytest.raises(ValueError, match="prefill it"):
        decode_static_step(q[:, :1], k[:, :1], v[:, :1], g[:, :1], StaticWindowLayerCache(4))
    full = StaticWindowLayerCache(None, max_length=5)
    with pytest.raises(ValueError, match="max_length 5"):
        full.prefill(k, v, g, num_q_heads=2)
    full.prefill(k[:, :5], v[:, :5], g[:, :5], num_q_heads=2)
    with pytest.raises(IndexError):  # slot 5 of 5: a loud error, never a silent wrap-around
        decode_static_step(q[:, 5:], k[:, 5:], v[:, 5:], g[:, 5:], full)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: CUDA graph capture")
@pytest.mark.parametrize("window", [64, 4096])
def test_cuda_graph_replay_matches_reference(window, make_inputs):
    """The compiled step (mode reduce-overhead: CUDA graphs) with the Triton kernels, every
    position replayed from one graph, against the float64 reference."""
    torch._dynamo.reset()
    seqlen, prompt = window + 40, window - 3
    q, k, v, g = (t.cuda() if t is not None else None
                  for t in make_inputs(1, seqlen, 32, 8, 128, torch.bfloat16, True))
    cache = StaticWindowLayerCache(window)
    cache.prefill(k[:, :prompt], v[:, :prompt], g[:, :prompt], num_q_heads=32)
    step = torch.compile(decode_static_step, mode="reduce-overhead", fullgraph=True)
    outs = []
    for t in range(prompt, seqlen):
        torch.compiler.cudagraph_mark_step_begin()
        outs.append(step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1], cache).clone())
    ref64 = naive_decoded_outputs(q.double(), k.double(), v.double(), g.double(), window, prompt)
    naive16 = naive_decoded_outputs(q, k, v, g, window, prompt)
    assert_within_rule("cuda graph decode", torch.cat(outs, 1), naive16, ref64)
