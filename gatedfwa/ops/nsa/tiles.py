"""Triton helpers shared by the NSA kernels: the query-row layout of layout.py, masked tile
loads, probabilities from a stored log-sum-exp, and the end marker of block lists. (Sequence
bounds and the online softmax: gatedfwa/ops/common/varlen.py and online_softmax.py.)

Logits are kept in base 2 (scaled by log2(e) once), as in the window attention kernels
(gatedfwa/ops/window_attention/), so the kernels use exp2/log2 and every log-sum-exp they
store is lse2 = lse * log2(e).
"""

from __future__ import annotations

from gatedfwa.ops.common.triton_support import jit, tl
from gatedfwa.ops.common.varlen import query_bounds, sequence_bounds

# A block number after every real one: marks a finished block list (selected.py) and a list
# slot without a block (selection.py).
NO_BLOCK = tl.constexpr(1 << 30)


@jit
def check_tiles(GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, ROWS: tl.constexpr, KEY_TILE: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Compile-time checks of a kernel's tiles (launch.TUNING's rules keep them): ROWS
    (query, head) rows are whole groups of GROUP_PAD rows (query_rows: row r is query
    r // GROUP_PAD) and a power of two; KEY_TILE, the summaries or keys per tile (BLOCK_C,
    BLOCK_K), a power of two of at least 16 (a tensor-core product's side); BLOCK_D holds
    the head."""
    tl.static_assert(GROUP_PAD >= GROUP, "GROUP_PAD must hold the group (its size rounded up to a power of two)")
    tl.static_assert(ROWS % GROUP_PAD == 0, "ROWS must be whole groups: a multiple of GROUP_PAD")
    tl.static_assert(ROWS & (ROWS - 1) == 0, "ROWS must be a power of two")
    tl.static_assert(KEY_TILE >= 16 and KEY_TILE & (KEY_TILE - 1) == 0,
                     "the summary or key tile (BLOCK_C, BLOCK_K) must be a power of two of at least 16")
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D must hold the head")


@jit
def query_tile(CU_SEQLENS, CU_SEQLENS_Q, seqlen, seqlen_q, BLOCK_Q: tl.constexpr, VARLEN: tl.constexpr,
               FEWER_QUERIES: tl.constexpr):
    """The program's (sequence, kv head, [bos, eos) of the sequence's keys, first query t0 as
    a key position, shift: query row = key position + shift) for the grid of layout.grid:
    axis 0 tiles of BLOCK_Q queries, 1 sequences, 2 kv heads. The queries of a sequence are
    its last key positions (layout.py); without FEWER_QUERIES, all of them (shift 0)."""
    seq = tl.program_id(1)
    bos, eos = sequence_bounds(CU_SEQLENS, seq, seqlen, VARLEN)
    query_start, shift = query_bounds(CU_SEQLENS_Q, seq, seqlen_q, bos, eos, VARLEN, FEWER_QUERIES)
    return seq, tl.program_id(2), bos, eos, query_start + tl.program_id(0) * BLOCK_Q, shift


@jit
def summary_bounds(summary_offsets, seq, summaries_per_seq, VARLEN: tl.constexpr):
    """(first summary row, number of summaries) of sequence `seq`."""
    if VARLEN:
        first = tl.load(summary_offsets + seq).to(tl.int32)
        count = tl.load(summary_offsets + seq + 1).to(tl.int32) - first
    else:
        first = seq * summaries_per_seq
        count = summaries_per_seq
    return first, count


@jit
def query_rows(t0, eos, kv_head, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, ROWS: tl.constexpr):
    """The rows of a tile of consecutive queries starting at token t0 (layout.py): per row its
    token position, query head, and whether it is real (inside the sequence, not padding)."""
    r = tl.arange(0, ROWS)
    position = t0 + r // GROUP_PAD
    head_in_group = r % GROUP_PAD
    valid = (position < eos) & (head_in_group < GROUP)
    return position, kv_head * GROUP + head_in_group, valid


@jit
def query_tile_rows(Q, CU_SEQLENS, CU_SEQLENS_Q, seqlen, seqlen_q, stride_qt, stride_qh, GROUP: tl.constexpr,
                    GROUP_PAD: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    VARLEN: tl.constexpr, FEWER_QUERIES: tl.constexpr):
    """The prologue of every kernel with one program per query tile (layout.grid): query_tile,
    its rows (query_rows), and their q [ROWS, BLOCK_D]. Returns (seq, kv_head, bos, eos, t0,
    position, row, head, valid, offs_d, q): position is each row's key position (for masks
    and blocks), row = position + shift its query row (for q, o, lse, do, dq, indices). The
    caller returns at once when t0 >= eos (an empty tile: every row invalid, q all 0)."""
    BLOCK_Q: tl.constexpr = ROWS // GROUP_PAD
    seq, kv_head, bos, eos, t0, shift = query_tile(CU_SEQLENS, CU_SEQLENS_Q, seqlen, seqlen_q, BLOCK_Q, VARLEN,
                                                   FEWER_QUERIES)
    position, head, valid = query_rows(t0, eos, kv_head, GROUP, GROUP_PAD, ROWS)
    row = position + shift
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(Q, row, head, valid, offs_d, stride_qt, stride_qh, HEAD_DIM)
    return seq, kv_head, bos, eos, t0, position, row, head, valid, offs_d, q


@jit
def load_gradient_rows(DO, LSE, DELTA, row, head, valid, offs_d, stride_dot, stride_doh, num_q_heads,
                       HEAD_DIM: tl.constexpr):
    """What every backward kernel reads per query row (row: the query's row, not its key
    position) besides q: do [ROWS, BLOCK_D], the forward's lse2 (-inf where not valid) and
    delta = rowsum(o * do) (0 where not valid)."""
    do = load_rows(DO, row, head, valid, offs_d, stride_dot, stride_doh, HEAD_DIM)
    lse = tl.load(LSE + row * num_q_heads + head, mask=valid, other=float("-inf"))
    delta = tl.load(DELTA + row * num_q_heads + head, mask=valid, other=0.0)
    return do, lse, delta


@jit
def load_rows(ptr, position, head, valid, offs_d, stride_t, stride_h, HEAD_DIM: tl.constexpr):
    """[ROWS, BLOCK_D] rows (token position, head) of a [tokens, heads, D] tensor; 0 where not valid."""
    mask = valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    return tl.load(ptr + position[:, None] * stride_t + head[:, None] * stride_h + offs_d[None, :], mask=mask,
                   other=0.0)


@jit
def store_rows(ptr, value, position, head, valid, offs_d, stride_t, stride_h, HEAD_DIM: tl.constexpr):
    mask = valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    tl.store(ptr + position[:, None] * stride_t + head[:, None] * stride_h + offs_d[None, :],
             value.to(ptr.dtype.element_ty), mask=mask)


@jit
def add_rows(ptr, value, position, head, valid, offs_d, stride_t, stride_h, HEAD_DIM: tl.constexpr):
    """Atomically add value [ROWS, BLOCK_D] into rows (token position, head) of a float32
    [tokens, heads, D] tensor (rows that several programs add into)."""
    mask = valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    tl.atomic_add(ptr + position[:, None] * stride_t + head[:, None] * stride_h + offs_d[None, :], value, mask=mask,
                  sem="relaxed")


@jit
def load_keys(ptr, rows, row_ok, head, offs_d, stride_t, stride_h, HEAD_DIM: tl.constexpr,
              TRANSPOSED: tl.constexpr):
    """Keys (values) of one kv head at the given rows: [BLOCK_D, N] when TRANSPOSED, else
    [N, BLOCK_D]; 0 where the row is not ok."""
    if TRANSPOSED:
        mask = row_ok[None, :] & (offs_d[:, None] < HEAD_DIM)
        return tl.load(ptr + rows[None, :] * stride_t + head * stride_h + offs_d[:, None], mask=mask, other=0.0)
    else:
        mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        return tl.load(ptr + rows[:, None] * stride_t + head * stride_h + offs_d[None, :], mask=mask, other=0.0)


@jit
def probabilities(s, lse2):
    """exp2(s - lse2) per row; rows with lse2 = -inf (nothing visible) give 0."""
    safe = tl.where(lse2 == float("-inf"), 0.0, lse2)
    p = tl.math.exp2(s - safe[:, None])
    return tl.where((lse2 == float("-inf"))[:, None], 0.0, p)
