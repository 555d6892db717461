"""A decode step against a StaticWindowLayerCache (static_cache.py) that a CUDA graph can
replay: no host value depends on the stream position, no tensor changes shape or address.

The math is op.py's; what differs is where the position lives. The step

1. attends the L new tokens to all W slots of the cache as it is (empty slots have position
   -1 and are masked), with the first new token at stream position ``cache.next_position``
   (a 0-d device tensor); on CUDA the Triton kernel reads that tensor itself and also adds
   the step's gates to the cached decays;
2. writes the new tokens at slots (next_position + i) % W (slot next_position + i for a
   layer without window), computed on the device, with index_copy_;
3. advances next_position and token_counts by L on the device.

On the Triton path the kernel is a ``torch.library`` custom op (a KernelOp,
gatedfwa/ops/common/custom_op.py), so that torch.compile(fullgraph=True) keeps it whole and
a CUDA graph captures its launch. The kernel is one launch at every batch size: with the
slots split over several programs, the last of them merges the splits, counting on the
cache's split_counters, which it leaves at zero for the next replay.
"""

from __future__ import annotations

import torch

from gatedfwa.ops.backend import select_backend
from gatedfwa.ops.common.custom_op import KernelOp
from gatedfwa.ops.decode.cache import _suffix_sums_after
from gatedfwa.ops.decode.op import check_decode_args
from gatedfwa.ops.decode.torch_path import decode_attention_torch
from gatedfwa.ops.decode.static_cache import StaticWindowLayerCache
from gatedfwa.ops.common.triton_support import triton

__all__ = ["decode_static_step"]


def _launch(q, k_new, v_new, g_new, keys, values, decays, positions, split_counters, next_position, window_size,
            scale):
    from gatedfwa.ops.decode.kernels import launch_decode

    return launch_decode(q, k_new, v_new, g_new, keys, values, decays, positions, split_counters, next_position, 0,
                         keys.shape[2], window_size, scale, update_decays=True)


# Two custom ops, gated and ungated, rather than one with an optional mutated argument: a
# mutated argument that is None trips Inductor's functionalisation under fullgraph compile.
# Neither has a backward (decoding takes no gradient): each is a KernelOp of a forward alone,
# whose eager calls run the launch directly. Both mutate split_counters: the kernel counts
# its splits there and leaves it at zero again.


def _gated_step(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, g_new: torch.Tensor,
    keys: torch.Tensor, values: torch.Tensor, decays: torch.Tensor, positions: torch.Tensor,
    split_counters: torch.Tensor, next_position: torch.Tensor, window_size: int | None, scale: float,
) -> torch.Tensor:
    """The Triton kernel on a gated static cache's tensors: o [B, L, HQ, D]; adds the step's
    gate sum to ``decays`` in place."""
    return _launch(q, k_new, v_new, g_new, keys, values, decays, positions, split_counters, next_position,
                   window_size, scale)


def _gated_step_fake(q, k_new, v_new, g_new, keys, values, decays, positions, split_counters, next_position,
                     window_size, scale):
    return torch.empty_like(q)


def _ungated_step(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
    positions: torch.Tensor, split_counters: torch.Tensor, next_position: torch.Tensor, window_size: int | None,
    scale: float,
) -> torch.Tensor:
    """The Triton kernel on an ungated static cache's tensors: o [B, L, HQ, D]."""
    return _launch(q, k_new, v_new, None, keys, values, None, positions, split_counters, next_position,
                   window_size, scale)


def _ungated_step_fake(q, k_new, v_new, keys, values, positions, split_counters, next_position, window_size, scale):
    return torch.empty_like(q)


_decode_static_attention = KernelOp("gatedfwa::decode_static_attention", _gated_step, _gated_step_fake,
                                    mutates_args=("decays", "split_counters"))
_decode_static_attention_ungated = KernelOp("gatedfwa::decode_static_attention_ungated", _ungated_step,
                                            _ungated_step_fake, mutates_args=("split_counters",))


def decode_static_step(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    g_new: torch.Tensor | None,
    cache: StaticWindowLayerCache,
    scale: float | None = None,
) -> torch.Tensor:
    """One decode step against a filled StaticWindowLayerCache; appends the new tokens.

    Args:
        q: [B, L, HQ, D] the new tokens' queries, 1 <= L <= min(W, MAX_DECODE_LENGTH).
        k_new, v_new: [B, L, H, D] their keys and values, the cache's dtype.
        g_new: [B, L, HQ] their log gates (<= 0), or None for a layer without gate.
        cache: a StaticWindowLayerCache holding the prompt (prefill first).
        scale: logit scale, default D ** -0.5.

    Returns:
        o [B, L, HQ, D] in q's dtype, equal to what decode_gated_window_attention gives.
    """
    if not isinstance(cache, StaticWindowLayerCache):
        raise TypeError(f"cache must be a gatedfwa.StaticWindowLayerCache, got {type(cache).__name__}")
    if not cache.is_allocated:
        raise ValueError("the static cache is empty: prefill it with the prompt before decoding")
    check_decode_args(q, k_new, v_new, g_new, cache, scale)
    length = q.shape[1]
    if length > cache.capacity:
        raise ValueError(f"q holds {length} new tokens, more than the cache's {cache.capacity} slots")
    scale = float(q.shape[3] ** -0.5 if scale is None else scale)
    on_triton = select_backend(q.device) == "triton" and triton is not None
    if on_triton:
        if g_new is None:
            o = _decode_static_attention_ungated(q, k_new, v_new, cache.keys, cache.values, cache.positions,
                                                 cache.split_counters, cache.next_position, cache.window_size, scale)
        else:
            o = _decode_static_attention(q, k_new, v_new, g_new, cache.keys, cache.values, cache.decays,
                                         cache.positions, cache.split_counters, cache.next_position,
                                         cache.window_size, scale)
    else:
        o = decode_attention_torch(q, k_new, v_new, g_new, cache, scale, first_position=cache.next_position)
    _write_step(cache, k_new, v_new, g_new, decays_shifted=on_triton)
    return o


def _write_step(cache: StaticWindowLayerCache, k_new, v_new, g_new, decays_shifted: bool) -> None:
    """Write the L new tokens at their slots and advance the position, all on the device."""
    batch, length = k_new.shape[:2]
    stream = cache.next_position + torch.arange(length, device=k_new.device)  # [L]
    slots = stream % cache.capacity if cache.window_size is not None else stream
    cache.keys.index_copy_(2, slots, k_new.transpose(1, 2))
    cache.values.index_copy_(2, slots, v_new.transpose(1, 2))
    cache.positions.index_copy_(1, slots, stream[None, :].expand(batch, length))
    if g_new is not None:
        gates = g_new.float()
        if not decays_shifted:
            cache.decays.add_(gates.sum(1)[:, :, None])
        cache.decays.index_copy_(2, slots, _suffix_sums_after(gates).transpose(1, 2))
    cache.token_counts.add_(length)
    cache.next_position.add_(length)
