"""GatedFWAttention decoding with the window cache: prefill (parallel path) then the decode
op, one token or a few at a time, equals one parallel pass at every position (the rule of
docs/correctness.md against the float64 reference), for T > 3w."""

import pytest
import torch

from gatedfwa import WindowLayerCache
from gatedfwa.layers import GatedFWAttention
from gatedfwa.testing import assert_within_rule
from tests.layers.reference import reference_attention_layer
from tests.layers.test_attention import randomize_

DECODE_CASES = [
    # (heads, kv_heads, window, gate, token_shift, output_gate, qk_norm)
    (4, 4, 4, True, False, False, False),
    (4, 2, 4, True, True, True, False),    # GQA, token shift, output gate
    (6, 1, 3, True, True, False, True),    # MQA
    (4, 2, 5, False, True, True, False),   # plain SWA
    (2, 2, None, True, True, False, False),  # forgetting attention: unbounded cache
    (2, 1, None, False, False, True, False),  # full causal
]


def decode_in_steps(layer, x, prompt_len, step_sizes, cache):
    """Prefill x[:, :prompt_len] (if > 0), then feed the rest in chunks cycling through
    step_sizes; returns the outputs [B, T, C] of every position."""
    outputs = []
    if prompt_len:
        outputs.append(layer(x[:, :prompt_len], cache=cache))
    t, i = prompt_len, 0
    while t < x.shape[1]:
        n = step_sizes[i % len(step_sizes)]
        outputs.append(layer(x[:, t:t + n], cache=cache))
        t, i = t + n, i + 1
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "-".join(str(x) for x in c))
@pytest.mark.parametrize("prompt_len, steps", [(0, [1]), (6, [1, 3, 2])])
def test_decoding_equals_parallel_at_every_position(case, prompt_len, steps):
    heads, kv_heads, window, gate, shift, out_gate, qk_norm = case
    layer = randomize_(GatedFWAttention(
        hidden_size=16, num_heads=heads, num_kv_heads=kv_heads, head_dim=8, window_size=window,
        use_gate=gate, token_shift=shift, output_gate=out_gate, qk_norm=qk_norm, rope_theta=300.0,
    ))
    seqlen = 3 * (window or 4) + 5  # T > 3w
    x = torch.randn(2, seqlen, 16)
    cache = WindowLayerCache(window)
    with torch.no_grad():
        decoded = decode_in_steps(layer, x, prompt_len, steps, cache)
        parallel = layer(x)
    ref64 = reference_attention_layer(layer, x, dtype=torch.float64)
    naive32 = reference_attention_layer(layer, x, dtype=torch.float32)
    assert_within_rule("decoded", decoded, naive32, ref64)
    assert_within_rule("parallel", parallel, naive32, ref64)
    if window is not None:
        assert cache.capacity == window
    assert cache.seen_tokens == seqlen


def check_left_padded_decoding_equals_rows_alone(layer, cache, lengths, total_new):
    """Prompts of ``lengths`` tokens, left-padded into one batch, prefilled together into
    ``cache`` and decoded together for total_new steps, give every row what it gives alone."""
    width = layer.hidden_size
    rows = [torch.randn(1, n + total_new, width) for n in lengths]
    longest = max(lengths)
    prompt = torch.zeros(len(lengths), longest, width)
    mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    for b, (row, n) in enumerate(zip(rows, lengths)):
        prompt[b, longest - n:] = row[0, :n]
        mask[b, longest - n:] = 1
    with torch.no_grad():
        first = layer(prompt, attention_mask=mask, cache=cache)
        steps = [layer(torch.stack([row[0, n + t] for row, n in zip(rows, lengths)])[:, None], cache=cache)
                 for t in range(total_new)]
        steps = torch.cat(steps, dim=1)
        for b, (row, n) in enumerate(zip(rows, lengths)):
            alone = layer(row)[0]
            torch.testing.assert_close(first[b, longest - n:], alone[:n], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(steps[b], alone[n:], rtol=1e-5, atol=1e-5)


def test_left_padded_prefill_then_decoding_equals_each_row_alone():
    """A batch of prompts of different lengths (left padding) prefilled together and decoded
    together gives every row what it gives alone."""
    layer = randomize_(GatedFWAttention(16, 4, 2, 8, window_size=4, token_shift=True, output_gate=True))
    cache = WindowLayerCache(4)
    check_left_padded_decoding_equals_rows_alone(layer, cache, [3, 9, 1], 8)
    assert cache.keys.shape == (3, 2, 4, 8)


def test_decoding_rejects_padding_after_prefill():
    layer = GatedFWAttention(16, 2, window_size=4)
    cache = WindowLayerCache(4)
    layer(torch.randn(1, 5, 16), cache=cache)
    with pytest.raises(ValueError, match="attention_mask"):
        layer(torch.randn(1, 1, 16), attention_mask=torch.ones(1, 1), cache=cache)
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(torch.randn(1, 5, 16), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32), cache=WindowLayerCache(4))
