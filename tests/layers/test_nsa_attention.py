"""NSAttention (the "nsa" and "nsa-gatedfwa" kinds): the parallel forward against the float64
re-implementation (the rule of docs/correctness.md), padding and packing, gradients, and
decoding with the NSALayerCache equal to the parallel forward at every position."""

import pytest
import torch

from gatedfwa.layers import NSAttention
from gatedfwa.ops.decode import WindowLayerCache
from gatedfwa.ops.nsa import NSALayerCache
from gatedfwa.testing import assert_within_rule
from tests.layers.reference import reference_attention_layer
from tests.layers.test_attention import randomize_
from tests.layers.test_decoding import check_left_padded_decoding_equals_rows_alone, decode_in_steps

NSA_CASES = [
    # (heads, kv_heads, window, gate, block_size, block_counts, token_shift, output_gate, qk_norm)
    (4, 2, 4, True, 4, 2, False, False, False),
    (4, 4, 3, False, 3, 2, True, True, False),   # plain sliding branch ("nsa")
    (6, 1, 5, True, 4, 3, True, False, True),    # MQA
    (2, 2, None, True, 5, 1, False, False, False),  # full causal sliding branch
]


def nsa_layer(case) -> NSAttention:
    heads, kv_heads, window, gate, block_size, block_counts, shift, out_gate, qk_norm = case
    return randomize_(NSAttention(
        hidden_size=16, num_heads=heads, num_kv_heads=kv_heads, head_dim=8, window_size=window, use_gate=gate,
        block_size=block_size, block_counts=block_counts, token_shift=shift, output_gate=out_gate, qk_norm=qk_norm,
        rope_theta=300.0,
    ))


@pytest.mark.parametrize("case", NSA_CASES, ids=lambda c: "-".join(str(x) for x in c))
def test_parallel_forward_matches_reference(case):
    layer = nsa_layer(case)
    x = torch.randn(2, 23, 16)  # several blocks, the last one partial
    with torch.no_grad():
        out = layer(x)
    ref64 = reference_attention_layer(layer, x, dtype=torch.float64)
    naive32 = reference_attention_layer(layer, x, dtype=torch.float32)
    assert_within_rule("out", out, naive32, ref64)


def test_gradients_reach_every_parameter():
    layer = nsa_layer(NSA_CASES[2])
    x = torch.randn(2, 13, 16, requires_grad=True)
    layer(x).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()


def test_padding_and_packing_equal_rows_alone():
    layer = nsa_layer(NSA_CASES[0])
    lengths = [9, 14]
    rows = [torch.randn(1, n, 16) for n in lengths]
    padded = torch.zeros(2, 14, 16)
    mask = torch.zeros(2, 14, dtype=torch.long)
    padded[0, 5:], mask[0, 5:] = rows[0][0], 1  # left padding
    padded[1], mask[1] = rows[1][0], 1
    packed = torch.cat(rows, dim=1)
    cu_seqlens = torch.tensor([0, 9, 23], dtype=torch.int32)
    with torch.no_grad():
        alone = [layer(row) for row in rows]
        masked = layer(padded, attention_mask=mask)
        from_packed = layer(packed, cu_seqlens=cu_seqlens)
    torch.testing.assert_close(masked[0, 5:], alone[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked[1], alone[1][0], rtol=1e-5, atol=1e-5)
    assert masked[0, :5].abs().max() == 0
    torch.testing.assert_close(from_packed, torch.cat(alone, dim=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", NSA_CASES, ids=lambda c: "-".join(str(x) for x in c))
@pytest.mark.parametrize("prompt_len, steps", [(0, [1]), (7, [1, 3, 2])])
def test_decoding_equals_parallel_at_every_position(case, prompt_len, steps):
    layer = nsa_layer(case)
    block_size, window = case[4], case[2]
    seqlen = max(3 * (window or 4), 4 * block_size) + 5  # T > 3w and > 4 blocks: selection has choices
    x = torch.randn(2, seqlen, 16)
    cache = layer.new_cache()
    with torch.no_grad():
        decoded = decode_in_steps(layer, x, prompt_len, steps, cache)
    ref64 = reference_attention_layer(layer, x, dtype=torch.float64)
    naive32 = reference_attention_layer(layer, x, dtype=torch.float32)
    assert_within_rule("decoded", decoded, naive32, ref64)
    assert cache.seen_tokens == seqlen
    if window is not None:
        assert cache.window.capacity == window  # the sliding branch's cache stays O(w)
    assert cache.num_summaries == seqlen // block_size
    assert cache.kept.capacity >= seqlen and cache.kept.seen_tokens == seqlen  # every key is kept


def test_summaries_are_the_block_means_of_the_kept_keys():
    layer = nsa_layer(NSA_CASES[0])
    cache = layer.new_cache()
    x = torch.randn(1, 18, 16)
    with torch.no_grad():
        decode_in_steps(layer, x, 6, [1], cache)
    block = layer.block_size
    kept = cache.kept.keys[:, :, :18].float()
    for c in range(18 // block):
        torch.testing.assert_close(cache.key_summaries[:, :, c], kept[:, :, c * block:(c + 1) * block].mean(2))
    assert cache.key_summaries[:, :, 18 // block:].abs().max() == 0


def test_left_padded_prefill_then_decoding_equals_each_row_alone():
    """Rows of different prompt lengths (left padding) complete their blocks at different
    steps; each row gets what it gets alone."""
    layer = nsa_layer(NSA_CASES[0])
    check_left_padded_decoding_equals_rows_alone(layer, layer.new_cache(), [3, 10, 1], 11)


def test_cache_reorder_keeps_rows():
    layer = nsa_layer(NSA_CASES[0])
    x = torch.randn(3, 14, 16)
    cache = layer.new_cache()
    with torch.no_grad():
        layer(x[:, :9], cache=cache)
        cache.reorder(torch.tensor([2, 0]))
        out = torch.cat([layer(x[[2, 0], t:t + 1], cache=cache) for t in range(9, 14)], dim=1)
        expected = layer(x[[2, 0]])[:, 9:]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="block_size"):
        NSAttention(16, 2, block_size=0)
    with pytest.raises(ValueError, match="block_counts"):
        NSAttention(16, 2, block_counts=0)
    layer = nsa_layer(NSA_CASES[0])
    cache = WindowLayerCache(4)
    with torch.no_grad():
        layer(torch.randn(1, 5, 16), cache=cache)
        with pytest.raises(TypeError, match="NSALayerCache"):
            layer(torch.randn(1, 1, 16), cache=cache)
    assert isinstance(layer.new_cache(), NSALayerCache)
