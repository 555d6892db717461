"""Argument checks shared by the public ops, one function per concept. Each error names the
argument and what was expected; nothing is broadcast, truncated or clamped silently."""

from __future__ import annotations

import math

import torch

from gatedfwa.environment import check_values_on_device

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def format_shape(x: torch.Tensor) -> str:
    """A shape as error messages print it: [2, 8, 4, 16]."""
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def check_float_tensor(name: str, x, dims: int, layout: str) -> None:
    """x is a floating-point tensor with `dims` dimensions (`layout` names them in the error)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions {layout}, got shape {format_shape(x)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_attention_tensor(name: str, x, layout: str = "[batch, seqlen, heads, head_dim]") -> None:
    """x is a 4-D float16, bfloat16 or float32 tensor (`layout` names its dimensions)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have 4 dimensions {layout}, got shape {format_shape(x)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allow_shorter_queries: bool = False) -> None:
    """q [B, T, HQ, D], k and v [B, T, H, D], HQ % H == 0, D <= 256, one dtype and device.
    With allow_shorter_queries, q may be shorter along T than k (T_q <= T_k)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_attention_tensor(name, x)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {format_shape(k)} and v {format_shape(v)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must agree in batch, got q {format_shape(q)} and k {format_shape(k)}")
    if allow_shorter_queries and q.shape[1] > k.shape[1]:
        raise ValueError(
            f"q must not be longer than k along seqlen (queries are aligned to the last keys), got "
            f"q {format_shape(q)} and k {format_shape(k)}"
        )
    if not allow_shorter_queries and q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must agree in batch and seqlen, got q {format_shape(q)} and k {format_shape(k)}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[3]} and {k.shape[3]}")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(
            f"the number of query heads ({q.shape[2]}) must be a positive multiple of the number of "
            f"key/value heads ({k.shape[2]})"
        )
    if q.shape[3] > MAX_HEAD_DIM or q.shape[3] < 1:
        raise ValueError(f"head_dim must be between 1 and {MAX_HEAD_DIM}, got {q.shape[3]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")


def check_gate_like(
    g: torch.Tensor | None,
    expected_shape: tuple[int, ...],
    device: torch.device,
    name: str = "g",
    reference_name: str = "q",
) -> None:
    """g of expected_shape [batch, seqlen, query_heads], a floating dtype, on ``device`` (the
    device of the tensor called reference_name in messages), or None."""
    if g is None:
        return
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(g).__name__}")
    expected = list(expected_shape)
    if list(g.shape) != expected:
        raise ValueError(f"{name} must have shape [batch, seqlen, query_heads] = {expected}, got {format_shape(g)}")
    if not g.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {g.dtype}")
    if g.device != device:
        raise ValueError(f"{name} must be on {reference_name}'s device {device}, got {g.device}")


def check_positive_int(name: str, value, minimum: int = 1) -> None:
    """An int (not a bool) >= minimum: TypeError for anything else than an int, ValueError for a
    smaller one."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_window(window_size: int | None, zero_means: str | None = None) -> None:
    """None (full causal) or an int >= 1 that counts the query itself; 0 as well where it means
    something, said by zero_means (NSA: "no sliding branch")."""
    if window_size is None:
        return
    if isinstance(window_size, bool) or not isinstance(window_size, int):
        raise TypeError(f"window_size must be an int >= 1 or None, got {window_size!r}")
    if window_size == 0 and zero_means is not None:
        return
    if window_size < 1:
        zero = "" if zero_means is None else f", 0 ({zero_means})"
        raise ValueError(f"window_size must be >= 1 (it counts the query itself){zero} or None, got {window_size}")


def check_scale(scale: float | None) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")


def check_cu_seqlens(cu_seqlens: torch.Tensor | None, q: torch.Tensor, name: str = "cu_seqlens",
                     tensor_name: str = "q") -> None:
    """int32/int64 [N + 1], starting at 0, non-decreasing, ending at T (the length of the
    tensor called tensor_name, here q), with batch size 1."""
    if cu_seqlens is None:
        return
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 (or int64), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 entries [0, ..., T], got shape {format_shape(cu_seqlens)}")
    if q.shape[0] != 1:
        raise ValueError(f"with {name} the batch size must be 1 (sequences packed along T), got {q.shape[0]}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"{name} must be on {tensor_name}'s device {q.device}, got {cu_seqlens.device}")
    if torch.compiler.is_compiling():
        return  # value checks would need a host sync inside the graph
    values = cu_seqlens.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    if any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {values}")
    if values[-1] != q.shape[1]:
        raise ValueError(f"{name} must end at the packed length of {tensor_name}, T = {q.shape[1]}, got {values[-1]}")


def check_query_key_seqlens(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, q: torch.Tensor,
                            k: torch.Tensor) -> None:
    """cu_seqlens_q over q's packed length and cu_seqlens_k over k's, with as many sequences,
    and every sequence's queries no more than its keys (queries align to its last keys)."""
    check_cu_seqlens(cu_seqlens_q, q, "cu_seqlens_q", "q")
    check_cu_seqlens(cu_seqlens_k, k, "cu_seqlens_k", "k")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
            f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}"
        )
    if torch.compiler.is_compiling():
        return
    query_lengths = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    key_lengths = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    for i, (nq, nk) in enumerate(zip(query_lengths, key_lengths)):
        if nq > nk:
            raise ValueError(
                f"sequence {i} has more queries ({nq}, cu_seqlens_q) than keys ({nk}, cu_seqlens_k); "
                "each sequence's queries must be no more than its keys"
            )


def check_log_gate_values(g: torch.Tensor | None, name: str = "g") -> None:
    """Log gates must be finite and <= 0 (a strong gate is a large negative number, e.g. -1e4;
    -inf would turn the decay differences U_t - U_j into NaN).

    Checked on CPU tensors always, and on other devices when GATEDFWA_CHECK_VALUES=1: reading
    values back costs a device sync per call, so by default CUDA inputs are assumed valid (a
    positive gate would make the decay grow with distance instead of shrink)."""
    if g is None or g.numel() == 0 or torch.compiler.is_compiling():
        return
    if g.device.type != "cpu" and not check_values_on_device():
        return
    bad = ~torch.isfinite(g) | (g > 0)
    if bool(bad.any()):
        count = int(bad.sum())
        worst = g[bad].flatten()[0].item()
        raise ValueError(
            f"{name} must hold finite log gates <= 0; {count} of {g.numel()} values are not, e.g. {worst!r}"
        )


def check_attention_args(q, k, v, g, window_size, scale, cu_seqlens, cu_seqlens_q=None,
                         allow_shorter_queries: bool = False) -> None:
    """The public op's arguments. cu_seqlens delimits k's sequences (and q's too unless
    cu_seqlens_q is given); with allow_shorter_queries q may be shorter than k, and g follows
    k (it covers key positions)."""
    check_qkv(q, k, v, allow_shorter_queries)
    check_gate_like(g, (k.shape[0], k.shape[1], q.shape[2]), q.device)
    check_log_gate_values(g)
    check_window(window_size)
    check_scale(scale)
    check_sequence_offsets(q, k, cu_seqlens, cu_seqlens_q)


def resolve_sequence_offsets(cu_seqlens: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None,
                             cu_seqlens_k: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The public ops' two ways of delimiting packed sequences, cu_seqlens (both sides) or
    cu_seqlens_q and cu_seqlens_k (one per side), as (k's offsets, q's offsets or None when
    they are k's)."""
    if cu_seqlens is not None and (cu_seqlens_q is not None or cu_seqlens_k is not None):
        raise ValueError("give either cu_seqlens (for both q and k) or cu_seqlens_q and cu_seqlens_k, not both")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k go together: give both, or cu_seqlens for both sides")
    if cu_seqlens_k is None:
        return cu_seqlens, None
    return cu_seqlens_k, (None if cu_seqlens_q is cu_seqlens_k else cu_seqlens_q)


def check_sequence_offsets(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor | None,
                           cu_seqlens_q: torch.Tensor | None) -> None:
    """cu_seqlens delimits k's sequences (and q's too unless cu_seqlens_q is given, which
    then delimits q's); q shorter than k needs one per side."""
    if cu_seqlens_q is None:
        if cu_seqlens is not None and q.shape[1] != k.shape[1]:
            raise ValueError(
                f"q ({q.shape[1]} positions) is shorter than k ({k.shape[1]}): give cu_seqlens_q and "
                "cu_seqlens_k, one per side, instead of cu_seqlens"
            )
        check_cu_seqlens(cu_seqlens, q)
    elif cu_seqlens is None:
        raise ValueError("cu_seqlens_q needs cu_seqlens_k: give both, or cu_seqlens for both sides")
    else:
        check_query_key_seqlens(cu_seqlens_q, cu_seqlens, q, k)
