"""Turn a kernel sweep (bench_attention.py --only sweep, attention_sweep.json) into the
launch table gatedfwa/ops/window_attention/tuned.py.

    python benchmarks/sweep_to_configs.py benchmarks/results/attention_sweep.json
    python benchmarks/sweep_to_configs.py sweep.json --out /tmp/tuned.py    # look first

For each kernel (forward, dq, dkdv), head size and gate setting, the winner is the candidate
that passed the sweep's correctness check and has the least device time of that kernel,
summed over the windows swept at that head size (a candidate missing at one of them cannot
win). A winner that is the current default is still written: the table then records that
the default was measured. Needs no GPU and no Triton.
"""

from __future__ import annotations

import argparse
import json
import pprint
from pathlib import Path

KERNELS = ("forward", "dq", "dkdv")
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "USE_TMA")
TABLE = Path(__file__).resolve().parent.parent / "gatedfwa" / "ops" / "window_attention" / "tuned.py"


def block_d_for(head_dim: int) -> int:
    # As launch.block_d_for, without importing the package (and torch).
    return max(16, 1 << (head_dim - 1).bit_length())


def best_configs(rows: list[dict]) -> dict[tuple[str, int, bool], dict]:
    """{(kernel, BLOCK_D, has_gate): winning config} from sweep rows, each with kernel,
    head_dim, window, gate, config (dict), check ("ok" when correct) and kernel_ms."""
    totals: dict[tuple, dict[str, list]] = {}
    windows: dict[tuple, set] = {}
    for row in rows:
        if row.get("kernel") not in KERNELS:
            continue
        key = (row["kernel"], block_d_for(row["head_dim"]), bool(row["gate"]))
        windows.setdefault(key, set()).add(row["window"])
        if row.get("check") != "ok" or not isinstance(row.get("kernel_ms"), (int, float)):
            continue
        config = {name: row["config"][name] for name in CONFIG_KEYS if name in row["config"]}
        label = json.dumps(config, sort_keys=True)
        entry = totals.setdefault(key, {}).setdefault(label, [config, 0.0, set()])
        entry[1] += row["kernel_ms"]
        entry[2].add(row["window"])
    best = {}
    for key, candidates in totals.items():
        complete = [(ms, config) for config, ms, seen in candidates.values() if seen == windows[key]]
        if complete:
            best[key] = min(complete, key=lambda pair: pair[0])[1]
    return best


def table_source(best: dict, environment: dict) -> str:
    """Python source of tuned.py holding best."""
    measured_on = (f"{environment.get('gpu', '?')}, torch {environment.get('torch', '?')}, "
                   f"triton {environment.get('triton', '?')}, commit {str(environment.get('git_commit', '?'))[:10]}, "
                   f"{environment.get('date', '?')}")
    entries = "\n".join(f"    {key!r}: {pprint.pformat(best[key], width=200, sort_dicts=False)},"
                        for key in sorted(best))
    return f'''"""Measured launch configurations of the window attention kernels, written by
benchmarks/sweep_to_configs.py from a sweep (benchmarks/bench_attention.py --only sweep);
launch.py uses an entry where one exists and its own defaults elsewhere. Regenerate, do not edit.

TUNED[(kernel, BLOCK_D, has_gate)] = dict(BLOCK_M, BLOCK_N, num_warps, num_stages[, USE_TMA]), kernel one of "forward", "dq", "dkdv".

Measured on: {measured_on}
"""

TUNED: dict[tuple[str, int, bool], dict] = {{
{entries}
}}
'''


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="attention_sweep.json written by bench_attention.py --only sweep")
    parser.add_argument("--out", default=str(TABLE), help="where to write the table (default: the package's tuned.py)")
    args = parser.parse_args(argv)
    payload = json.loads(Path(args.sweep).read_text())
    best = best_configs(payload["rows"])
    if not best:
        parser.error("no candidate passed its check at every window: nothing to write")
    Path(args.out).write_text(table_source(best, payload.get("environment", {})))
    for key in sorted(best):
        print(key, best[key])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
