"""The window cache: bounded memory, exact decays without drift, prefill, padding, growth."""

import pytest
import torch

from gatedfwa.ops import use_backend
from gatedfwa.ops.decode import WindowCache, WindowLayerCache, decode_gated_window_attention
from gatedfwa.ops.window_attention.naive import naive_gated_window_attention
from gatedfwa.testing import max_abs_error


def random_step(batch, length, q_heads, kv_heads, head_dim, gated=True):
    q = torch.randn(batch, length, q_heads, head_dim)
    k = torch.randn(batch, length, kv_heads, head_dim)
    v = torch.randn(batch, length, kv_heads, head_dim)
    g = -torch.rand(batch, length, q_heads) if gated else None
    return q, k, v, g


def snapshot(cache):
    return {name: (tuple(t.shape), t.numel() * t.element_size()) for name, t in cache.tensors().items()}


@pytest.mark.parametrize("length", [1, 3])
def test_generating_ten_windows_keeps_every_tensor_size(length):
    window = 4
    cache = WindowLayerCache(window)
    _, k, v, g = random_step(2, 6, 4, 2, 16)
    cache.prefill(k, v, g)
    cache.extra_state["shift_k"] = torch.zeros(2, 2, 16)
    before, bytes_before = snapshot(cache), cache.memory_bytes()
    for _ in range(10 * window // length + 1):
        decode_gated_window_attention(*random_step(2, length, 4, 2, 16), cache)
        assert snapshot(cache) == before
    assert cache.memory_bytes() == bytes_before
    assert cache.seen_tokens > 6 + 10 * window
    assert cache.keys.shape == (2, 2, window, 16) and cache.decays.shape == (2, 4, window)


def test_decays_do_not_drift():
    """After many steps every decay equals the float64 sum of the gates after its token
    (at most w - 1 of them). A global float32 running sum U would be off by ~|U| * 6e-8."""
    window, steps, heads = 8, 6000, 2
    cache = WindowLayerCache(window)
    cache.allocate(1, heads, heads, 4, torch.float32, "cpu", gated=True)
    gates = -(torch.rand(steps, heads, dtype=torch.float64) * 0.5 + 0.25)
    zeros = torch.zeros(1, 1, heads, 4)
    for t in range(steps):
        cache.append(zeros, zeros, gates[t].float().view(1, 1, heads))
    latest = steps - 1
    for slot in range(window):
        token = cache.positions[0, slot].item()
        assert latest - window < token <= latest
        exact = gates[token + 1 :].sum(0)  # float64
        assert torch.allclose(cache.decays[0, :, slot].double(), exact, rtol=1e-6, atol=1e-6)
    assert cache.decays.min().item() >= -0.75 * (window - 1) - 1e-4
    # The global-cumsum alternative at this length is measurably off: the check above can fail.
    running = gates.float().cumsum(0)
    global_error = ((running[-1] - running[latest - window + 1]).double() - gates[latest - window + 2 :].sum(0)).abs()
    assert global_error.max().item() > 1e-5


def test_prefill_keeps_last_window_with_local_decays():
    window = 5
    _, k, v, g = random_step(2, 13, 4, 2, 8)
    cache = WindowLayerCache(window)
    cache.prefill(k, v, g)
    assert cache.seen_tokens == 13 and cache.slots_in_use == window
    for slot in range(window):
        token = cache.positions[0, slot].item()
        assert token % window == slot and 13 - window <= token < 13
        assert torch.equal(cache.keys[:, :, slot], k[:, token])
        assert torch.equal(cache.values[:, :, slot], v[:, token])
        exact = g[:, token + 1 :].double().sum(1)
        assert torch.allclose(cache.decays[:, :, slot].double(), exact, atol=1e-6)
    assert cache.token_counts.tolist() == [13, 13]


def test_prefill_with_left_padding_marks_padding_invalid():
    _, k, v, g = random_step(2, 6, 2, 2, 8)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    cache = WindowLayerCache(4)
    cache.prefill(k, v, g, attention_mask=mask)
    # Tokens 2..5 are kept; row 0's token 2 is padding.
    assert sorted(cache.positions[0].tolist()) == [-1, 3, 4, 5]
    assert sorted(cache.positions[1].tolist()) == [2, 3, 4, 5]
    assert cache.token_counts.tolist() == [3, 6]
    with pytest.raises(ValueError, match="left-padded"):
        WindowLayerCache(4).prefill(k, v, g, attention_mask=mask.flip(1))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        WindowLayerCache(4).prefill(k, v, g, attention_mask=mask[:, :3])


def test_unbounded_cache_grows_and_stays_exact():
    """window None ("full" / "forgetting"): capacity doubles as needed, outputs stay exact."""
    q, k, v, g = random_step(1, 21, 2, 1, 8)
    cache = WindowLayerCache(None)
    cache.allocate(1, 1, 2, 8, torch.float32, "cpu", gated=True, capacity=2)
    with use_backend("torch"):
        outs = [decode_gated_window_attention(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], g[:, t : t + 1],
                                              cache) for t in range(21)]
    assert cache.capacity == 32 and cache.slots_in_use == 21
    ref, _ = naive_gated_window_attention(q.double(), k.double(), v.double(), g.double(), None)
    assert max_abs_error(torch.cat(outs, 1), ref) < 1e-5


def test_reset_reorder_and_errors():
    _, k, v, g = random_step(3, 5, 2, 2, 8)
    cache = WindowLayerCache(4)
    cache.prefill(k, v, g)
    with pytest.raises(ValueError, match="empty cache"):
        cache.prefill(k, v, g)
    cache.extra_state["shift_v"] = torch.arange(3.0)[:, None, None].expand(3, 2, 8).clone()
    keys_before = cache.keys.clone()
    cache.reorder(torch.tensor([2, 0]))
    assert cache.batch_size == 2 and cache.extra_state["shift_v"][:, 0, 0].tolist() == [2.0, 0.0]
    assert torch.equal(cache.keys, keys_before[[2, 0]])
    cache.reset()
    assert cache.seen_tokens == 0 and not cache.extra_state and (cache.positions == -1).all()
    cache.prefill(k[:2], v[:2], g[:2])  # reusable after reset
    with pytest.raises(ValueError, match="window_size"):
        WindowLayerCache(0)
    with pytest.raises(TypeError, match="window_size"):
        WindowLayerCache(2.5)


def test_window_cache_container():
    model_cache = WindowCache([4, None, 4])
    assert len(model_cache) == 3 and model_cache[1].window_size is None
    for layer in model_cache:
        _, k, v, g = random_step(1, 3, 2, 2, 8)
        layer.prefill(k, v, g)
    assert model_cache.get_seq_length() == 3
    assert model_cache.memory_bytes() == sum(layer.memory_bytes() for layer in model_cache)
    model_cache.reorder_cache(torch.tensor([0, 0]))
    assert all(layer.batch_size == 2 for layer in model_cache)
    model_cache.reset()
    assert model_cache.get_seq_length() == 0
    assert WindowCache.uniform(2, 8)[1].window_size == 8


@pytest.mark.parametrize("window", [None, 1, 4, 5])
def test_append_in_chunks_equals_prefill_of_the_whole_stream(window):
    """append writes runs of consecutive slots (two where the ring wraps, the last W tokens
    of a chunk longer than the ring); prefill writes through one index tensor. After the
    same stream both hold the same tokens in the same slots."""
    _, k, v, g = random_step(2, 23, 4, 2, 8)
    chunks = [3, 1, 1, 6, 2, 1, 1, 5, 1]  # after a 2-token prompt: 23 tokens in all
    appended = WindowLayerCache(window)
    appended.prefill(k[:, :2], v[:, :2], g[:, :2])
    start = 2
    for n in chunks:
        appended.append(k[:, start:start + n], v[:, start:start + n], g[:, start:start + n])
        start += n
    assert start == 23
    whole = WindowLayerCache(window)
    whole.prefill(k, v, g)
    used = whole.slots_in_use
    assert appended.slots_in_use == used and appended.seen_tokens == 23
    assert torch.equal(appended.positions[:, :used], whole.positions[:, :used])
    assert torch.equal(appended.keys[:, :, :used], whole.keys[:, :, :used])
    assert torch.equal(appended.values[:, :, :used], whole.values[:, :, :used])
    # Same decays up to float32 rounding (summed in a different order).
    torch.testing.assert_close(appended.decays[:, :, :used], whole.decays[:, :, :used], rtol=1e-5, atol=1e-5)
    assert appended.token_counts.tolist() == [23, 23]
