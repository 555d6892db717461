"""Chunk-local gate sums: the form in which the attention kernels read the gates.

The attention logit of query t and key j carries the decay U_t - U_j = g[j+1] + ... + g[t].
The kernels never form the running sum U itself (its magnitude grows with the sequence and
would round away the small differences that matter); they measure decay from reference
points next to the tiles they work on (docs/math.md). What they need per tile is sums of g
inside the tile, and those are what this module precomputes, once per call, so that no
attention program scans gates itself:

    chunks of CHUNK positions, counted from each sequence's first token;
    P[t] = g[c] + ... + g[t]             inclusive prefix inside t's chunk [c, c + CHUNK)
    S[t] = g[t+1] + ... + g[chunk end]   exclusive suffix inside t's chunk (its last valid
                                         position when the sequence ends inside the chunk)

Both are sums of same-signed terms taken directly, never differences of longer sums, so each
rounds like any short sum. A chunk's total is P at its last position. They are stored in base
2, multiplied by log2(e) once here, because the attention kernels take exponentials with exp2:
the sums then enter the logits without any per-tile arithmetic. CHUNK divides every tile
size of the attention kernels: launch.py (gate_chunk) derives it from their tile sizes, so a
tile is a whole number of chunks. This is the attention kernels' input format, which is why it
lives beside them; the gate itself (its formula) comes from the gate registry
(gatedfwa/ops/gate/registry.py).

Layout: sums [2, B, H, T] float32, sums[0] = P and sums[1] = S, contiguous along time (one
stretch per tile load), the same [B, H, T] layout as the kernels' row statistics. With
cu_seqlens, B == 1 and T is the packed length.

Two producers share one kernel: from the log gates g [B, T, H] (gated_window_attention), or
straight from the gate projection gate_pre [B, T, n H] and b_g (gated_fwa_attention; n inputs
per head, 2 for the default gate), in which case g is evaluated in registers by the gate's
device function (GateSpec.device_value, passed in as a constexpr) and never stored.
"""

from __future__ import annotations

import torch

from gatedfwa.ops.gate.registry import DEFAULT_GATE, gate_spec
# Triton is optional: without it the kernel below is never launched.
from gatedfwa.ops.common.triton_support import LOG2E_CONSTEXPR, cdiv, jit, next_power_of_2, tl
from gatedfwa.ops.common.head_major import batch_shift
from gatedfwa.ops.common.varlen import longest_sequence, sequence_bounds
from gatedfwa.ops.window_attention import launch

__all__ = ["chunk_gate_sums", "chunk_gate_sums_from_projection"]

@jit
def _suffix_combine(later_total, later_rest, earlier_total, earlier_rest):
    """Combine for the reverse scan that gives S. A segment of positions is (total, rest):
    the sum of all its gates, and the sum of all but its first one. A reverse scan hands the
    segment later in time first (Triton scans the flipped sequence). Both components only
    ever add gates, so S comes out as a direct sum, like a plain cumulative sum."""
    return later_total + earlier_total, earlier_rest + later_total


@jit
def _chunk_sums_kernel(
    SRC, SECOND_SRC, BIAS, SUMS, CU_SEQLENS,
    token_stride, second_token_stride, seqlen, num_heads, plane,
    VALUE: tl.constexpr, INPUTS: tl.constexpr,
    FROM_PROJECTION: tl.constexpr, HAS_BIAS: tl.constexpr, VARLEN: tl.constexpr,
    CHUNK: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One program: CHUNKS consecutive chunks of one sequence, BLOCK_H heads, as a block
    [CHUNKS, CHUNK, BLOCK_H] scanned along its middle axis. Tokens are flattened (b * T + t);
    SRC/SECOND_SRC rows are tokens with unit stride along heads. FROM_PROJECTION: SRC holds a
    (before the bias) and, with INPUTS == 2, SECOND_SRC the gate's second input; g =
    VALUE(a[, second]). Otherwise SRC holds g. Every gate is loaded and evaluated once: P is its
    cumulative sum, S the exclusive reverse one (_suffix_combine)."""
    block = tl.program_id(0)
    seq = tl.program_id(1)
    bos, eos = sequence_bounds(CU_SEQLENS, seq, seqlen, VARLEN)
    # Token p = b * T + t of head h is stored at (b * H + h) * T + t.
    shift = batch_shift(seq, num_heads, seqlen, VARLEN)
    start = bos + block * (CHUNKS * CHUNK)
    if start >= eos:
        return
    chunk_ids = tl.arange(0, CHUNKS)[:, None, None]
    positions = tl.arange(0, CHUNK)[None, :, None]
    # Chunks count from the sequence start and the block starts on a chunk boundary, so the
    # block's chunks are whole chunks of the sequence (the last one cut at eos).
    tokens = (start + chunk_ids * CHUNK + positions).to(tl.int64)
    heads = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)[None, None, :]
    mask = (tokens < eos) & (heads < num_heads)
    g = tl.load(SRC + tokens * token_stride + heads, mask=mask, other=0.0).to(tl.float32)
    if FROM_PROJECTION:
        if HAS_BIAS:
            g = g + tl.load(BIAS + heads, mask=heads < num_heads, other=0.0).to(tl.float32)
        if INPUTS == 2:
            second = tl.load(SECOND_SRC + tokens * second_token_stride + heads, mask=mask, other=0.0).to(tl.float32)
            g_value = VALUE(g, second)
        else:
            g_value = VALUE(g)
        # Masked slots would evaluate the gate at zero inputs (g = -log 2 for both shipped
        # gates): zero them, so that the last valid position's S sums only zeros.
        g = tl.where(mask, g_value, 0.0)
    g = g * LOG2E_CONSTEXPR
    prefix = tl.cumsum(g, 1)
    _, suffix = tl.associative_scan((g, tl.zeros_like(g)), 1, _suffix_combine, reverse=True)
    out = SUMS + shift + tokens + heads.to(tl.int64) * seqlen
    tl.store(out, prefix, mask=mask)
    tl.store(out + plane, suffix, mask=mask)


def _launch(src, second_src, bias, num_heads, batch, seqlen, chunk, cu_seqlens, max_seqlen, device, spec=None):
    """src: g, or (spec given) a [.., H] with unit stride along heads; second_src: the gate's
    second input, or None."""
    sums = torch.empty((2, batch, num_heads, seqlen), dtype=torch.float32, device=device)
    if sums.numel() == 0 or max_seqlen == 0:
        return sums.zero_()
    program = launch.program_config("chunk_sums", device)
    block_h = min(next_power_of_2(num_heads), program["MAX_BLOCK_H"])
    num_seqs = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    # No more chunks per program than the longest sequence has (short sequences, decoding).
    chunks = min(program["CHUNKS"], next_power_of_2(cdiv(max_seqlen, chunk)))
    grid = (cdiv(max_seqlen, chunks * chunk), num_seqs, cdiv(num_heads, block_h))
    from_projection = spec is not None
    # From g, VALUE is never called: the default gate's keeps one compiled variant.
    spec = spec or gate_spec(DEFAULT_GATE)
    second = second_src if second_src is not None else src
    _chunk_sums_kernel[grid](
        src, second, bias if bias is not None else src, sums,
        cu_seqlens if cu_seqlens is not None else src,
        src.stride(-2), second.stride(-2) if second_src is not None else 0, seqlen, num_heads, sums.stride(0),
        VALUE=spec.device_value, INPUTS=spec.inputs_per_head,
        FROM_PROJECTION=from_projection, HAS_BIAS=bias is not None, VARLEN=cu_seqlens is not None,
        CHUNK=chunk, CHUNKS=chunks, BLOCK_H=block_h, num_warps=program["num_warps"],
    )
    return sums


def chunk_gate_sums(g: torch.Tensor, chunk: int, cu_seqlens: torch.Tensor | None = None,
                    max_seqlen: int | None = None) -> torch.Tensor:
    """g [B, T, H] log gates (any float dtype, unit stride along H) -> sums [2, B, H, T] float32 (base 2).

    chunk: a power of two, the chunk length. max_seqlen: the longest sequence with cu_seqlens
    (computed when not given, which reads cu_seqlens on the host)."""
    batch, seqlen, num_heads = g.shape
    if max_seqlen is None:
        max_seqlen = longest_sequence(cu_seqlens, seqlen)
    return _launch(g.contiguous(), None, None, num_heads, batch, seqlen, chunk, cu_seqlens, max_seqlen, g.device)


def chunk_gate_sums_from_projection(gate_pre: torch.Tensor, gate_bias: torch.Tensor | None, chunk: int,
                                    cu_seqlens: torch.Tensor | None = None,
                                    max_seqlen: int | None = None, gate: str = DEFAULT_GATE) -> torch.Tensor:
    """gate_pre [B, T, n H] (the gate's n inputs per head, H columns each: for the default gate
    x W_g without bias, then x W_beta), gate_bias [H] or None -> sums [2, B, H, T] float32
    (base 2) of the gate's g (for the default gate logsigmoid(beta a) / beta), g itself never
    stored. gate: a name registered in gatedfwa.ops.gate.registry.GATES."""
    spec = gate_spec(gate)
    gate_pre = gate_pre.contiguous()
    batch, seqlen, width = gate_pre.shape
    num_heads = width // spec.inputs_per_head
    if max_seqlen is None:
        max_seqlen = longest_sequence(cu_seqlens, seqlen)
    second = gate_pre[..., num_heads:] if spec.inputs_per_head == 2 else None
    return _launch(gate_pre[..., :num_heads], second,
                   None if gate_bias is None else gate_bias.contiguous(),
                   num_heads, batch, seqlen, chunk, cu_seqlens, max_seqlen, gate_pre.device, spec)
