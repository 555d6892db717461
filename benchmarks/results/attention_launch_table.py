"""Measured launch configurations of the window attention kernels, written by
benchmarks/sweep_to_configs.py from a kernel sweep's attention_sweep.json; copied over
gatedfwa/ops/window_attention/tuned.py, launch.py uses an entry where one exists and its own
defaults elsewhere. Regenerate, do not edit.

TUNED[(kernel, BLOCK_D, has_gate)] = dict(BLOCK_M, BLOCK_N, num_warps, num_stages[, USE_TMA]), kernel one of "forward", "dq", "dkdv".

Measured on: NVIDIA H200, torch 2.11.0+cu130, triton 3.6.0, commit 560fe4b117, 2026-11-30T20:17:47+00:00
"""

TUNED: dict[tuple[str, int, bool], dict] = {
    ('dkdv', 64, False): {'BLOCK_M': 64, 'BLOCK_N': 64, 'num_warps': 4, 'num_stages': 2},
    ('dkdv', 64, True): {'BLOCK_M': 32, 'BLOCK_N': 64, 'num_warps': 4, 'num_stages': 3, 'USE_TMA': True},
    ('dkdv', 128, False): {'BLOCK_M': 64, 'BLOCK_N': 64, 'num_warps': 4, 'num_stages': 2, 'USE_TMA': True},
    ('dkdv', 128, True): {'BLOCK_M': 64, 'BLOCK_N': 64, 'num_warps': 4, 'num_stages': 2, 'USE_TMA': True},
    ('dq', 64, False): {'BLOCK_M': 64, 'BLOCK_N': 32, 'num_warps': 4, 'num_stages': 3},
    ('dq', 64, True): {'BLOCK_M': 64, 'BLOCK_N': 32, 'num_warps': 4, 'num_stages': 3},
    ('dq', 128, False): {'BLOCK_M': 64, 'BLOCK_N': 64, 'num_warps': 4, 'num_stages': 2},
    ('dq', 128, True): {'BLOCK_M': 64, 'BLOCK_N': 64, 'num_warps': 4, 'num_stages': 2},
    ('forward', 64, False): {'BLOCK_M': 64, 'BLOCK_N': 32, 'num_warps': 4, 'num_stages': 4, 'USE_TMA': True},
    ('forward', 64, True): {'BLOCK_M': 64, 'BLOCK_N': 32, 'num_warps': 4, 'num_stages': 4},
    ('forward', 128, False): {'BLOCK_M': 64, 'BLOCK_N': 64, 'num_warps': 4, 'num_stages': 3, 'USE_TMA': True},
    ('forward', 128, True): {'BLOCK_M': 64, 'BLOCK_N': 64, 'num_warps': 4, 'num_stages': 3},
}
