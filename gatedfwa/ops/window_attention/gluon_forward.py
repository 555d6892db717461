"""Warp-specialised Gluon forward kernel of gated window attention for Hopper (sm_90), and its
launcher.

The same math, inputs and outputs as the Triton forward (forward.py, which stays the portable
path and the reference): o [B, T, HQ, D] in q's dtype and the base-2 log-sum-exp lse2
[B, HQ, T] float32, exactly what the Triton backward reads. docs/math.md has the math,
tiles.py the gate's decay terms; this file only reorganises the work the FlashAttention-3
way, which Triton's own warp specialisation does not manage on these loops
(docs/performance.md):

* One program owns 2 * BLOCK_M query rows of one sequence and one query head, split between
  two consumer warpgroups of BLOCK_M rows each (the default partition is consumer 0, the
  first worker partition consumer 1).
* A producer partition (one warp, few registers) walks the key tiles the two row blocks can
  see, right to left, and loads each one's K, V and (gated) gate suffix sums through TMA
  into a ring of STAGES shared-memory slots, guarded by mbarriers: `ready[s]` completes when
  the copies of slot s have landed (TMA byte count), `empty[s]` when both consumers are done
  with it.
* Both consumers read the one stream of tiles; a tile one of them cannot see (the tile on
  the upper block's diagonal for the lower block, the far window edge for the upper one) it
  hands back at once.
* Each consumer issues S = Q K^T of tile i together with O += P V of tile i-1 (P kept in
  registers), then does tile i's mask, decay and online softmax while the P V runs: the
  softmax overlaps the tensor cores inside a warpgroup.
* Ping-pong between the consumers: a pair of `turn` mbarriers lets them issue their matmuls
  in alternation, so that one warpgroup's softmax runs while the other's matmuls occupy the
  tensor cores.

What the kernel supports (`supports` says it for a call, and dispatch routes everything else
to the Triton kernel): compute capability 9, fp16/bf16, head size 64 or 128, any GQA group,
gated or not, as many queries as keys, no packed sequences (cu_seqlens). Tile sides are
BLOCK_M = BLOCK_N = 64, so the diagonal key tile of a row block is that block itself, and the
gate chunk (launch.gate_chunk, 32 or 64 here) divides every tile.

Sequence bounds come from the TMA descriptors: K, V, q and o are described as
[B, T, heads * D] so that a tile reaching past T reads zeros and the o store past T writes
nothing; the gate sums are one flat float32 vector (a 1-D descriptor has no stride to align),
whose tiles past a row's end read the next row's sums, which only masked keys ever see.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from gatedfwa.ops.common.triton_support import LOG2E, cdiv
from gatedfwa.ops.window_attention import launch

# Triton after 3.6 renamed the TMA copies (async_load / async_store, same arguments) and made the
# old names raise: take whichever this Triton has.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

__all__ = ["BLOCK_M", "BLOCK_N", "HEAD_DIMS", "supports", "unsupported_reason", "gluon_attention_forward",
           "kernel_config"]

# Rows per consumer warpgroup and keys per tile. wgmma needs 64 rows per warpgroup; 64 keys
# keep the masked tiles at the window's edge cheap, as in the Triton kernel (launch.py).
BLOCK_M = 64
BLOCK_N = 64
HEAD_DIMS = (64, 128)
# Registers per thread of the worker partitions: the second consumer warpgroup as many as the
# first (the default partition, which gets what `MAX_REGISTERS` leaves), the producer the
# minimum. 12 warps (two consumer warpgroups and one producer warpgroup) at 168 registers each
# fill the register file of an SM with one program: 2 * 128 * 240 + 128 * 24 <= 65536.
CONSUMER_REGISTERS = 240
PRODUCER_REGISTERS = 24
MAX_REGISTERS = 168
_CONSUMER_REGISTERS = gl.constexpr(CONSUMER_REGISTERS)
_PRODUCER_REGISTERS = gl.constexpr(PRODUCER_REGISTERS)


def kernel_config(head_dim: int) -> dict:
    """The ring's slots (STAGES) for this head size: launch.TUNING's "gluon_forward" entry on
    sm_90, the one architecture this kernel is written for."""
    return launch.TUNING.config("gluon_forward", "sm90", block_d=launch.block_d_for(head_dim), gate=True)


# --------------------------------------------------------------------------------------
# Tile bookkeeping shared by the producer and the consumers (all scalars)
# --------------------------------------------------------------------------------------


@gluon.jit
def _stream(m0, seqlen, window, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """The program's key tiles, right to left: (start of the first tile, number of tiles). The
    first is the upper row block's diagonal tile when that block has rows, else the lower
    one's; the last holds the lower block's lowest visible key max(0, m0 - window + 1)."""
    upper = m0 + BLOCK_M
    top = gl.where(upper < seqlen, upper, m0)
    lowest_key = gl.maximum(m0 - window + 1, 0)
    lowest_tile = m0 - (m0 - lowest_key + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    return top, (top - lowest_tile) // BLOCK_N + 1


@gluon.jit
def _visible_tiles(r0, top, seqlen, window, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """[first, last): the stream positions of the tiles the row block [r0, r0 + BLOCK_M) sees,
    a contiguous run from its diagonal tile (start r0) down to the tile of its lowest key.
    Empty when the block starts past the sequence end."""
    lowest_key = gl.maximum(r0 - window + 1, 0)
    lowest_tile = r0 - (r0 - lowest_key + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    has_rows = r0 < seqlen
    first = gl.where(has_rows, (top - r0) // BLOCK_N, 0)
    last = gl.where(has_rows, (top - lowest_tile) // BLOCK_N + 1, 0)
    return first, last


@gluon.jit
def _chunk_total(p_row, chunk_start, seqlen, GATE_CHUNK: gl.constexpr):
    """The gate total (base 2) of the chunk [chunk_start, chunk_start + GATE_CHUNK): its
    inclusive prefix sum at its last position inside the sequence (chunk_sums.py), 0 for a
    chunk past the end. One scalar load."""
    last = gl.minimum(chunk_start + GATE_CHUNK - 1, seqlen - 1)
    return gl.load(p_row + last, mask=chunk_start < seqlen, other=0.0)


# --------------------------------------------------------------------------------------
# Producer: one warp issuing the TMA copies
# --------------------------------------------------------------------------------------


@gluon.jit
def _producer(k_desc, v_desc, s_desc, k_bufs, v_bufs, s_bufs, ready, empty,
              batch, kv_col, sums_row, m0, seqlen, window,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HAS_GATE: gl.constexpr):
    """Fill the ring: tile i goes to slot i % STAGES once both consumers have released the
    tile STAGES before it. k_desc/v_desc: [B, T, H * D] tiles [1, BLOCK_N, D] at column kv_col
    (kv_head * D); s_desc: the flat gate sums, tiles [BLOCK_N] starting at sums_row + key
    (the suffix plane of this batch row and query head)."""
    top, num_tiles = _stream(m0, seqlen, window, BLOCK_M, BLOCK_N)
    if HAS_GATE:
        TILE_BYTES: gl.constexpr = k_desc.block_type.nbytes + v_desc.block_type.nbytes + s_desc.block_type.nbytes
    else:
        TILE_BYTES: gl.constexpr = k_desc.block_type.nbytes + v_desc.block_type.nbytes
    for i in range(num_tiles):
        slot = i % STAGES
        # A fresh mbarrier counts as having completed the phase before its first one, so the
        # first pass over the ring does not wait.
        mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
        n0 = top - i * BLOCK_N
        bar = ready.index(slot)
        mbarrier.expect(bar, TILE_BYTES)
        _tma_load(k_desc, [batch, n0, kv_col], bar, k_bufs.index(slot))
        _tma_load(v_desc, [batch, n0, kv_col], bar, v_bufs.index(slot))
        if HAS_GATE:
            _tma_load(s_desc, [sums_row + n0], bar, s_bufs.index(slot))


# --------------------------------------------------------------------------------------
# Consumers: one warpgroup each, BLOCK_M query rows
# --------------------------------------------------------------------------------------


# Row reductions written with gluon.jit combine functions rather than gl.max and gl.sum, which
# wrap triton.jit functions: under Triton's interpreter (TRITON_INTERPRET=1, the CPU tests)
# those become interpreted functions that a Gluon compilation cannot reference, and the CPU
# test compiles this kernel in such a process.
@gluon.jit
def _maximum(a, b):
    return gl.maximum(a, b)


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _softmax_tile(s, m_i, l_i, row_shift, HAS_GATE: gl.constexpr):
    """One tile of the online softmax in base 2 (forward.py, _forward_tile): s [BLOCK_M,
    BLOCK_N] logits, -inf where masked, whose rows still owe the decay's row term row_shift
    (folded into the running maximum instead of added per element). Returns the tile's
    probabilities p, the new running maximum and sum, and the factor that rescales the
    output accumulated so far."""
    tile_max = gl.reduce(s, 1, _maximum)
    if HAS_GATE:
        tile_max += row_shift
    new_max = gl.maximum(m_i, tile_max)
    # A row without any visible key yet keeps -inf; subtracting 0 instead gives exp2(-inf) = 0,
    # not NaN.
    safe_max = gl.where(new_max == float("-inf"), 0.0, new_max)
    if HAS_GATE:
        p = gl.exp2(s - gl.expand_dims(safe_max - row_shift, 1))
    else:
        p = gl.exp2(s - gl.expand_dims(safe_max, 1))
    correction = gl.exp2(m_i - safe_max)
    l_i = l_i * correction + gl.reduce(p, 1, _add)
    return p, new_max, l_i, correction


@gluon.jit
def _skip_tile(i, ready, empty, turn, CONSUMER: gl.constexpr, STAGES: gl.constexpr):
    """A tile this consumer cannot see: wait until it has landed (so that the release below
    counts towards this use of the slot, not the previous one), release it, and pass the turn
    on, keeping the ping-pong in step with the other consumer."""
    slot = i % STAGES
    mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
    mbarrier.arrive(empty.index(slot), count=1)
    mbarrier.wait(turn.index(CONSUMER), (i + 1 - CONSUMER) & 1)
    mbarrier.arrive(turn.index(1 - CONSUMER), count=1)


@gluon.jit
def _release(empty_bar, HAS_GATE: gl.constexpr):
    """Hand a slot back to the producer after its last use. The gate sums were read with plain
    shared-memory loads (the generic proxy), and the producer's next TMA copy into the slot
    writes through the async proxy: the fence orders the two. K and V are read by wgmma,
    itself in the async proxy, and need none."""
    if HAS_GATE:
        fence_async_shared()
    mbarrier.arrive(empty_bar, count=1)


@gluon.jit
def _tile_gate_terms(p_row, offs_n, n0, seqlen, GATE_CHUNK: gl.constexpr, CHUNKS: gl.constexpr):
    """For the key tile [n0, n0 + BLOCK_N) left of the diagonal: what its keys add to their
    loaded suffix sums S (which end at their own chunk's end) to become suffix sums to the
    tile's end, the totals of the tile's later chunks (tiles.py, tile_suffix), and the tile's
    gate total. Scalar loads only: with one chunk per tile (D = 128) one load and no carry."""
    carry = gl.zeros_like(offs_n, dtype=gl.float32)
    total = _chunk_total(p_row, n0, seqlen, GATE_CHUNK)
    for c in gl.static_range(1, CHUNKS):
        chunk = _chunk_total(p_row, n0 + c * GATE_CHUNK, seqlen, GATE_CHUNK)
        carry += gl.where(offs_n < n0 + c * GATE_CHUNK, chunk, 0.0)
        total += chunk
    return carry, total


@gluon.jit
def _scores(s, slot, n0, r0, offs_m, row_offset, key_carry, s_bufs, seqlen, window, qk_scale,
            BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HAS_GATE: gl.constexpr, DIAGONAL: gl.constexpr):
    """The base-2 logits of the key tile [n0, n0 + BLOCK_N) from the raw products s = Q K^T,
    and the row term of their decay that the softmax still owes them (tiles.py, "Applying the
    decay at no per-element cost"). row_offset [BLOCK_M]: L_t of the rows (DIAGONAL), or
    L_t + between (the gates between the tile and r0) for a tile left of the diagonal.

    * DIAGONAL (n0 == r0): keys and queries interleave, so the decay L_t - L_j is formed per
      pair (L_j = L_t of the row j), exactly 0 for j = t; no row term is left;
    * left of it: L_t - L_j = (L_t + between) + S_tile[j]; the key term (the loaded suffix
      sums plus key_carry) is added where the products are scaled, the row term joins the
      running maximum.

    Masked (-inf): the diagonal tile, and a tile reaching below the window of the block's top
    row; every other tile is visible to every row and takes no mask."""
    keys_layout: gl.constexpr = gl.SliceLayout(0, s.type.layout)
    offs_n = n0 + gl.arange(0, BLOCK_N, layout=keys_layout)
    row_shift = row_offset
    if DIAGONAL:
        distance = gl.expand_dims(offs_m, 1) - gl.expand_dims(offs_n, 0)
        if HAS_GATE:
            key_offset = gl.convert_layout(row_offset, keys_layout)
            decay = gl.expand_dims(row_offset, 1) - gl.expand_dims(key_offset, 0)
            s = s * qk_scale + gl.where(distance == 0, 0.0, decay)
            row_shift = gl.zeros_like(row_offset)
        else:
            s = s * qk_scale
        visible = (distance >= 0) & (distance < window) & gl.expand_dims(offs_n < seqlen, 0)
        s = gl.where(visible, s, float("-inf"))
    else:
        if HAS_GATE:
            key_term = s_bufs.index(slot).load(keys_layout) + key_carry
            s = s * qk_scale + gl.expand_dims(key_term, 0)
        else:
            s = s * qk_scale
        if n0 < r0 + BLOCK_M - window:
            distance = gl.expand_dims(offs_m, 1) - gl.expand_dims(offs_n, 0)
            s = gl.where(distance < window, s, float("-inf"))
    return s, row_shift


@gluon.jit
def _consumer(q_desc, o_desc, q_bufs, q_bars, k_bufs, v_bufs, s_bufs, ready, empty, turn,
              SUMS, LSE, batch, q_col, row_offset, m0, seqlen, window, qk_scale,
              CONSUMER: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              GATE_CHUNK: gl.constexpr, STAGES: gl.constexpr, HAS_GATE: gl.constexpr):
    """Consumer warpgroup CONSUMER (0: rows [m0, m0 + BLOCK_M), 1: the next BLOCK_M): loads its
    q block, folds every key tile of the stream it can see into its online softmax, and stores
    its o rows (TMA) and lse2 rows. SUMS: the gate sums [2, B, HQ, T] float32 (prefix plane
    first); row_offset = (batch * HQ + head) * T, this batch row and head's row of the prefix
    plane and of lse2 [B, HQ, T]."""
    dtype: gl.constexpr = q_desc.dtype
    # Accumulator layouts of the two matmuls, S = Q K^T [BLOCK_M, BLOCK_N] and O [BLOCK_M, D]:
    # one warpgroup along the rows, wgmma instructions of 16 rows. P enters the second matmul
    # from registers, in the operand layout of O's (k_width 2: two 16-bit values per register).
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    rows_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    keys_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    o_rows_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    CHUNKS: gl.constexpr = BLOCK_N // GATE_CHUNK

    r0 = m0 + CONSUMER * BLOCK_M
    top, num_tiles = _stream(m0, seqlen, window, BLOCK_M, BLOCK_N)
    first, last = _visible_tiles(r0, top, seqlen, window, BLOCK_M, BLOCK_N)
    has_rows = first < last

    # The q block (rows past T read as zeros) through TMA; its buffer later stages o.
    q_smem = q_bufs.index(CONSUMER)
    q_bar = q_bars.index(CONSUMER)
    mbarrier.expect(q_bar, q_desc.block_type.nbytes, pred=has_rows)
    _tma_load(q_desc, [batch, r0, q_col], q_bar, q_smem, pred=has_rows)

    offs_m = r0 + gl.arange(0, BLOCK_M, layout=rows_layout)
    p_row = SUMS + row_offset
    # L_t of the rows, measured from r0 - 1 (docs/math.md): each row's prefix sum inside its
    # chunk plus the totals of the block's chunks before it (tiles.py, tile_prefix).
    query_offset = gl.zeros([BLOCK_M], gl.float32, layout=rows_layout)
    if HAS_GATE:
        query_offset = gl.load(p_row + offs_m, mask=offs_m < seqlen, other=0.0)
        for c in gl.static_range(1, CHUNKS):
            before = _chunk_total(p_row, r0 + (c - 1) * GATE_CHUNK, seqlen, GATE_CHUNK)
            query_offset += gl.where(offs_m >= r0 + c * GATE_CHUNK, before, 0.0)
    key_carry = gl.zeros([BLOCK_N], gl.float32, layout=keys_layout)
    tile_total = 0.0
    # The gates between the current key tile's end and r0: L_j = -(S_tile[j] + between) for a
    # tile left of the diagonal. Grows by one tile total per tile, all terms <= 0.
    between = 0.0

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=rows_layout)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=rows_layout)
    o_acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)

    for i in range(0, first):
        _skip_tile(i, ready, empty, turn, CONSUMER, STAGES)

    if has_rows:
        mbarrier.wait(q_bar, 0)
        q_op = q_smem.reshape([BLOCK_M, HEAD_DIM])

        # The first visible tile (the diagonal): S only, nothing to add to O yet.
        slot = first % STAGES
        n0 = top - first * BLOCK_N
        mbarrier.wait(ready.index(slot), (first // STAGES) & 1)
        mbarrier.wait(turn.index(CONSUMER), (first + 1 - CONSUMER) & 1)
        s_tok = warpgroup_mma(q_op, k_bufs.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), zero_s,
                              use_acc=False, is_async=True)
        mbarrier.arrive(turn.index(1 - CONSUMER), count=1)
        s = warpgroup_mma_wait(0, deps=(s_tok, ))
        s, row_shift = _scores(s, slot, n0, r0, offs_m, query_offset, key_carry, s_bufs, seqlen, window, qk_scale,
                               BLOCK_M, BLOCK_N, HAS_GATE, True)
        p_new, m_i, l_i, correction = _softmax_tile(s, m_i, l_i, row_shift, HAS_GATE)
        p = gl.convert_layout(p_new.to(dtype), p_layout)

        for i in range(first + 1, last):
            slot = i % STAGES
            prev = (i - 1) % STAGES
            n0 = top - i * BLOCK_N
            if HAS_GATE:
                # Scalar loads, issued before the waits so that their latency hides behind them.
                key_carry, tile_total = _tile_gate_terms(p_row, n0 + gl.arange(0, BLOCK_N, layout=keys_layout), n0,
                                                         seqlen, GATE_CHUNK, CHUNKS)
            mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
            mbarrier.wait(turn.index(CONSUMER), (i + 1 - CONSUMER) & 1)
            s_tok = warpgroup_mma(q_op, k_bufs.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), zero_s,
                                  use_acc=False, is_async=True)
            # O += P V of the previous tile, issued behind S so that it runs during this
            # tile's softmax.
            o_tok = warpgroup_mma(p, v_bufs.index(prev).reshape([BLOCK_N, HEAD_DIM]), o_acc, is_async=True)
            mbarrier.arrive(turn.index(1 - CONSUMER), count=1)
            s = warpgroup_mma_wait(1, deps=(s_tok, ))
            s, row_shift = _scores(s, slot, n0, r0, offs_m, query_offset + between, key_carry, s_bufs, seqlen,
                                   window, qk_scale, BLOCK_M, BLOCK_N, HAS_GATE, False)
            if HAS_GATE:
                between += tile_total
            p_new, m_i, l_i, correction = _softmax_tile(s, m_i, l_i, row_shift, HAS_GATE)
            o_acc, p = warpgroup_mma_wait(0, deps=(o_tok, p))
            _release(empty.index(prev), HAS_GATE)
            o_acc = o_acc * gl.expand_dims(gl.convert_layout(correction, o_rows_layout), 1)
            p = gl.convert_layout(p_new.to(dtype), p_layout)

        # The last tile's P V.
        prev = (last - 1) % STAGES
        o_tok = warpgroup_mma(p, v_bufs.index(prev).reshape([BLOCK_N, HEAD_DIM]), o_acc, is_async=True)
        o_acc, p = warpgroup_mma_wait(0, deps=(o_tok, p))
        _release(empty.index(prev), HAS_GATE)

    for i in range(last, num_tiles):
        _skip_tile(i, ready, empty, turn, CONSUMER, STAGES)

    if has_rows:
        # Epilogue: normalise (rows without a visible key, only rows past T, give 0 and
        # lse2 = -inf), o through the q buffer and TMA (rows past T are clipped), lse2.
        has_keys = l_i > 0.0
        l_safe = gl.where(has_keys, l_i, 1.0)
        out = o_acc / gl.expand_dims(gl.convert_layout(l_safe, o_rows_layout), 1)
        q_smem.reshape([BLOCK_M, HEAD_DIM]).store(out.to(dtype))
        fence_async_shared()
        _tma_store(o_desc, [batch, r0, q_col], q_smem)
        lse = gl.where(has_keys, m_i + gl.log2(l_safe), float("-inf"))
        gl.store(LSE + row_offset + offs_m, lse, mask=offs_m < seqlen)
        tma.store_wait(0)


@gluon.jit
def _gluon_forward_kernel(
    q_desc, k_desc, v_desc, o_desc, s_desc, SUMS, LSE,
    seqlen, num_q_heads, window, qk_scale, sums_plane,
    GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    GATE_CHUNK: gl.constexpr, STAGES: gl.constexpr, HAS_GATE: gl.constexpr,
):
    """One program: query rows [m0, m0 + 2 BLOCK_M) of batch row program_id(1) and query head
    program_id(2). q_desc/o_desc: [B, T, HQ * D] in tiles [1, BLOCK_M, D]; k_desc/v_desc:
    [B, T, H * D] in tiles [1, BLOCK_N, D]; s_desc: the gate sums flattened, tiles [BLOCK_N]
    (None without gate); SUMS the same sums as a pointer, sums_plane the offset of the suffix
    plane; LSE: lse2 [B, HQ, T]."""
    gl.static_assert(BLOCK_M == BLOCK_N, "the diagonal key tile must be the row block itself")
    m0 = gl.program_id(0) * (2 * BLOCK_M)
    batch = gl.program_id(1)
    head = gl.program_id(2)
    q_col = head * HEAD_DIM
    kv_col = (head // GROUP) * HEAD_DIM
    row_offset = (batch * num_q_heads + head) * seqlen

    q_bufs = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    if HAS_GATE:
        s_bufs = gl.allocate_shared_memory(s_desc.dtype, [STAGES] + s_desc.block_type.shape, s_desc.layout)
    else:
        s_bufs = k_bufs  # never read
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)  # one release per consumer
    for c in gl.static_range(2):
        mbarrier.init(turn.index(c), count=1)
        mbarrier.init(q_bars.index(c), count=1)

    gl.warp_specialize([
        (_consumer, (q_desc, o_desc, q_bufs, q_bars, k_bufs, v_bufs, s_bufs, ready, empty, turn, SUMS, LSE, batch,
                     q_col, row_offset, m0, seqlen, window, qk_scale, 0, HEAD_DIM, BLOCK_M, BLOCK_N, GATE_CHUNK,
                     STAGES, HAS_GATE)),
        (_consumer, (q_desc, o_desc, q_bufs, q_bars, k_bufs, v_bufs, s_bufs, ready, empty, turn, SUMS, LSE, batch,
                     q_col, row_offset, m0, seqlen, window, qk_scale, 1, HEAD_DIM, BLOCK_M, BLOCK_N, GATE_CHUNK,
                     STAGES, HAS_GATE)),
        (_producer, (k_desc, v_desc, s_desc, k_bufs, v_bufs, s_bufs, ready, empty, batch, kv_col,
                     sums_plane + row_offset, m0, seqlen, window, BLOCK_M, BLOCK_N, STAGES, HAS_GATE)),
    ], [4, 1], [_CONSUMER_REGISTERS, _PRODUCER_REGISTERS])


# --------------------------------------------------------------------------------------
# Host side: which calls the kernel takes, its descriptors, the launch
# --------------------------------------------------------------------------------------

_GLUON_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}
# The gate sums' tiles in shared memory: one unswizzled row of float32.
_SUMS_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)


def _rows_layout(head_dim: int, dtype: torch.dtype):
    """The shared-memory layout of q, k, v and o tiles [1, 64, head_dim] (TMA's and wgmma's)."""
    return gl.NVMMASharedLayout.get_default_for([1, BLOCK_M, head_dim], _GLUON_DTYPES[dtype])


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sums: torch.Tensor | None,
                       cu_seqlens: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None,
                       gate_chunk: int) -> str | None:
    """Why the Gluon kernel cannot serve this forward call, or None when it can. The arguments
    are attention_forward's (forward.py), checked and contiguous; gate_chunk is the chunk
    length of sums (launch.gate_chunk)."""
    if not q.is_cuda or torch.version.hip is not None:
        return "not on an NVIDIA GPU"
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return "not a Hopper GPU (compute capability 9)"
    if q.dtype not in _GLUON_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype} (the kernel takes float16 and bfloat16)"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head size {q.shape[-1]} (the kernel takes {', '.join(map(str, HEAD_DIMS))})"
    if cu_seqlens is not None or cu_seqlens_q is not None:
        return "packed sequences (cu_seqlens)"
    if q.shape[1] != k.shape[1]:
        return "fewer queries than keys"
    if sums is not None and (BLOCK_N % gate_chunk or sums.numel() >= 2**31):
        return f"gate chunk {gate_chunk} or gate sums of {sums.numel()} elements"
    for x in (q, k, v) + (() if sums is None else (sums,)):
        if x.data_ptr() % 16 or not x.is_contiguous():
            return "a tensor not contiguous or not 16-byte aligned (TMA)"
    return None


def supports(q, k, v, sums, cu_seqlens, cu_seqlens_q, gate_chunk: int) -> bool:
    """Whether the Gluon kernel serves this forward call (unsupported_reason is None)."""
    return unsupported_reason(q, k, v, sums, cu_seqlens, cu_seqlens_q, gate_chunk) is None


def _heads_descriptor(x: torch.Tensor) -> TensorDescriptor:
    """[B, T, heads, D] contiguous as [B, T, heads * D] in tiles [1, 64, D]: a tile is one
    head's 64 positions, and positions past T read as zeros (and are not written)."""
    batch, seqlen, heads, head_dim = x.shape
    flat = x.view(batch, seqlen, heads * head_dim)
    return TensorDescriptor(flat, [batch, seqlen, heads * head_dim], [seqlen * heads * head_dim, heads * head_dim, 1],
                            [1, BLOCK_M, head_dim], _rows_layout(head_dim, x.dtype))


def gluon_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sums: torch.Tensor | None,
                            window: int, scale: float, gate_chunk: int, o: torch.Tensor, lse: torch.Tensor) -> None:
    """Fill o [B, T, HQ, D] (q's dtype) and lse [B, HQ, T] float32 (base 2) for q [B, T, HQ, D],
    k/v [B, T, H, D] and the gate sums [2, B, HQ, T] float32 at chunk length gate_chunk (or
    None without gate); window: keys per query, at most T (launch.Problem.window). The caller
    (forward.attention_forward) checks `supports` and handles T == 0."""
    batch, seqlen, num_q_heads, head_dim = q.shape
    group = num_q_heads // k.shape[2]
    if sums is not None:
        s_desc = TensorDescriptor(sums.view(-1), [sums.numel()], [1], [BLOCK_N], _SUMS_LAYOUT)
        sums_pointer, sums_plane = sums, sums.stride(0)
    else:
        s_desc, sums_pointer, sums_plane = None, lse, 0  # never read
    grid = (cdiv(seqlen, 2 * BLOCK_M), batch, num_q_heads)
    _gluon_forward_kernel[grid](
        _heads_descriptor(q), _heads_descriptor(k), _heads_descriptor(v), _heads_descriptor(o), s_desc,
        sums_pointer, lse, seqlen, num_q_heads, window, scale * LOG2E, sums_plane,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, GATE_CHUNK=gate_chunk,
        HAS_GATE=sums is not None, num_warps=4, maxnreg=MAX_REGISTERS, **kernel_config(head_dim),
    )


def compile_for_hopper(head_dim: int, has_gate: bool, dtype: torch.dtype = torch.bfloat16, group: int = 1,
                       gate_chunk: int | None = None):
    """Compile the kernel for sm_90 without a GPU (Triton ships ptxas), specialised as
    gluon_attention_forward would launch it; returns Triton's compiled kernel, whose
    asm["cubin"] is the machine code. gate_chunk: default launch.gate_chunk_on(head_dim, "sm90")."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    element = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    rows = f"tensordesc<{element}[1,{BLOCK_M},{head_dim}],{_rows_layout(head_dim, dtype)!r}>"
    constants = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                     GATE_CHUNK=gate_chunk or launch.gate_chunk_on(head_dim, "sm90"), HAS_GATE=has_gate,
                     **kernel_config(head_dim))
    if not has_gate:
        constants["s_desc"] = None
    kernel = _gluon_forward_kernel
    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_desc"):
            signature[name] = rows if name != "s_desc" else f"tensordesc<fp32[{BLOCK_N}],{_SUMS_LAYOUT!r}>"
        elif name in ("SUMS", "LSE"):
            signature[name] = "*fp32"
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
    source = GluonASTSource(fn=kernel, signature=signature,
                            constexprs={(kernel.arg_names.index(name),): value for name, value in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=4, maxnreg=MAX_REGISTERS))
