"""decode_nsa_attention with an NSALayerCache: prefill then steps of one or a few tokens
give nsa_attention's output at every position (the float64 rule), for GQA group sizes, with
and without the gated sliding branch and with branches left out."""

import pytest
import torch

from gatedfwa.ops.nsa import NSALayerCache, decode_nsa_attention
from gatedfwa.ops.nsa.naive import naive_nsa_attention
from gatedfwa.testing import assert_within_rule

CASES = [
    # (q_heads, kv_heads, block_size, block_counts, window, branches, gate)
    (4, 2, 4, 2, 5, ("cmp", "slc", "swa"), True),
    (3, 3, 5, 3, 4, ("cmp", "slc", "swa"), False),
    (8, 1, 4, 1, 3, ("slc", "swa"), True),
    (2, 1, 3, 2, 6, ("cmp",), False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:5])) + "-" + "+".join(c[5]) + f"-{c[6]}")
@pytest.mark.parametrize("prompt_len", [0, 9])
def test_decoding_equals_the_reference_at_every_position(case, prompt_len, make_inputs):
    q_heads, kv_heads, block_size, block_counts, window, branches, gate = case
    seqlen = 5 * block_size + 2
    q, k, v, gates = make_inputs(2, seqlen, q_heads, kv_heads, 8, torch.float32, "cpu", branches=branches, gate=gate,
                                 block_size=block_size)
    options = dict(block_size=block_size, block_counts=block_counts, window_size=window)

    def reference(dtype):
        cast = {name: None if t is None else t.to(dtype) for name, t in gates.items()}
        return naive_nsa_attention(q.to(dtype), k.to(dtype), v.to(dtype), **cast, **options)[0]

    cache = NSALayerCache(window, block_size)
    outputs = []
    if prompt_len:
        cache.prefill(k[:, :prompt_len], v[:, :prompt_len], None if gates["g"] is None else gates["g"][:, :prompt_len],
                      num_q_heads=q_heads)
        outputs.append(reference(torch.float32)[:, :prompt_len])  # the prompt's outputs come from the parallel op
    t, sizes = prompt_len, [1, 3, 2]
    while t < seqlen:
        piece = slice(t, min(seqlen, t + sizes[len(outputs) % 3]))
        step = {name: None if x is None else x[:, piece] for name, x in gates.items()}
        outputs.append(decode_nsa_attention(q[:, piece], k[:, piece], v[:, piece], step["g"], step["g_cmp"],
                                            step["g_slc"], step["g_swa"], cache, block_counts=block_counts))
        t = piece.stop
    decoded = torch.cat(outputs, dim=1)
    assert_within_rule("decoded", decoded[:, prompt_len:], reference(torch.float32)[:, prompt_len:],
                       reference(torch.float64)[:, prompt_len:])
    assert cache.seen_tokens == seqlen and cache.num_summaries == seqlen // block_size


def test_decode_arguments_are_checked(make_inputs):
    q, k, v, gates = make_inputs(1, 4, 2, 1, 8, torch.float32, "cpu", block_size=4)
    cache = NSALayerCache(3, 4)
    with pytest.raises(TypeError, match="NSALayerCache"):
        decode_nsa_attention(q[:, :1], k[:, :1], v[:, :1], None, gates["g_cmp"][:, :1], None, None, object())
    with pytest.raises(ValueError, match="at least one"):
        decode_nsa_attention(q[:, :1], k[:, :1], v[:, :1], None, None, None, None, cache)
    with pytest.raises(ValueError, match="g_slc"):
        decode_nsa_attention(q[:, :1], k[:, :1], v[:, :1], None, None, gates["g_slc"], None, cache)
    with pytest.raises(ValueError, match="block_size"):
        NSALayerCache(3, 0)
