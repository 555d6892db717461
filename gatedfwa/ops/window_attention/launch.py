"""Launch configuration of the window attention kernels: the family's tuning surface
(TUNING: tile sizes per kernel, architecture, head size and gate; the chunk sums kernel's
program shape; the dq kernel's per-warp store switch), the gate chunk length the tiles imply,
the sizes one call derives once, and output buffers. Tests and benchmarks change launch
choices through TUNING.overridden(...) (gatedfwa/ops/common/tuning.py) and replace
allocate_like through this module."""

from __future__ import annotations

import dataclasses

import torch

from gatedfwa.ops.common.triton_support import cdiv, interpreting, next_power_of_2
from gatedfwa.ops.common.tuning import Tuning, architecture
from gatedfwa.ops.common.varlen import longest_sequence
from gatedfwa.ops.window_attention.tuned import MEASURED

__all__ = ["TUNING", "kernel_config", "program_config", "warp_flux_parts", "flux_parts", "gate_chunk", "gate_chunk_on",
           "block_d_for", "Problem", "allocate_like", "check_sums", "usable_config", "descriptors_usable"]


def block_d_for(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


# Tile sizes: the fastest of benchmarks/sweep_attention.py on an H200
# (benchmarks/results/attention_sweep.md), B=4 T=8192 H=16, w = 512 and 2048. A measured
# entry of tuned.py (written from a sweep by benchmarks/sweep_to_configs.py) takes precedence
# for its architecture; these rules hold everywhere else. A configuration may also set USE_TMA
# (load tiles through Hopper tensor descriptors); it defaults to off, and usable_config drops
# it where the tensors or the GPU do not allow it. (Warp specialisation of the unmasked loops
# was measured and dropped: docs/performance.md.) Under the interpreter every kernel takes
# small tiles, so that the tests' short sequences span several of them.


def _forward_rule(arch: str, block_d: int, gate: bool) -> dict:
    """Tile sizes for the forward kernel (BLOCK_M must be a multiple of BLOCK_N)."""
    if arch == "interpreter":
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
    if block_d <= 64 and gate:
        # With the gate, 128 x 64 needs more than 255 registers and spills; 64 x 32 fits in
        # ~120 and four programs share an SM (H200, B=4 T=8192 H=16 D=64 w=512: 0.33 ms
        # against 0.41 ms for 128 x 64 with the gate, 0.31 ms without it).
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=4)
    if block_d <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if block_d <= 128:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)


def _dq_rule(arch: str, block_d: int, gate: bool) -> dict:
    """Tile sizes for the dq kernel (BLOCK_M must be a multiple of BLOCK_N)."""
    if arch == "interpreter":
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
    if block_d <= 64:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3)
    if block_d <= 128:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=1)


def _dkdv_rule(arch: str, block_d: int, gate: bool) -> dict:
    """BLOCK_N keys held per program, BLOCK_M queries per tile (BLOCK_N a multiple of BLOCK_M)."""
    if arch == "interpreter":
        return dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)
    if block_d <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    if block_d <= 128:
        # 32 x 64 w4 s3 measured the same within 1% (attention_sweep.md); 64 x 64 makes
        # every D <= 128 tile one gate chunk of 64 (gate_chunk).
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=1)


def _chunk_sums_rule(arch: str, block_d: int, gate: bool) -> dict:
    """The chunk sums kernel (chunk_sums.py): one program takes CHUNKS chunks of one sequence
    and up to MAX_BLOCK_H heads, with num_warps warps. On an H200 one chunk (4 warps) was
    fastest of 1-8 chunks and 2-8 warps, at B = 4 and 64 (T = 8192, H = 16, chunk 64)."""
    return dict(CHUNKS=1, MAX_BLOCK_H=64, num_warps=4)


def _delta_rule(arch: str, block_d: int, gate: bool) -> dict:
    """The backward's row statistics kernel (backward.py, _delta_kernel): BLOCK query rows per
    program."""
    return dict(BLOCK=16 if arch == "interpreter" else 64)


def _reverse_cumsum_rule(arch: str, block_d: int, gate: bool) -> dict:
    """The whole-sequence reverse sum of dU (backward.py, _reverse_cumsum_within_sequences):
    BLOCK positions per step, one program per sequence and head."""
    if arch == "interpreter":
        return dict(BLOCK=64, num_warps=1)
    return dict(BLOCK=2048, num_warps=8)


def _flux_gradient_rule(arch: str, block_d: int, gate: bool) -> dict:
    """dg from the chunk-boundary fluxes (gate_flux.py): warps per program."""
    return dict(num_warps=1 if arch == "interpreter" else 4)


def _gluon_forward_rule(arch: str, block_d: int, gate: bool) -> dict:
    """Slots of the K/V ring of the Hopper Gluon forward (gluon_forward.py), whose 64 x 64
    tiles are fixed by its design: 3 at D = 128 (32 KiB each with the gate sums, about 130 KiB
    of shared memory with the two q buffers), 4 at D = 64 (about 82 KiB). The registers allow
    one program per SM either way; first choices, to be swept on a GPU."""
    return dict(STAGES=3 if block_d > 64 else 4)


@dataclasses.dataclass(frozen=True)
class WindowAttentionKnobs:
    """warp_flux_totals: whether the dq kernel may store its flux tile totals one part per
    warp (backward.py, _store_warp_totals: inline PTX, no shared memory) where the layout
    allows it. Benchmarks turn it off to time the portable path (one tl.sum per tile).

    max_flux_tiles_per_block_m: the flux buffer (gate_flux.py) holds flux_tile_count(...)
    float32 values per query block; beyond this many per BLOCK_M rows (windows over about 4
    BLOCK_M tiles of keys per block) the backward takes dg from a whole-sequence reverse sum
    instead. Benchmarks set 0 to time that path everywhere."""

    warp_flux_totals: bool = True
    max_flux_tiles_per_block_m: int = 4


TUNING = Tuning(
    "window_attention", key_names=("block_d", "gate"),
    rules={"forward": _forward_rule, "dq": _dq_rule, "dkdv": _dkdv_rule, "chunk_sums": _chunk_sums_rule,
           "delta": _delta_rule, "reverse_cumsum": _reverse_cumsum_rule, "flux_gradient": _flux_gradient_rule,
           "gluon_forward": _gluon_forward_rule},
    measured=MEASURED, knobs=WindowAttentionKnobs())


def kernel_config(kernel: str, head_dim: int, gate: bool, device: torch.device) -> dict:
    """TUNING's configuration of `kernel` (a key of TUNING.rules) for this head
    size and gate setting on `device`'s architecture."""
    return TUNING.config(kernel, architecture(device), block_d=block_d_for(head_dim), gate=gate)


# The kernels around the attention kernels ("chunk_sums", "delta", "reverse_cumsum",
# "flux_gradient") take a program shape that depends on the architecture only: their entries
# are keyed with BLOCK_D 0 and no gate.
def program_config(kernel: str, device: torch.device) -> dict:
    """TUNING's configuration of an auxiliary kernel (see above) on `device`'s architecture."""
    return TUNING.config(kernel, architecture(device), block_d=0, gate=False)


def warp_flux_parts(config: dict) -> int:
    """In how many parts a dq kernel launched with `config` stores each flux tile total where
    its row sums come from Hopper's tensor cores (wgmma): one per warp (BLOCK_M / 16) when
    every warp holds 16 whole rows (BLOCK_M == 16 * num_warps), the layout _store_warp_totals
    is written for, else 1."""
    if TUNING.knobs.warp_flux_totals and config["BLOCK_M"] == 16 * config["num_warps"]:
        return config["BLOCK_M"] // 16
    return 1


def flux_parts(config: dict, q: torch.Tensor) -> int:
    """warp_flux_parts(config) where the dq kernel's row sums for inputs like q come from the
    tensor cores: fp16/bf16 inputs (float32 takes full-precision products, computed outside
    them in another layout) on an NVIDIA GPU of compute capability 9; else 1. The interpreter
    runs no inline assembly."""
    if not (q.is_cuda and torch.version.hip is None and not interpreting()):
        return 1
    if q.dtype in (torch.float16, torch.bfloat16) and torch.cuda.get_device_capability(q.device)[0] == 9:
        return warp_flux_parts(config)
    return 1


def gate_chunk(head_dim: int, device: torch.device) -> int:
    """The chunk length of the gate sums (chunk_sums.py) for this head size on `device`'s
    architecture (gate_chunk_on)."""
    return gate_chunk_on(head_dim, architecture(device))


def gate_chunk_on(head_dim: int, arch: str) -> int:
    """The chunk length of the gate sums for this head size on `arch`: the smallest tile side
    of the three attention kernels' gated configurations, so that every tile is a whole number
    of chunks (tile sides are powers of two)."""
    configs = [TUNING.config(kernel, arch, block_d=block_d_for(head_dim), gate=True)
               for kernel in ("forward", "dq", "dkdv")]
    return min(min(config["BLOCK_M"], config["BLOCK_N"]) for config in configs)


class Problem:
    """Sizes shared by every launch of one call, derived once. seqlen and max_seqlen are k's
    (the kernels' rows are key positions); with fewer queries than keys, `fewer_queries` is set and
    seqlen_q, max_seqlen_q, cu_seqlens_q describe q (cu_seqlens_q None: q packed like k)."""

    def __init__(self, q, k, window_size, cu_seqlens, cu_seqlens_q=None):
        batch, seqlen, self.num_q_heads, self.head_dim = k.shape[0], k.shape[1], q.shape[2], q.shape[3]
        self.seqlen_q = q.shape[1]
        self.fewer_queries = self.seqlen_q != seqlen or cu_seqlens_q is not None
        self.num_kv_heads = k.shape[2]
        self.group = self.num_q_heads // self.num_kv_heads
        self.block_d = block_d_for(self.head_dim)
        self.varlen = cu_seqlens is not None
        if self.varlen:
            self.num_seqs = cu_seqlens.numel() - 1
            self.max_seqlen = longest_sequence(cu_seqlens, seqlen)
            self.cu_seqlens = cu_seqlens
        else:
            self.num_seqs = batch
            self.max_seqlen = seqlen
            self.cu_seqlens = q  # unused pointer placeholder
        self.seqlen = seqlen  # the packed length with cu_seqlens
        if cu_seqlens_q is not None:
            self.max_seqlen_q = longest_sequence(cu_seqlens_q, self.seqlen_q)
            self.cu_seqlens_q = cu_seqlens_q
        else:
            self.max_seqlen_q = self.max_seqlen if self.varlen else self.seqlen_q
            self.cu_seqlens_q = self.cu_seqlens
        # A window at least as long as any sequence is full causal attention.
        limit = max(self.max_seqlen, 1)
        self.window = limit if window_size is None else min(window_size, limit)

    def grid(self, block: int, heads: int):
        """Programs over key positions: blocks of `block` keys, per sequence and head."""
        return (cdiv(max(self.max_seqlen, 1), block), self.num_seqs, heads)

    def query_grid(self, block: int, heads: int):
        """Programs over query rows in key coordinates (forward, dq): a sequence's queries
        start anywhere inside a block, so they span one block more than their count."""
        if not self.fewer_queries:
            return self.grid(block, heads)
        return (cdiv(self.max_seqlen_q, block) + 1, self.num_seqs, heads)

    def own_query_grid(self, block: int, heads: int):
        """Programs over q's own rows (row statistics): blocks of `block` queries."""
        return (cdiv(max(self.max_seqlen_q, 1), block), self.num_seqs, heads)


def descriptors_usable(*tensors: torch.Tensor) -> bool:
    """Whether tiles of these [tokens, heads, D] views may be loaded through tensor descriptors:
    a GPU with TMA (compute capability 9 or later; the interpreter emulates them) and the
    16-byte alignment TMA needs of each head's start and of the token stride, with D contiguous."""
    first = tensors[0]
    if not interpreting() and not (first.is_cuda and torch.cuda.get_device_capability(first.device)[0] >= 9):
        return False
    for x in tensors:
        size = x.element_size()
        token_stride, head_stride = x.stride(-3), x.stride(-2)
        if x.stride(-1) != 1 or x.data_ptr() % 16 or (token_stride * size) % 16 or (head_stride * size) % 16:
            return False
    return True


def usable_config(config: dict, *tensors: torch.Tensor, fewer_queries: bool = False) -> dict:
    """config as a kernel can take it for these tensors: USE_TMA kept only where
    descriptors_usable, and the descriptors' scratch allocator in place.
    With fewer queries than keys (rows of q shifted against k's positions) USE_TMA is dropped:
    the descriptor loads address q in key positions."""
    config = dict(config)
    if fewer_queries:
        config.pop("USE_TMA", None)
    if config.get("USE_TMA"):
        if descriptors_usable(*tensors):
            _ensure_allocator()
        else:
            config["USE_TMA"] = False
    return config


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    # Triton asks for global memory where kernels build their tensor descriptors; alignment
    # is at most 128 bytes, which the caching allocator's blocks (512-byte aligned) meet.
    device = "cpu" if interpreting() else "cuda"
    return torch.empty(size, dtype=torch.int8, device=device)


def _ensure_allocator() -> None:
    """Install _scratch as Triton's allocator unless the caller set one. Triton keeps it in a
    context variable, so it is checked on every launch: autograd runs the backward on a
    thread of its own, where the variable starts unset."""
    import triton
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def allocate_like(x: torch.Tensor) -> torch.Tensor:
    """Uninitialised output buffer shaped like x. Tests replace this to fill outputs with NaN,
    which shows any element a kernel fails to write."""
    return torch.empty_like(x)



def check_sums(sums: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> None:
    """The gate sums follow k's positions: [2, B, HQ, T_k]."""
    expected = (2, k.shape[0], q.shape[2], k.shape[1])
    if sums is not None and (tuple(sums.shape) != expected or sums.dtype != torch.float32 or not sums.is_contiguous()):
        raise ValueError(f"gate sums must be contiguous float32 {list(expected)}, got {sums.dtype} {list(sums.shape)}")

