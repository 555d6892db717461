"""Triton decode step in one launch: one program per (batch row, key/value head, slot split,
row block) serves every query head of that key/value head and every new token, so the cached
keys and values are read once per step. At small batch the slots are split over several
programs (flash-decoding); the program of a (batch row, kv head, row block) that finishes
last merges the splits' partial results, so no second kernel runs. op.py has the math;
torch_path.py the PyTorch version this is tested against."""

from __future__ import annotations

import torch

from gatedfwa.ops.decode.cache import WindowLayerCache
from gatedfwa.ops.decode.launch import decode_config, split_slots
from gatedfwa.ops.common.online_softmax import softmax_lse, softmax_output, softmax_step
from gatedfwa.ops.common.triton_support import LOG2E, LOG2E_CONSTEXPR, cdiv, dot_precision, jit, next_power_of_2, tl

__all__ = ["decode_attention_triton", "launch_decode"]

MERGE_TILE_ELEMENTS = 8192
"""Most float32 partial-output elements the merging program loads per round (splits x rows x
head dim): 64 registers a thread at 4 warps, a power of two. A round takes the split count
rounded up to a power of two when that is fewer, so that two splits (batch 64) do not hold
registers for sixteen in every program of the launch; a growing cache then compiles at most
one kernel per power of two of its split count."""


@jit
def _merge_splits(PART_O, PART_LSE, first_partial, num_splits, rows_ok,
                  PARTIAL_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, MERGE_SPLITS: tl.constexpr):
    """Merge the partials of every split by log-sum-exp: o [PARTIAL_ROWS, BLOCK_D] float32.

    Split s's partial of local row r sits at row first_partial + s * PARTIAL_ROWS + r of
    PART_LSE (its base-2 log-sum-exp, -inf when the split saw no key of that row) and of
    PART_O (its normalised output). MERGE_SPLITS splits are loaded per round, and the running
    result is rescaled to each round's maximum (an online log-sum-exp over the splits)."""
    local = tl.arange(0, PARTIAL_ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    total_max = tl.full([PARTIAL_ROWS], float("-inf"), dtype=tl.float32)
    total_weight = tl.zeros([PARTIAL_ROWS], dtype=tl.float32)
    acc = tl.zeros([PARTIAL_ROWS, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, num_splits, MERGE_SPLITS):
        splits = s0 + tl.arange(0, MERGE_SPLITS)
        ok = (splits < num_splits)[:, None] & rows_ok[None, :]
        partial = first_partial + splits[:, None] * PARTIAL_ROWS + local[None, :]  # [MERGE_SPLITS, PARTIAL_ROWS]
        # .cg: read at the L2, where the other programs' stores are, never a stale L1 line.
        lse = tl.load(PART_LSE + partial, mask=ok, other=float("-inf"), cache_modifier=".cg")
        part_o = tl.load(PART_O + partial[:, :, None] * BLOCK_D + offs_d[None, None, :], mask=ok[:, :, None],
                         other=0.0, cache_modifier=".cg")
        new_max = tl.maximum(total_max, tl.max(lse, 0))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        correction = tl.math.exp2(total_max - safe_max)
        weight = tl.math.exp2(lse - safe_max[None, :])  # 0 for a split without visible key
        total_weight = total_weight * correction + tl.sum(weight, 0)
        acc = acc * correction[:, None] + tl.sum(weight[:, :, None] * part_o, 0)
        total_max = new_max
    # Every real row saw itself (in the last split): total_weight > 0.
    return acc / tl.where(rows_ok, total_weight, 1.0)[:, None]


# The positions, slot counts, splits and window change from step to step: specialising on
# their values (== 1, divisible by 16) would compile new variants in the middle of a
# generation. Slots are addressed through their strides, which stay specialised.
@jit(do_not_specialize=["first_position", "used_slots", "slots_per_split", "num_splits", "window"])
def _decode_kernel(
    Q, K_NEW, V_NEW, G_CUM,
    K_CACHE, V_CACHE, DECAYS, POSITIONS, NEXT_POSITION,
    O, PART_O, PART_LSE, SPLIT_COUNTERS,
    stride_qb, stride_ql, stride_qh,
    stride_knb, stride_knl, stride_knh,
    stride_vnb, stride_vnl, stride_vnh,
    stride_kcb, stride_kch, stride_kcw,
    stride_vcb, stride_vch, stride_vcw,
    stride_db, stride_dh,
    stride_pb,
    stride_ob, stride_ol, stride_oh,
    stride_counter_b,
    num_kv_heads, first_position, used_slots, slots_per_split, num_splits, window, qk_scale,
    LENGTH: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    PARTIAL_ROWS: tl.constexpr, MERGE_SPLITS: tl.constexpr,
    HAS_GATE: tl.constexpr, BOUNDED: tl.constexpr, SPLIT: tl.constexpr, UPDATE_DECAYS: tl.constexpr,
    POSITION_ON_DEVICE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (batch row b and kv head h, split, row block). Row r of the block stands for
    new token i = r // GROUP and query head h * GROUP + r % GROUP. With POSITION_ON_DEVICE
    the first new token's stream position is read from NEXT_POSITION (the static cache's
    0-d tensor) instead of the first_position argument, so a captured graph stays valid.

    With SPLIT, the program writes its partial result (per row: base-2 log-sum-exp and
    normalised output) and counts itself in on the group's counter in SPLIT_COUNTERS
    [B, HQ] int32 (entry h * GROUP + row block of row b); the program that arrives last
    merges every split's partial, writes the output and sets the counter back to 0, so
    the next launch (or the next replay of a captured graph) finds it zero."""
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    row_block = tl.program_id(2)
    b = pid_bh // num_kv_heads
    h = pid_bh % num_kv_heads

    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < LENGTH * GROUP
    token = rows // GROUP
    q_head = h * GROUP + rows % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + token[:, None] * stride_ql + q_head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if POSITION_ON_DEVICE:
        query_position = tl.load(NEXT_POSITION) + token
    else:
        query_position = first_position + token
    if HAS_GATE:
        # G_i = g_0 + ... + g_i of the new tokens; G_last = G_{L-1}, the step's total gate.
        g_row = G_CUM + b * LENGTH * GROUP * num_kv_heads
        gate_to_query = tl.load(g_row + token * GROUP * num_kv_heads + q_head, mask=row_ok, other=0.0)
        gate_total = tl.load(g_row + (LENGTH - 1) * GROUP * num_kv_heads + q_head, mask=row_ok, other=0.0)
        # Each query head's decays are updated once, by its row of the last new token.
        writes_decay = row_ok & (token == LENGTH - 1)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)

    # ---- cached slots [start, end): storage order; the softmax does not care about order.
    start = split * slots_per_split
    end = tl.minimum(start + slots_per_split, used_slots)
    k_base = K_CACHE + b * stride_kcb + h * stride_kch
    v_base = V_CACHE + b * stride_vcb + h * stride_vch
    for n0 in range(start, end, BLOCK_N):
        slots = n0 + tl.arange(0, BLOCK_N)
        slot_ok = slots < end
        k = tl.load(k_base + slots[None, :] * stride_kcw + offs_d[:, None],
                    mask=slot_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        position = tl.load(POSITIONS + b * stride_pb + slots, mask=slot_ok, other=-1)
        visible = row_ok[:, None] & (position >= 0)[None, :]
        if BOUNDED:
            visible = visible & (query_position[:, None] - position[None, :] < window)
        if HAS_GATE:
            decay_ptr = DECAYS + b * stride_db + q_head[:, None] * stride_dh + slots[None, :]
            tile_ok = row_ok[:, None] & slot_ok[None, :]
            decay = tl.load(decay_ptr, mask=tile_ok, other=0.0)
            s += (decay + gate_to_query[:, None]) * LOG2E_CONSTEXPR
            if UPDATE_DECAYS:
                tl.store(decay_ptr, decay + gate_total[:, None], mask=tile_ok & writes_decay[:, None])
        s = tl.where(visible, s, float("-inf"))
        v = tl.load(v_base + slots[:, None] * stride_vcw + offs_d[None, :],
                    mask=slot_ok[:, None] & d_ok[None, :], other=0.0)
        acc, row_max, row_sum = softmax_step(acc, row_max, row_sum, s, v, DOT_PRECISION)

    # ---- the new tokens themselves, in the last split.
    if split == num_splits - 1:
        fresh = tl.arange(0, BLOCK_L)
        fresh_ok = fresh < LENGTH
        k = tl.load(K_NEW + b * stride_knb + fresh[None, :] * stride_knl + h * stride_knh + offs_d[:, None],
                    mask=fresh_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        distance = token[:, None] - fresh[None, :]
        visible = row_ok[:, None] & fresh_ok[None, :] & (distance >= 0)
        if BOUNDED:
            visible = visible & (distance < window)
        if HAS_GATE:
            gate_to_key = tl.load(g_row + fresh[None, :] * GROUP * num_kv_heads + q_head[:, None],
                                  mask=row_ok[:, None] & fresh_ok[None, :], other=0.0)
            s += (gate_to_query[:, None] - gate_to_key) * LOG2E_CONSTEXPR
        s = tl.where(visible, s, float("-inf"))
        v = tl.load(V_NEW + b * stride_vnb + fresh[:, None] * stride_vnl + h * stride_vnh + offs_d[None, :],
                    mask=fresh_ok[:, None] & d_ok[None, :], other=0.0)
        acc, row_max, row_sum = softmax_step(acc, row_max, row_sum, s, v, DOT_PRECISION)

    if SPLIT:
        # The group's partials: PARTIAL_ROWS rows per split, the splits one after another.
        group = pid_bh * tl.num_programs(2) + row_block
        first_partial = group * num_splits * PARTIAL_ROWS
        local = tl.arange(0, BLOCK_M)
        stored = row_ok & (local < PARTIAL_ROWS)  # the block's real rows, all < PARTIAL_ROWS
        partial = first_partial + split * PARTIAL_ROWS + local
        tl.store(PART_LSE + partial, softmax_lse(row_max, row_sum), mask=stored)
        tl.store(PART_O + partial[:, None] * BLOCK_D + offs_d[None, :], softmax_output(acc, row_sum),
                 mask=stored[:, None])
        # Every thread's stores above are issued before the count (the barrier), and the
        # count releases them to the GPU (acq_rel): whoever reads the count as complete
        # (acquires it) then sees every split's partial.
        tl.debug_barrier()
        counter = SPLIT_COUNTERS + b * stride_counter_b + h * GROUP + row_block
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        if arrived == num_splits - 1:
            merge_rows = row_block * BLOCK_M + tl.arange(0, PARTIAL_ROWS)
            merge_ok = merge_rows < LENGTH * GROUP
            out = _merge_splits(PART_O, PART_LSE, first_partial, num_splits, merge_ok,
                                PARTIAL_ROWS, BLOCK_D, MERGE_SPLITS)
            merge_token = merge_rows // GROUP
            merge_head = h * GROUP + merge_rows % GROUP
            tl.store(O + b * stride_ob + merge_token[:, None] * stride_ol + merge_head[:, None] * stride_oh
                     + offs_d[None, :], out.to(O.dtype.element_ty), mask=merge_ok[:, None] & d_ok[None, :])
            # Every split has counted itself in: nothing else touches the counter in this
            # launch, and the next launch starts after this one ends.
            tl.store(counter, 0)
    else:
        # Every real row saw itself: row_sum >= 1.
        out = acc / tl.where(row_ok, row_sum, 1.0)[:, None]
        tl.store(O + b * stride_ob + token[:, None] * stride_ol + q_head[:, None] * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def decode_attention_triton(
    q, k_new, v_new, g_new, cache: WindowLayerCache, scale: float, update_decays: bool = False,
    position_on_device: bool = False, **overrides,
) -> torch.Tensor:
    """Triton version of :func:`decode_attention_torch`. With ``update_decays`` the kernel
    also adds the step's gates to the cached decays (the rest of the append is left to
    ``cache.append(..., shift_decays=False)``). With ``position_on_device`` (a
    StaticWindowLayerCache) the position is read from ``cache.next_position`` on the device
    and all slots are scanned. ``overrides`` (block_m, block_n, num_splits, num_warps,
    num_stages) replace the default config, for tests and tuning."""
    return launch_decode(
        q, k_new, v_new, g_new, cache.keys, cache.values, cache.decays, cache.positions, cache.split_counters,
        cache.next_position if position_on_device else None,
        0 if position_on_device else cache.seen_tokens, cache.slots_in_use, cache.window_size, scale,
        update_decays, **overrides,
    )


def launch_decode(
    q, k_new, v_new, g_new, keys, values, decays, positions, split_counters, next_position, first_position: int,
    used: int, window_size: int | None, scale: float, update_decays: bool = False, **overrides,
) -> torch.Tensor:
    """The kernel on explicit cache tensors (keys/values [B, H, W, D], decays [B, HQ, W] or
    None, positions [B, W], split_counters [B, HQ] int32, zero); ``next_position`` (0-d
    int64 tensor) or ``first_position`` (int) gives the stream position of the first new
    token; slots [0, used) are scanned. One launch; returns o [B, L, HQ, D].

    Allocates nothing that depends on a host value but the shapes, so a captured CUDA graph
    replays it as it is (the split workspace comes from the graph's pool, the counters are
    the cache's and are left at zero)."""
    batch, length, num_q_heads, head_dim = q.shape
    num_kv_heads = k_new.shape[2]
    group = num_q_heads // num_kv_heads
    config = decode_config(batch, num_kv_heads, group, length, head_dim, used, q.device, q.element_size())
    config.update(overrides)
    block_m, block_n = config["block_m"], config["block_n"]
    block_d = max(16, next_power_of_2(head_dim))
    block_l = max(16, next_power_of_2(length))
    row_blocks = cdiv(length * group, block_m)
    slots_per_split, num_splits = split_slots(used, config["num_splits"], block_n)

    q, k_new, v_new = q.contiguous(), k_new.contiguous(), v_new.contiguous()
    has_gate = g_new is not None
    if not has_gate:
        g_cum = q  # never read (HAS_GATE is off); any tensor will do
    elif length == 1:
        g_cum = g_new.float().contiguous()  # the inclusive sum of one gate is the gate
    else:
        g_cum = g_new.float().cumsum(1).contiguous()
    decays = decays if has_gate else q
    o = torch.empty_like(q)
    split = num_splits > 1
    # A row block's real rows: all of them fit PARTIAL_ROWS, the partials' rows per split.
    partial_rows = min(block_m, next_power_of_2(length * group))
    merge_splits = max(1, min(next_power_of_2(num_splits) if split else 1,
                              MERGE_TILE_ELEMENTS // (partial_rows * block_d)))
    if split:
        # A (batch row, kv head, row block) counts on entry h * group + row block of row b.
        if tuple(split_counters.shape) != (batch, num_q_heads) or split_counters.dtype != torch.int32:
            raise ValueError(f"split_counters must be int32 of shape [batch={batch}, query_heads={num_q_heads}], "
                             f"got {split_counters.dtype} {tuple(split_counters.shape)}")
        if row_blocks > group:
            raise ValueError(f"block_m={block_m} cuts the {length * group} rows into {row_blocks} row blocks, more "
                             f"than the {group} split counters of a kv head; use a larger block_m")
        partials = batch * num_kv_heads * row_blocks * num_splits * partial_rows
        part_o = torch.empty((partials, block_d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((partials,), dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = o  # never touched (SPLIT is off)
    window = window_size if window_size is not None else 0
    _decode_kernel[(batch * num_kv_heads, num_splits, row_blocks)](
        q, k_new, v_new, g_cum,
        keys, values, decays, positions, next_position if next_position is not None else positions,
        o, part_o, part_lse, split_counters,
        q.stride(0), q.stride(1), q.stride(2),
        k_new.stride(0), k_new.stride(1), k_new.stride(2),
        v_new.stride(0), v_new.stride(1), v_new.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        decays.stride(0) if has_gate else 0, decays.stride(1) if has_gate else 0,
        positions.stride(0),
        o.stride(0), o.stride(1), o.stride(2),
        split_counters.stride(0),
        num_kv_heads, first_position, used, slots_per_split, num_splits, window, scale * LOG2E,
        LENGTH=length, GROUP=group, HEAD_DIM=head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_L=block_l, BLOCK_D=block_d,
        PARTIAL_ROWS=partial_rows, MERGE_SPLITS=merge_splits,
        HAS_GATE=has_gate, BOUNDED=window_size is not None, SPLIT=split,
        UPDATE_DECAYS=update_decays and has_gate, POSITION_ON_DEVICE=next_position is not None,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return o
