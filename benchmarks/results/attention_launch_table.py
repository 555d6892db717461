"""Measured launch configurations of the window attention kernels, for launch.py's TUNING:
an entry takes precedence over launch.py's rule for its kernel, architecture, BLOCK_D and
gate setting. Written by benchmarks/sweep_to_configs.py from a sweep
(benchmarks/sweep_attention.py); adopting a table is a change to the library, made by copying
the written file over gatedfwa/ops/window_attention/tuned.py after the GPU tests pass with it.
Regenerate, do not edit.

MEASURED[(kernel, arch, BLOCK_D, gate)] = dict(BLOCK_M, BLOCK_N, num_warps, num_stages[, USE_TMA]),
kernel one of "forward", "dq", "dkdv"; arch as gatedfwa.ops.common.tuning.architecture names it.

Measured on (sm90): NVIDIA H200 (sm90), torch 2.11.0+cu130, triton 3.6.0, commit 560fe4b117, 2026-11-30T20:17:47+00:00
"""

MEASURED: dict[tuple[str, str, int, bool], dict] = {
    ('dkdv', 'sm90', 64, False): {'BLOCK_M': 64, 'BLOCK_N': 64, 'num_warps': 4, 'num_stages': 2},
    ('dkdv', 'sm90', 64, True): {'BLOCK_M': 32, 'BLOCK_N': 64, 'num_warps': 4, 'num_stages': 3, 'USE_TMA': True},
    ('dkdv', 'sm90', 128, False): {'BLOCK_M': 64, 'BLOCK_N': 64, 'num_warps': 4, 'num_stages': 2, 'USE_TMA': True},
    ('dkdv', 'sm90', 128, True): {'BLOCK_M': 64, 'BLOCK_N': 64, 'num_warps': 4, 'num_stages': 2, 'USE_TMA': True},
    ('dq', 'sm90', 64, False): {'BLOCK_M': 64, 'BLOCK_N': 32, 'num_warps': 4, 'num_stages': 3},
    ('dq', 'sm90', 64, True): {'BLOCK_M': 64, 'BLOCK_N': 32, 'num_warps': 4, 'num_stages': 3},
    ('dq', 'sm90', 128, False): {'BLOCK_M': 64, 'BLOCK_N': 64, 'num_warps': 4, 'num_stages': 2},
    ('dq', 'sm90', 128, True): {'BLOCK_M': 64, 'BLOCK_N': 64, 'num_warps': 4, 'num_stages': 2},
    ('forward', 'sm90', 64, False): {'BLOCK_M': 64, 'BLOCK_N': 32, 'num_warps': 4, 'num_stages': 4, 'USE_TMA': True},
    ('forward', 'sm90', 64, True): {'BLOCK_M': 64, 'BLOCK_N': 32, 'num_warps': 4, 'num_stages': 4},
    ('forward', 'sm90', 128, False): {'BLOCK_M': 64, 'BLOCK_N': 64, 'num_warps': 4, 'num_stages': 3, 'USE_TMA': True},
    ('forward', 'sm90', 128, True): {'BLOCK_M': 64, 'BLOCK_N': 64, 'num_warps': 4, 'num_stages': 3},
}
