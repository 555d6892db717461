"""Measured launch configurations of the window attention kernels, written by
benchmarks/sweep_to_configs.py from a sweep (benchmarks/bench_attention.py --only sweep) on
the GPU named below; launch.py uses an entry where one exists and its own defaults elsewhere.

TUNED[(kernel, BLOCK_D, has_gate)] = dict(BLOCK_M, BLOCK_N, num_warps, num_stages[, USE_TMA]), kernel one of "forward", "dq", "dkdv".
"""

# No sweep committed yet: launch.py's defaults apply everywhere.
TUNED: dict[tuple[str, int, bool], dict] = {}
