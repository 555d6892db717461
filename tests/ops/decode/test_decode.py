"""Decoding against the window cache equals the parallel op at every position.

Step-by-step outputs (L = 1 and chunks of L = 3, after a prefill or from an empty cache)
are checked against the naive float64 reference with the rule of docs/correctness.md, and against
the parallel op (gated_window_attention, torch backend). The Triton kernel (interpreted on
the CPU) is checked against the PyTorch decode path, split-K included.
"""

import pytest
import torch

from gatedfwa import gated_window_attention
from gatedfwa.ops.backend import use_backend
from gatedfwa.ops.decode import MAX_DECODE_LENGTH, WindowLayerCache, decode_gated_window_attention
from gatedfwa.ops.decode import kernels as decode_kernels
from gatedfwa.ops.decode import launch as decode_launch
from gatedfwa.ops.decode.kernels import decode_attention_triton
from gatedfwa.ops.decode.launch import decode_config
from gatedfwa.ops.decode.naive import naive_decoded_outputs
from gatedfwa.ops.decode.torch_path import decode_attention_torch
from gatedfwa.testing import assert_within_rule, max_abs_error


def decode_all(q, k, v, g, window, prompt, chunk):
    """Prefill the first `prompt` tokens, then decode the rest `chunk` tokens at a time.
    Returns the decoded outputs [B, T - prompt, HQ, D] and the cache."""
    cache = WindowLayerCache(window)
    if prompt:
        cache.prefill(k[:, :prompt], v[:, :prompt], None if g is None else g[:, :prompt], num_q_heads=q.shape[2])
    outs = []
    t = prompt
    while t < q.shape[1]:
        sl = slice(t, min(t + chunk, q.shape[1]))
        outs.append(decode_gated_window_attention(q[:, sl], k[:, sl], v[:, sl], None if g is None else g[:, sl], cache))
        t = sl.stop
    return torch.cat(outs, dim=1), cache


CASES = [
    # (q_heads, kv_heads, head_dim, window, gated)
    (4, 2, 24, 6, True),
    (4, 2, 24, 6, False),
    (2, 2, 16, 5, True),
    (6, 2, 20, None, True),  # unbounded cache ("forgetting")
    (4, 1, 16, None, False),  # unbounded, no gate ("full"), MQA
]


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"hq{c[0]}-h{c[1]}-d{c[2]}-w{c[3]}-{'gate' if c[4] else 'nogate'}")
@use_backend("torch")
def test_torch_decode_matches_parallel(case, chunk, make_inputs):
    q_heads, kv_heads, head_dim, window, gated = case
    w_eff = window or 6
    seqlen = 3 * w_eff + 5  # T > 3w: the ring wraps several times
    q, k, v, g = make_inputs(2, seqlen, q_heads, kv_heads, head_dim, torch.float32, gated)
    ref64 = naive_decoded_outputs(q.double(), k.double(), v.double(), None if g is None else g.double(), window)
    naive32 = naive_decoded_outputs(q, k, v, g, window)
    parallel = gated_window_attention(q, k, v, g, window_size=window)
    for prompt in (0, w_eff + 2):  # from an empty cache, and after a prefill that wrapped
        out, _ = decode_all(q, k, v, g, window, prompt, chunk)
        assert_within_rule(f"decode prompt={prompt}", out, naive32[:, prompt:], ref64[:, prompt:])
        assert max_abs_error(out, parallel[:, prompt:]) < 1e-5


@use_backend("torch")
def test_torch_decode_bf16(make_inputs):
    q, k, v, g = make_inputs(2, 20, 4, 2, 32, torch.bfloat16, True)
    ref64 = naive_decoded_outputs(q.double(), k.double(), v.double(), g.double(), 5, first=7)
    naive16 = naive_decoded_outputs(q, k, v, g, 5, first=7)
    out, _ = decode_all(q, k, v, g, 5, 7, 2)
    assert out.dtype == torch.bfloat16
    assert_within_rule("bf16 decode", out, naive16, ref64)


@use_backend("torch")
def test_window_one_sees_only_itself(make_inputs):
    q, k, v, g = make_inputs(1, 9, 2, 1, 16, torch.float32, True)
    out, cache = decode_all(q, k, v, g, 1, 4, 3)
    assert torch.allclose(out, v[:, 4:].expand(-1, -1, 2, -1), atol=1e-6)
    assert cache.capacity == 1


@use_backend("torch")
def test_extreme_gates(make_inputs):
    """Gates as low as -1e4: cached keys get weight 0, never NaN."""
    q, k, v, g = make_inputs(1, 16, 2, 2, 16, torch.float32, True, gate_scale=1e4)
    ref64 = naive_decoded_outputs(q.double(), k.double(), v.double(), g.double(), 4, first=5)
    out, _ = decode_all(q, k, v, g, 4, 5, 1)
    assert torch.isfinite(out).all()
    assert max_abs_error(out, ref64) < 1e-5


# --------------------------------------------------------------------------------------
# Triton kernel (interpreted on the CPU) against the PyTorch decode path
# --------------------------------------------------------------------------------------


@pytest.fixture
def filled_cache(make_inputs):
    """filled_cache(batch, q_heads, kv_heads, head_dim, window, gated, tokens, dtype=float32,
    device="cpu") -> a WindowLayerCache prefilled with `tokens` random tokens."""

    def fill(batch, q_heads, kv_heads, head_dim, window, gated, tokens, dtype=torch.float32, device="cpu"):
        _, k, v, g = make_inputs(batch, tokens, q_heads, kv_heads, head_dim, dtype, gated, device=device)
        cache = WindowLayerCache(window)
        cache.prefill(k, v, g, num_q_heads=q_heads)
        return cache

    return fill


@pytest.mark.parametrize(
    "batch, q_heads, kv_heads, head_dim, window, gated, length, splits, dtype",
    [
        (2, 4, 2, 24, 20, True, 1, 1, torch.float32),
        (2, 4, 2, 24, 40, True, 3, 3, torch.float32),  # split-K over the slots, merged in the kernel
        (1, 4, 2, 24, 40, True, 1, 3, torch.float32),  # batch 1
        (1, 32, 8, 32, 40, True, 1, 3, torch.float32),  # batch 1, the benchmark's heads
        (2, 8, 1, 16, 40, False, 2, 2, torch.float32),  # MQA, no gate
        (2, 20, 1, 16, 12, True, 5, 1, torch.float32),  # 100 rows: two row blocks of 64
        (2, 20, 1, 16, 40, True, 5, 2, torch.float32),  # two row blocks and two splits
        (1, 20, 1, 16, 40, True, 5, 3, torch.float32),  # batch 1, two row blocks, three splits
        (1, 2, 2, 32, 40, True, 1, 2, torch.float32),  # one row per kv head: partials of one row
        (1, 16, 1, 128, 40, True, 4, 3, torch.float32),  # 64 rows x 128: the merge takes one split a round
        (2, 4, 4, 32, None, True, 2, 2, torch.float32),  # unbounded cache
        (2, 4, 2, 32, 40, True, 1, 2, torch.bfloat16),
        (2, 2, 1, 100, 40, True, 2, 2, torch.float32),  # head dim not a power of two
        (2, 2, 2, 256, 20, True, 1, 1, torch.bfloat16),  # largest head dim
    ],
)
def test_triton_kernel_matches_torch(batch, q_heads, kv_heads, head_dim, window, gated, length, splits, dtype, device,
                                     make_inputs, filled_cache, decode_launches):
    cache = filled_cache(batch, q_heads, kv_heads, head_dim, window, gated, tokens=37, dtype=dtype, device=device)
    q, k_new, v_new, g_new = make_inputs(batch, length, q_heads, kv_heads, head_dim, dtype, gated, device=device)
    scale = head_dim**-0.5
    expected = decode_attention_torch(q, k_new, v_new, g_new, cache, scale)
    decays_before = None if cache.decays is None else cache.decays.clone()
    # 16-slot tiles: the 37 cached tokens span 3 tiles (16, 16, 5), enough for 3 splits.
    got = decode_attention_triton(q, k_new, v_new, g_new, cache, scale, update_decays=True,
                                  num_splits=splits, block_n=16)
    assert len(decode_launches.grids) == 1 and decode_launches.most_splits == splits  # one launch, the splits asked
    assert not cache.split_counters.any()  # left at zero for the next step
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert max_abs_error(got, expected) < tol
    if gated:
        # The kernel added the step's total gate to every used slot's decay, exactly once.
        used = cache.slots_in_use
        shifted = decays_before[:, :, :used] + g_new.float().cumsum(1)[:, -1, :, None]
        assert torch.allclose(cache.decays[:, :, :used], shifted, atol=1e-6)


def test_decode_config_balances_splits(monkeypatch):
    """The split count is a function of the shapes and the SM count: at batch 1 it balances
    each split's stream against the merge's read of every split's partial, it fills the GPU
    at larger batch, and a batch that fills it alone is not split."""
    monkeypatch.setattr(decode_launch, "streaming_multiprocessors", lambda device: 132)

    def splits(batch, length=1, used=4096, element_size=2):
        return decode_config(batch, 8, 4, length, 128, used, torch.device("cpu"), element_size)["num_splits"]

    assert splits(1) == 32  # sqrt(4096 slots * 528 bytes / 2064 partial bytes)
    assert splits(1, used=1024) == 16
    assert splits(1, length=4) == 16  # 16 rows: partials 4x larger
    assert splits(1, element_size=4) == 45  # float32 keys and values: more bytes per slot
    assert splits(1, used=40) == 1  # a split holds at least one tile of 64 slots
    assert splits(8) == 9  # ceil(4 * 132 / 64 programs)
    assert splits(64) == 2  # 512 programs: the ceiling of 528 / 512
    assert splits(128) == 1


@pytest.mark.parametrize("batch, length", [(1, 1), (2, 3)])
def test_split_merge_in_several_rounds(monkeypatch, batch, length, device, make_inputs, filled_cache, decode_launches):
    """Eight splits, one tile of 16 slots each (the last one holds 8), merged two splits per
    round: the online log-sum-exp over the rounds equals the PyTorch path."""
    cache = filled_cache(batch, 4, 2, 16, 128, True, tokens=120, device=device)
    q, k_new, v_new, g_new = make_inputs(batch, length, 4, 2, 16, torch.float32, True, device=device, gate_scale=3.0)
    scale = 16**-0.5
    expected = decode_attention_torch(q, k_new, v_new, g_new, cache, scale)
    rows = min(16, 1 << (length * 2 - 1).bit_length())  # the kernel's partial rows per split
    monkeypatch.setattr(decode_kernels, "MERGE_TILE_ELEMENTS", 2 * rows * 16)
    got = decode_attention_triton(q, k_new, v_new, g_new, cache, scale, num_splits=8, block_n=16)
    assert decode_launches.most_splits == 8
    assert max_abs_error(got, expected) < 1e-5
    assert not cache.split_counters.any()


def test_split_counters_must_fit(make_inputs, filled_cache):
    cache = filled_cache(1, 4, 2, 16, 40, True, tokens=37)
    q, k_new, v_new, g_new = make_inputs(1, 1, 4, 2, 16, torch.float32, True)
    with pytest.raises(ValueError, match="split_counters must be int32"):
        decode_kernels.launch_decode(q, k_new, v_new, g_new, cache.keys, cache.values, cache.decays, cache.positions,
                                     cache.split_counters[:, :2], None, 37, 37, 40, 0.25, num_splits=2, block_n=16)
    q, k_new, v_new, g_new = make_inputs(1, 20, 4, 2, 16, torch.float32, True)
    with pytest.raises(ValueError, match="block_m=16 cuts the 40 rows into 3 row blocks"):
        decode_attention_triton(q, k_new, v_new, g_new, cache, 0.25, num_splits=2, block_n=16, block_m=16)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("chunk", [1, 3])
def test_triton_decode_step_by_step(chunk, batch, splits, device, make_inputs, force_splits, decode_launches):
    """The dispatched op on the Triton backend equals the torch backend at every step, cache
    state included, with the slots split (up to 3 tiles of 16 slots: the used slots grow from
    30 to the 40 of the window, so the split count and the last split's length change)."""
    force_splits(splits)
    q, k, v, g = make_inputs(batch, 48, 4, 2, 24, torch.float32, True, device=device)
    with use_backend("torch"):
        expected, cache_torch = decode_all(q, k, v, g, 40, 30, chunk)
    with use_backend("triton"):
        got, cache_triton = decode_all(q, k, v, g, 40, 30, chunk)
    assert decode_launches.most_splits == splits
    assert max_abs_error(got, expected) < 1e-5
    for name, tensor in cache_torch.tensors().items():
        assert torch.allclose(cache_triton.tensors()[name].double(), tensor.double(), atol=1e-5), name
    assert not cache_triton.split_counters.any()


# --------------------------------------------------------------------------------------
# Left padding
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, window, splits", [("torch", 6, 1), ("triton", 6, 1), ("triton", 40, 3)])
def test_left_padded_rows_match_rows_alone(backend, window, splits, device, make_inputs, force_splits,
                                           decode_launches):
    """A batch of prompts of different lengths, left-padded, decodes each row exactly as
    that row alone would (padding slots are never attended, even before they leave the ring),
    also with the slots split: then whole splits of one row see only padding."""
    force_splits(splits)
    with use_backend(backend):
        new_tokens = 7
        lengths = [9, 4] if window == 6 else [36, 5]
        longest = max(lengths)
        q, k, v, g = make_inputs(len(lengths), longest + new_tokens, 4, 2, 16, torch.float32, True, device=device)
        mask = torch.zeros(len(lengths), longest, dtype=torch.long, device=device)
        for row, n in enumerate(lengths):
            mask[row, longest - n:] = 1
            # Garbage (NaN) in the padding must not leak anywhere.
            k[row, : longest - n] = float("nan")
            v[row, : longest - n] = float("nan")
            g[row, : longest - n] = float("nan")
        cache = WindowLayerCache(window)
        cache.prefill(k[:, :longest], v[:, :longest], g[:, :longest], attention_mask=mask)
        batched = []
        for t in range(longest, longest + new_tokens, 2):
            sl = slice(t, min(t + 2, longest + new_tokens))
            batched.append(decode_gated_window_attention(q[:, sl], k[:, sl], v[:, sl], g[:, sl], cache))
        batched = torch.cat(batched, dim=1)
        assert cache.token_counts.tolist() == [n + new_tokens for n in lengths]
        for row, n in enumerate(lengths):
            alone = slice(longest - n, None)
            sub = [x[row : row + 1, alone] for x in (q, k, v, g)]
            out, _ = decode_all(*sub, window, n, 2)
            assert max_abs_error(batched[row : row + 1], out) < 1e-5
    assert decode_launches.most_splits == (splits if backend == "triton" else 0)


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def test_validation_errors(make_inputs, filled_cache):
    cache = filled_cache(2, 4, 2, 16, 8, True, tokens=5)
    q, k, v, g = make_inputs(2, 1, 4, 2, 16, torch.float32, True)
    with pytest.raises(TypeError, match="cache"):
        decode_gated_window_attention(q, k, v, g, object())
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        decode_gated_window_attention(q[0], k, v, g, cache)
    long = MAX_DECODE_LENGTH + 1
    with pytest.raises(ValueError, match="new tokens"):
        decode_gated_window_attention(*make_inputs(2, long, 4, 2, 16, torch.float32, True), cache)
    with pytest.raises(ValueError, match="k_new must have shape"):
        decode_gated_window_attention(q, k[:, :, :1], v[:, :, :1], g, cache)
    with pytest.raises(ValueError, match="k_new must have shape"):
        decode_gated_window_attention(q[:1], k[:1], v[:1], g[:1], cache)
    with pytest.raises(ValueError, match="k_new and v_new must have the same shape"):
        decode_gated_window_attention(q, k, v[..., :8], g, cache)
    with pytest.raises(TypeError, match="dtype"):
        decode_gated_window_attention(q.half(), k.half(), v.half(), g, cache)
    with pytest.raises(TypeError, match="q must be float16"):
        decode_gated_window_attention(q.double(), k, v, g, cache)
    with pytest.raises(ValueError, match="g_new is required"):
        decode_gated_window_attention(q, k, v, None, cache)
    with pytest.raises(ValueError, match="g_new must have shape"):
        decode_gated_window_attention(q, k, v, g[..., :2], cache)
    with pytest.raises(ValueError, match="query heads"):
        decode_gated_window_attention(q[:, :, :2], k, v, g[..., :2], cache)
    with pytest.raises(ValueError, match="scale"):
        decode_gated_window_attention(q, k, v, g, cache, scale=float("nan"))
    ungated = filled_cache(2, 4, 2, 16, 8, False, tokens=5)
    with pytest.raises(ValueError, match="g_new must be None"):
        decode_gated_window_attention(q, k, v, g, ungated)
    # Nothing above touched the cache.
    assert cache.seen_tokens == 5
