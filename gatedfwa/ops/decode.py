"""Decoding against a window cache: L new tokens (L = 1, or a few for speculative or
chunked decoding) attend to the cached window and to themselves, causally.

New token i (0 <= i < L) sits at stream position p_i = p0 + i, where p0 = cache.seen_tokens.
It sees

* a cached key j (position pos_j, valid: pos_j >= 0) when p_i - pos_j < w, with bias
      U_{p_i} - U_j = decay_j + G_i,        G_i = g_0 + ... + g_i  (the new gates, inclusive)
  where decay_j = U_{p0-1} - U_j is what the cache holds. Both terms are <= 0: the sum has
  no cancellation.
* a new key m <= i with i - m < w, with bias G_i - G_m = g_{m+1} + ... + g_i.

The op reads the cache as it was before the step (the new tokens come from the arguments),
computes the output, then writes the new tokens into the cache (ring slots p % W) and adds
the L gates to every cached decay. Reading before writing is what lets a ring of exactly w
slots serve L > 1: a new token's slot holds a token that some earlier new query may still
need.

Two implementations:
* :func:`decode_attention_torch`: plain PyTorch, float32 math, the reference (any device).
* :func:`decode_attention_triton`: one Triton program per (batch row, key/value head, slot
  split) serves every query head of that key/value head and every new token, so the cached
  keys and values are read once per step. At small batch the slots are split over several
  programs (flash-decoding) whose partial softmax results a second kernel combines. The
  kernel also adds the new gates to the cached decays it reads, saving a pass over them.
:func:`decode_gated_window_attention` validates, dispatches (gatedfwa.ops.api.select_backend)
and updates the cache.
"""

from __future__ import annotations

import functools

import torch

from gatedfwa.cache import WindowLayerCache
from gatedfwa.ops.api import select_backend
from gatedfwa.ops.validation import SUPPORTED_DTYPES, check_scale, format_shape
# Triton is optional: without it every step takes the PyTorch path.
from gatedfwa.ops.triton_support import constexpr as _constexpr
from gatedfwa.ops.triton_support import jit as _jit
from gatedfwa.ops.triton_support import tl, triton


__all__ = [
    "MAX_DECODE_LENGTH",
    "decode_gated_window_attention",
    "decode_attention_torch",
    "decode_attention_triton",
]

MAX_DECODE_LENGTH = 64
"""Most new tokens one decode call accepts; longer chunks belong to the parallel path."""

LOG2E = _constexpr(1.4426950408889634)
LOG2E_HOST = 1.4426950408889634


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


# ======================================================================================
# Validation and dispatch
# ======================================================================================


def check_decode_args(q, k_new, v_new, g_new, cache, scale) -> None:
    """q [B, L, HQ, D], k_new/v_new [B, L, H, D], g_new [B, L, HQ] or None, 1 <= L <=
    MAX_DECODE_LENGTH, all consistent with each other and with the cache."""
    if not isinstance(cache, WindowLayerCache):
        raise TypeError(f"cache must be a gatedfwa.cache.WindowLayerCache, got {type(cache).__name__}")
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must have 4 dimensions [batch, new_tokens, query_heads, head_dim], got shape {format_shape(q)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    batch, length, num_q_heads, head_dim = q.shape
    if not 1 <= length <= MAX_DECODE_LENGTH:
        raise ValueError(
            f"q must hold between 1 and {MAX_DECODE_LENGTH} new tokens (dimension 1), got {length}; "
            "use gated_window_attention and cache.prefill for longer chunks"
        )
    cache.check_step(k_new, v_new, g_new, num_q_heads, "k_new", "v_new", "g_new")
    if k_new.shape[0] != batch or k_new.shape[1] != length:
        raise ValueError(f"k_new must agree with q in batch and new_tokens, got q {format_shape(q)} and k_new {format_shape(k_new)}")
    if k_new.shape[3] != head_dim:
        raise ValueError(f"k_new must have q's head_dim {head_dim}, got {k_new.shape[3]}")
    if num_q_heads % k_new.shape[2] != 0:
        raise ValueError(
            f"the number of query heads ({num_q_heads}) must be a multiple of the number of "
            f"key/value heads ({k_new.shape[2]})"
        )
    if k_new.dtype != q.dtype:
        raise TypeError(f"k_new and v_new must have q's dtype {q.dtype}, got {k_new.dtype}")
    if k_new.device != q.device:
        raise ValueError(f"k_new and v_new must be on q's device {q.device}, got {k_new.device}")
    check_scale(scale)


def decode_gated_window_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    g_new: torch.Tensor | None,
    cache: WindowLayerCache,
    scale: float | None = None,
) -> torch.Tensor:
    """One decoding step of gated window attention; appends the new tokens to ``cache``.

    Args:
        q: [B, L, HQ, D] queries of the L new tokens (1 <= L <= MAX_DECODE_LENGTH).
        k_new, v_new: [B, L, H, D] their keys and values (HQ % H == 0), the cache's dtype.
        g_new: [B, L, HQ] their log gates (<= 0), or None for a layer without gate (the
            cache must have been filled the same way).
        cache: the layer's WindowLayerCache (its window is the layer's window). An empty,
            unallocated cache is allocated here with these shapes.
        scale: logit scale, default D ** -0.5.

    Returns:
        o [B, L, HQ, D] in q's dtype: exactly what gated_window_attention would give these
        L tokens at the end of the whole sequence (padding slots never attended).
    """
    check_decode_args(q, k_new, v_new, g_new, cache, scale)
    batch, _, num_q_heads, head_dim = q.shape
    if not cache.is_allocated:
        cache.allocate(batch, k_new.shape[2], num_q_heads, head_dim, k_new.dtype, k_new.device, g_new is not None)
    scale = float(head_dim**-0.5 if scale is None else scale)
    if select_backend(q.device) == "triton" and triton is not None:
        o = decode_attention_triton(q, k_new, v_new, g_new, cache, scale, update_decays=True)
        cache.append(k_new, v_new, g_new, shift_decays=False)
    else:
        o = decode_attention_torch(q, k_new, v_new, g_new, cache, scale)
        cache.append(k_new, v_new, g_new, shift_decays=True)
    return o


# ======================================================================================
# PyTorch path (reference)
# ======================================================================================


def decode_attention_torch(q, k_new, v_new, g_new, cache: WindowLayerCache, scale: float) -> torch.Tensor:
    """Output of the L new tokens against the cache as it is (nothing is written).
    Computes in float32; returns o [B, L, HQ, D] in q's dtype."""
    batch, length, num_q_heads, head_dim = q.shape
    num_kv_heads = k_new.shape[2]
    group = num_q_heads // num_kv_heads
    used = cache.slots_in_use
    f32 = torch.float32
    device = q.device
    queries = q.to(f32).view(batch, length, num_kv_heads, group, head_dim)

    # Logits [B, H, group, L, keys]: cached slots first, then the new tokens.
    cached = torch.einsum("blhgd,bhnd->bhgln", queries, cache.keys[:, :, :used].to(f32)) * scale
    fresh = torch.einsum("blhgd,bmhd->bhglm", queries, k_new.to(f32)) * scale

    new_index = torch.arange(length, device=device)
    query_position = cache.seen_tokens + new_index  # [L]
    key_position = cache.positions[:, :used]  # [B, used]
    cached_visible = (key_position >= 0)[:, None, :].expand(batch, length, used)
    distance_new = new_index[:, None] - new_index[None, :]
    fresh_visible = distance_new >= 0
    if cache.window_size is not None:
        cached_visible = cached_visible & (query_position[None, :, None] - key_position[:, None, :] < cache.window_size)
        fresh_visible = fresh_visible & (distance_new < cache.window_size)

    if g_new is not None:
        gates = g_new.to(f32)  # [B, L, HQ]
        inclusive = gates.cumsum(1).permute(0, 2, 1).reshape(batch, num_kv_heads, group, length, 1)
        decays = cache.decays[:, :, :used].reshape(batch, num_kv_heads, group, 1, used)
        cached = cached + (decays + inclusive)
        # Bias between new tokens i >= m: g_{m+1} + ... + g_i, summed term by term.
        k_index = new_index
        between = ((k_index[None, None, :] > new_index[None, :, None])
                   & (k_index[None, None, :] <= new_index[:, None, None])).to(f32)  # [i, m, k]
        bias = torch.einsum("imk,bkq->bqim", between, gates)
        fresh = fresh + bias.reshape(batch, num_kv_heads, group, length, length)

    cached = cached.masked_fill(~cached_visible[:, None, None], float("-inf"))
    fresh = fresh.masked_fill(~fresh_visible, float("-inf"))
    # Every new token sees itself, so each row has a finite maximum.
    probs = torch.softmax(torch.cat([cached, fresh], dim=-1), dim=-1)
    out = torch.einsum("bhgln,bhnd->blhgd", probs[..., :used], cache.values[:, :, :used].to(f32))
    out = out + torch.einsum("bhglm,bmhd->blhgd", probs[..., used:], v_new.to(f32))
    return out.reshape(batch, length, num_q_heads, head_dim).to(q.dtype)


# ======================================================================================
# Triton path
# ======================================================================================


@_jit
def _softmax_fold(acc, row_max, row_sum, s, v, DOT_PRECISION: tl.constexpr):
    """Fold a tile of base-2 logits s [BLOCK_M, BLOCK_N] (-inf = invisible) and its values
    v [BLOCK_N, BLOCK_D] into the running softmax (acc, row_max, row_sum)."""
    new_max = tl.maximum(row_max, tl.max(s, 1))
    # A row with no visible key so far keeps max = -inf; subtracting 0 then gives
    # exp2(-inf) = 0 instead of NaN.
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    p = tl.math.exp2(s - safe_max[:, None])
    correction = tl.math.exp2(row_max - safe_max)
    row_sum = row_sum * correction + tl.sum(p, 1)
    acc = acc * correction[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, new_max, row_sum


@_jit
def _decode_kernel(
    Q, K_NEW, V_NEW, G_CUM,
    K_CACHE, V_CACHE, DECAYS, POSITIONS,
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
    DOT_PRECISION: tl.constexpr,
):
    """Program (batch row b and kv head h, split, row block). Row r of the block stands for
    new token i = r // GROUP and query head h * GROUP + r % GROUP."""
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
            s += (decay + gate_to_query[:, None]) * LOG2E
            if UPDATE_DECAYS:
                tl.store(decay_ptr, decay + gate_total[:, None], mask=tile_ok & writes_decay[:, None])
        s = tl.where(visible, s, float("-inf"))
        v = tl.load(v_base + slots[:, None] * stride_vcw + offs_d[None, :],
                    mask=slot_ok[:, None] & d_ok[None, :], other=0.0)
        acc, row_max, row_sum = _softmax_fold(acc, row_max, row_sum, s, v, DOT_PRECISION)

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
            s += (gate_to_query[:, None] - gate_to_key) * LOG2E
        s = tl.where(visible, s, float("-inf"))
        v = tl.load(V_NEW + b * stride_vnb + fresh[:, None] * stride_vnl + h * stride_vnh + offs_d[None, :],
                    mask=fresh_ok[:, None] & d_ok[None, :], other=0.0)
        acc, row_max, row_sum = _softmax_fold(acc, row_max, row_sum, s, v, DOT_PRECISION)

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


@_jit
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


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    # Looked up once per GPU: decode_config runs on every layer of every decode step.
    return torch.cuda.get_device_properties(index).multi_processor_count


def decode_config(batch: int, num_kv_heads: int, group: int, length: int, head_dim: int, used_slots: int,
                  device: torch.device) -> dict:
    """Tile sizes and the number of slot splits for one decode step."""
    rows = length * group
    block_m = min(64, max(16, _next_power_of_2(rows)))
    block_n = 64 if head_dim <= 128 else 32
    row_blocks = _cdiv(rows, block_m)
    programs = batch * num_kv_heads * row_blocks
    # Enough programs to keep every SM streaming (flash-decoding), but each split keeps at
    # least 4 tiles so that the combine step stays small.
    wanted = _cdiv(4 * _num_sms(device), programs)
    num_splits = max(1, min(wanted, _cdiv(used_slots, 4 * block_n)))
    return dict(block_m=block_m, block_n=block_n, num_splits=num_splits, num_warps=4, num_stages=2)


def decode_attention_triton(
    q, k_new, v_new, g_new, cache: WindowLayerCache, scale: float, update_decays: bool = False, **overrides,
) -> torch.Tensor:
    """Triton version of :func:`decode_attention_torch`. With ``update_decays`` the kernel
    also adds the step's gates to the cached decays (the rest of the append is left to
    ``cache.append(..., shift_decays=False)``). ``overrides`` (block_n, num_splits,
    num_warps, num_stages) replace the default config, for tests and tuning."""
    batch, length, num_q_heads, head_dim = q.shape
    num_kv_heads = k_new.shape[2]
    group = num_q_heads // num_kv_heads
    used = cache.slots_in_use
    config = decode_config(batch, num_kv_heads, group, length, head_dim, used, q.device)
    config.update(overrides)
    block_m, block_n = config["block_m"], config["block_n"]
    block_d = max(16, _next_power_of_2(head_dim))
    block_l = max(16, _next_power_of_2(length))
    row_blocks = _cdiv(length * group, block_m)
    slots_per_split = _cdiv(_cdiv(max(used, 1), config["num_splits"]), block_n) * block_n
    num_splits = max(1, _cdiv(used, slots_per_split))

    q, k_new, v_new = q.contiguous(), k_new.contiguous(), v_new.contiguous()
    has_gate = g_new is not None
    if not has_gate:
        g_cum = q  # never read (HAS_GATE is off); any tensor will do
    elif length == 1:
        g_cum = g_new.float().contiguous()  # the inclusive sum of one gate is the gate
    else:
        g_cum = g_new.float().cumsum(1).contiguous()
    decays = cache.decays if has_gate else q
    o = torch.empty_like(q)
    split = num_splits > 1
    if split:
        partial_rows = batch * num_kv_heads * num_splits * row_blocks * block_m
        part_o = torch.empty((partial_rows, block_d), dtype=torch.float32, device=q.device)
        part_max = torch.empty((partial_rows,), dtype=torch.float32, device=q.device)
        part_sum = torch.empty((partial_rows,), dtype=torch.float32, device=q.device)
    else:
        part_o = part_max = part_sum = o
    keys, values = cache.keys, cache.values
    window = cache.window_size if cache.window_size is not None else 0
    _decode_kernel[(batch * num_kv_heads, num_splits, row_blocks)](
        q, k_new, v_new, g_cum,
        keys, values, decays, cache.positions,
        o, part_o, part_max, part_sum,
        q.stride(0), q.stride(1), q.stride(2),
        k_new.stride(0), k_new.stride(1), k_new.stride(2),
        v_new.stride(0), v_new.stride(1), v_new.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        decays.stride(0) if has_gate else 0, decays.stride(1) if has_gate else 0,
        cache.positions.stride(0),
        o.stride(0), o.stride(1), o.stride(2),
        num_kv_heads, cache.seen_tokens, used, slots_per_split, num_splits, window, scale * LOG2E_HOST,
        LENGTH=length, GROUP=group, HEAD_DIM=head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_L=block_l, BLOCK_D=block_d,
        HAS_GATE=has_gate, BOUNDED=cache.window_size is not None, SPLIT=split,
        UPDATE_DECAYS=update_decays and has_gate,
        # float32 inputs get full-precision products (tf32 would cost ~1e-3 relative error).
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
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
