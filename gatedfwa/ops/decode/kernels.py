"""Triton decode step: one program per (batch row, key/value head, slot split) serves every
query head of that key/value head and every new token, so the cached keys and values are read
once per step; at small batch the slots are split over several programs (flash-decoding) whose
partial softmax results _combine_kernel merges. op.py has the math; torch_path.py the PyTorch
version this is tested against."""

from __future__ import annotations

import torch

from gatedfwa.ops.decode.cache import WindowLayerCache
from gatedfwa.ops.decode.launch import decode_config
from gatedfwa.ops.common.online_softmax import softmax_step
from gatedfwa.ops.common.triton_support import LOG2E, LOG2E_CONSTEXPR, cdiv, dot_precision, jit, next_power_of_2, tl

__all__ = ["decode_attention_triton", "launch_decode"]


@jit
def _decode_kernel(
    Q, K_NEW, V_NEW, G_CUM,
    K_CACHE, V_CACHE, DECAYS, POSITIONS, NEXT_POSITION,
    O, PART_O, PART_MAX, PART_SUM,
    stride_qb, stride_ql, stride_qh,
    stride_knb, stride_knl, stride_knh,
    stride_vnb, stride_vnl, stride_vnh,
    stride_kcb, stride_kch, stride_kcw,
    stride_vcb, stride_vch, stride_vcw,
    stride_db, stride_dh,
    stride_pb,
    stride_ob, stride_ol, stride_oh,
    num_kv_heads, first_position, used_slots, slots_per_split, num_splits, window, qk_scale,
    LENGTH: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_GATE: tl.constexpr, BOUNDED: tl.constexpr, SPLIT: tl.constexpr, UPDATE_DECAYS: tl.constexpr,
    POSITION_ON_DEVICE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (batch row b and kv head h, split, row block). Row r of the block stands for
    new token i = r // GROUP and query head h * GROUP + r % GROUP. With POSITION_ON_DEVICE
    the first new token's stream position is read from NEXT_POSITION (the static cache's
    0-d tensor) instead of the first_position argument, so a captured graph stays valid."""
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
        part = (pid_bh * num_splits + split) * tl.num_programs(2) * BLOCK_M + rows
        tl.store(PART_MAX + part, row_max)
        tl.store(PART_SUM + part, row_sum)
        tl.store(PART_O + part[:, None] * BLOCK_D + offs_d[None, :], acc)
    else:
        # Every real row saw itself: row_sum >= 1.
        out = acc / tl.where(row_ok, row_sum, 1.0)[:, None]
        tl.store(O + b * stride_ob + token[:, None] * stride_ol + q_head[:, None] * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@jit
def _combine_kernel(
    PART_O, PART_MAX, PART_SUM, O,
    stride_ob, stride_ol, stride_oh,
    num_kv_heads, num_splits,
    LENGTH: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merge the per-split softmax partials of (batch row, kv head, row block)."""
    pid_bh = tl.program_id(0)
    row_block = tl.program_id(1)
    b = pid_bh // num_kv_heads
    h = pid_bh % num_kv_heads
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < LENGTH * GROUP
    offs_d = tl.arange(0, BLOCK_D)
    padded_rows = tl.num_programs(1) * BLOCK_M
    first = pid_bh * num_splits * padded_rows + rows

    total_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for split in range(num_splits):
        total_max = tl.maximum(total_max, tl.load(PART_MAX + first + split * padded_rows))
    safe_max = tl.where(total_max == float("-inf"), 0.0, total_max)
    total_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for split in range(num_splits):
        part = first + split * padded_rows
        weight = tl.math.exp2(tl.load(PART_MAX + part) - safe_max)
        total_sum += weight * tl.load(PART_SUM + part)
        acc += weight[:, None] * tl.load(PART_O + part[:, None] * BLOCK_D + offs_d[None, :])
    out = acc / tl.where(row_ok, total_sum, 1.0)[:, None]
    token = rows // GROUP
    q_head = h * GROUP + rows % GROUP
    tl.store(O + b * stride_ob + token[:, None] * stride_ol + q_head[:, None] * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


def decode_attention_triton(
    q, k_new, v_new, g_new, cache: WindowLayerCache, scale: float, update_decays: bool = False,
    position_on_device: bool = False, **overrides,
) -> torch.Tensor:
    """Triton version of :func:`decode_attention_torch`. With ``update_decays`` the kernel
    also adds the step's gates to the cached decays (the rest of the append is left to
    ``cache.append(..., shift_decays=False)``). With ``position_on_device`` (a
    StaticWindowLayerCache) the position is read from ``cache.next_position`` on the device
    and all slots are scanned. ``overrides`` (block_n, num_splits, num_warps, num_stages)
    replace the default config, for tests and tuning."""
    return launch_decode(
        q, k_new, v_new, g_new, cache.keys, cache.values, cache.decays, cache.positions,
        cache.next_position if position_on_device else None,
        0 if position_on_device else cache.seen_tokens, cache.slots_in_use, cache.window_size, scale,
        update_decays, **overrides,
    )


def launch_decode(
    q, k_new, v_new, g_new, keys, values, decays, positions, next_position, first_position: int,
    used: int, window_size: int | None, scale: float, update_decays: bool = False, **overrides,
) -> torch.Tensor:
    """The kernels on explicit cache tensors (keys/values [B, H, W, D], decays [B, HQ, W] or
    None, positions [B, W]); ``next_position`` (0-d int64 tensor) or ``first_position`` (int)
    gives the stream position of the first new token; slots [0, used) are scanned.
    Returns o [B, L, HQ, D]."""
    batch, length, num_q_heads, head_dim = q.shape
    num_kv_heads = k_new.shape[2]
    group = num_q_heads // num_kv_heads
    config = decode_config(batch, num_kv_heads, group, length, head_dim, used, q.device)
    config.update(overrides)
    block_m, block_n = config["block_m"], config["block_n"]
    block_d = max(16, next_power_of_2(head_dim))
    block_l = max(16, next_power_of_2(length))
    row_blocks = cdiv(length * group, block_m)
    slots_per_split = cdiv(cdiv(max(used, 1), config["num_splits"]), block_n) * block_n
    num_splits = max(1, cdiv(used, slots_per_split))

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
    if split:
        partial_rows = batch * num_kv_heads * num_splits * row_blocks * block_m
        part_o = torch.empty((partial_rows, block_d), dtype=torch.float32, device=q.device)
        part_max = torch.empty((partial_rows,), dtype=torch.float32, device=q.device)
        part_sum = torch.empty((partial_rows,), dtype=torch.float32, device=q.device)
    else:
        part_o = part_max = part_sum = o
    window = window_size if window_size is not None else 0
    _decode_kernel[(batch * num_kv_heads, num_splits, row_blocks)](
        q, k_new, v_new, g_cum,
        keys, values, decays, positions, next_position if next_position is not None else positions,
        o, part_o, part_max, part_sum,
        q.stride(0), q.stride(1), q.stride(2),
        k_new.stride(0), k_new.stride(1), k_new.stride(2),
        v_new.stride(0), v_new.stride(1), v_new.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        decays.stride(0) if has_gate else 0, decays.stride(1) if has_gate else 0,
        positions.stride(0),
        o.stride(0), o.stride(1), o.stride(2),
        num_kv_heads, first_position, used, slots_per_split, num_splits, window, scale * LOG2E,
        LENGTH=length, GROUP=group, HEAD_DIM=head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_L=block_l, BLOCK_D=block_d,
        HAS_GATE=has_gate, BOUNDED=window_size is not None, SPLIT=split,
        UPDATE_DECAYS=update_decays and has_gate, POSITION_ON_DEVICE=next_position is not None,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    if split:
        _combine_kernel[(batch * num_kv_heads, row_blocks)](
            part_o, part_max, part_sum, o,
            o.stride(0), o.stride(1), o.stride(2),
            num_kv_heads, num_splits,
            LENGTH=length, GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_D=block_d,
        )
    return o
