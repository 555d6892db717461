"""Measured launch configurations of the window attention kernels, for launch.py's TUNING:
an entry takes precedence over launch.py's rule for its kernel, architecture, BLOCK_D and
gate setting. Written by benchmarks/sweep_to_configs.py from a sweep
(benchmarks/sweep_attention.py) on the GPU it names; adopting a table is a change to the
library, made by copying the written file over this one after the GPU tests pass with it.

MEASURED[(kernel, arch, BLOCK_D, gate)] = dict(BLOCK_M, BLOCK_N, num_warps, num_stages[, USE_TMA]),
kernel one of "forward", "dq", "dkdv"; arch as gatedfwa.ops.common.tuning.architecture names it.
"""

# No sweep adopted yet: launch.py's rules apply everywhere.
MEASURED: dict[tuple[str, str, int, bool], dict] = {}
