"""decode_nsa_attention with an NSALayerCache: prefill then steps of one or a few tokens
give nsa_attention's output at every position (the float64 rule), for GQA group sizes, with
and without the gated sliding branch and with branches left out; on the PyTorch path and on
the Triton kernels (TRITON_INTERPRET=1 on the CPU), where decoding also matches the parallel
op's Triton forward closely; left-padded rows of different lengths."""

import pytest
import torch

from gatedfwa.ops.backend import use_backend
from gatedfwa.ops.nsa import NSALayerCache, decode_nsa_attention, launch, nsa_attention
from gatedfwa.ops.nsa.naive import naive_nsa_attention
from gatedfwa.testing import assert_within_rule


@pytest.fixture
def triton_kernels(monkeypatch):
    """The Triton path, its kernels' outputs poisoned with NaN (any row they fail to write shows)."""
    monkeypatch.setattr(launch, "allocate_like", lambda x: torch.full_like(x, float("nan")))
    with use_backend("triton"):
        yield


def decode_in_steps(q, k, v, gates, cache, start, sizes, block_counts):
    """Decode tokens start.. of q, k, v into cache in steps of sizes[i % len(sizes)] tokens;
    returns the outputs [B, T - start, HQ, D]."""
    outputs, t = [], start
    while t < q.shape[1]:
        piece = slice(t, min(q.shape[1], t + sizes[len(outputs) % len(sizes)]))
        step = {name: None if x is None else x[:, piece] for name, x in gates.items()}
        outputs.append(decode_nsa_attention(q[:, piece], k[:, piece], v[:, piece], step["g"], step["g_cmp"],
                                            step["g_slc"], step["g_swa"], cache, block_counts=block_counts))
        t = piece.stop
    return torch.cat(outputs, dim=1)

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
    if prompt_len:
        cache.prefill(k[:, :prompt_len], v[:, :prompt_len], None if gates["g"] is None else gates["g"][:, :prompt_len],
                      num_q_heads=q_heads)
    with use_backend("torch"):
        decoded = decode_in_steps(q, k, v, gates, cache, prompt_len, [1, 3, 2], block_counts)
    assert_within_rule("decoded", decoded, reference(torch.float32)[:, prompt_len:],
                       reference(torch.float64)[:, prompt_len:])
    assert cache.seen_tokens == seqlen and cache.num_summaries == seqlen // block_size


# (q_heads, kv_heads, block_size, block_counts, window, branches, gate, step sizes): groups 2
# and 8, token by token and in steps of a few tokens (several queries per call).
TRITON_CASES = [
    (4, 2, 4, 2, 5, ("cmp", "slc", "swa"), True, [1]),
    (8, 1, 4, 2, 3, ("cmp", "slc"), False, [2, 3, 1]),
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "HQ{}-H{}-bs{}-S{}-w{}".format(*c[:5])
                         + "-steps" + "".join(map(str, c[7])))
def test_triton_decoding_equals_the_full_forward(triton_kernels, case, make_inputs):
    """The Triton decode path from a prompt of 9 tokens: the float64 rule against the
    reference, and the parallel op's Triton forward on the whole sequence."""
    q_heads, kv_heads, block_size, block_counts, window, branches, gate, sizes = case
    seqlen, prompt_len = 4 * block_size + 2, 9
    q, k, v, gates = make_inputs(2, seqlen, q_heads, kv_heads, 8, torch.float32, "cpu", branches=branches, gate=gate,
                                 block_size=block_size)
    options = dict(block_size=block_size, block_counts=block_counts, window_size=window)
    cache = NSALayerCache(window, block_size)
    cache.prefill(k[:, :prompt_len], v[:, :prompt_len], None if gates["g"] is None else gates["g"][:, :prompt_len],
                  num_q_heads=q_heads)
    decoded = decode_in_steps(q, k, v, gates, cache, prompt_len, sizes, block_counts)
    full = nsa_attention(q, k, v, **gates, **options)
    torch.testing.assert_close(decoded, full[:, prompt_len:], rtol=1e-4, atol=1e-5)
    cast = {name: None if t is None else t.double() for name, t in gates.items()}
    reference = naive_nsa_attention(q.double(), k.double(), v.double(), **cast, **options)[0]
    low = naive_nsa_attention(q, k, v, **gates, **options)[0]
    assert_within_rule("decoded", decoded, low[:, prompt_len:], reference[:, prompt_len:])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decoding_left_padded_rows(backend, monkeypatch, make_inputs):
    """Rows of different lengths (the shorter left-padded in the prompt): each row decodes
    as its real tokens alone would, blocks counted from its first real token."""
    block_size, block_counts, window, pad = 4, 2, 5, 3
    seqlen, prompt_len = 4 * block_size + 1, 9
    q, k, v, gates = make_inputs(2, seqlen, 4, 2, 8, torch.float32, "cpu", block_size=block_size)
    mask = torch.ones(2, prompt_len, dtype=torch.long)
    mask[1, :pad] = 0
    cache = NSALayerCache(window, block_size)
    cache.prefill(k[:, :prompt_len], v[:, :prompt_len], gates["g"][:, :prompt_len], attention_mask=mask)
    if backend == "triton":
        monkeypatch.setattr(launch, "allocate_like", lambda x: torch.full_like(x, float("nan")))
    with use_backend(backend):
        decoded = decode_in_steps(q, k, v, gates, cache, prompt_len, [1, 2], block_counts)
    options = dict(block_size=block_size, block_counts=block_counts, window_size=window)
    for row, first in ((0, 0), (1, pad)):
        real = {name: t[row:row + 1, first:] for name, t in gates.items()}
        args = [x[row:row + 1, first:] for x in (q, k, v)]
        low = naive_nsa_attention(*args, **real, **options)[0]
        reference = naive_nsa_attention(*(x.double() for x in args), **{n: t.double() for n, t in real.items()},
                                        **options)[0]
        new = slice(prompt_len - first, None)
        assert_within_rule(f"row {row}", decoded[row:row + 1], low[:, new], reference[:, new])


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
