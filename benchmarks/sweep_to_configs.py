"""Turn a kernel sweep (sweep_attention.py, attention_sweep.json) into the launch table of
the window attention kernels, in the form the library reads
(gatedfwa/ops/window_attention/tuned.py: MEASURED[(kernel, arch, BLOCK_D, gate)] = config, the
measured entries of launch.py's TUNING).

    python benchmarks/sweep_to_configs.py benchmarks/results/attention_sweep.json
    python benchmarks/sweep_to_configs.py sweep.json --out /tmp/table.py     # elsewhere
    python benchmarks/sweep_to_configs.py old_sweep.json --arch sm90         # a sweep without its arch

The architecture (e.g. "sm90") is the one the sweep recorded in its environment; entries of
other architectures in the current table are carried over unchanged.

For each kernel (forward, dq, dkdv), head size and gate setting, the winner is the candidate
that passed the sweep's correctness check and has the least device time of that kernel,
summed over the windows swept at that head size (a candidate missing at one of them cannot
win). A winner that is the current default is still written: the table then records that
the default was measured.

The table goes to benchmarks/results/attention_launch_table.py (beside the sweep it comes
from), never into the package: adopting it is a change to the library, made by copying the
file over gatedfwa/ops/window_attention/tuned.py. The script prints each entry against the
package's current table (new, changed or the same). Needs no GPU, no torch and no Triton.
"""

from __future__ import annotations

import argparse
import json
import pprint
from pathlib import Path

KERNELS = ("forward", "dq", "dkdv")
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "USE_TMA")
REPO = Path(__file__).resolve().parent.parent
LAUNCH_TABLE_NAME = "attention_launch_table.py"
TABLE = REPO / "benchmarks" / "results" / LAUNCH_TABLE_NAME
# The table the library reads now (compared against, never written).
PACKAGE_TABLE = REPO / "gatedfwa" / "ops" / "window_attention" / "tuned.py"


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


def swept_defaults(rows: list[dict]) -> dict[tuple[str, int, bool], dict]:
    """{(kernel, BLOCK_D, has_gate): launch.py's own choice when the sweep ran} (the sweep
    labels that candidate "(default)")."""
    defaults = {}
    for row in rows:
        if row.get("kernel") in KERNELS and str(row.get("candidate", "")).endswith("(default)"):
            key = (row["kernel"], block_d_for(row["head_dim"]), bool(row["gate"]))
            defaults[key] = {name: row["config"][name] for name in CONFIG_KEYS if name in row["config"]}
    return defaults


def table_source(best: dict, environment: dict, arch: str, others: dict | None = None) -> str:
    """Python source of tuned.py holding best ({(kernel, BLOCK_D, gate): config}) on `arch`,
    and others ({(kernel, arch, BLOCK_D, gate): config} of other architectures) unchanged."""
    measured_on = (f"{environment.get('gpu', '?')} ({arch}), torch {environment.get('torch', '?')}, "
                   f"triton {environment.get('triton', '?')}, commit {str(environment.get('git_commit', '?'))[:10]}, "
                   f"{environment.get('date', '?')}")
    table = {key: config for key, config in (others or {}).items() if key[1] != arch}
    table.update({(kernel, arch, block_d, gate): config for (kernel, block_d, gate), config in best.items()})
    entries = "\n".join(f"    {key!r}: {pprint.pformat(table[key], width=200, sort_dicts=False)},"
                        for key in sorted(table))
    return f'''"""Measured launch configurations of the window attention kernels, for launch.py's TUNING:
an entry takes precedence over launch.py's rule for its kernel, architecture, BLOCK_D and
gate setting. Written by benchmarks/sweep_to_configs.py from a sweep
(benchmarks/sweep_attention.py); adopting a table is a change to the library, made by copying
the written file over gatedfwa/ops/window_attention/tuned.py after the GPU tests pass with it.
Regenerate, do not edit.

MEASURED[(kernel, arch, BLOCK_D, gate)] = dict(BLOCK_M, BLOCK_N, num_warps, num_stages[, USE_TMA]),
kernel one of "forward", "dq", "dkdv"; arch as gatedfwa.ops.common.tuning.architecture names it.

Measured on ({arch}): {measured_on}
"""

MEASURED: dict[tuple[str, str, int, bool], dict] = {{
{entries}
}}
'''


def read_table(path: Path) -> dict | None:
    """MEASURED of a launch table file (a tuned.py): {(kernel, arch, BLOCK_D, gate): config},
    or None where there is no such file."""
    if not path.is_file():
        return None
    namespace: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    return namespace["MEASURED"]


def on_architecture(table: dict, arch: str) -> dict:
    """{(kernel, BLOCK_D, gate): config} of a MEASURED table's entries for `arch`."""
    return {(kernel, block_d, gate): config for (kernel, entry_arch, block_d, gate), config in table.items()
            if entry_arch == arch}


def compare_tables(best: dict, current: dict, defaults: dict | None = None) -> list[str]:
    """One line per entry of either table: new, changed (with the current entry), the same,
    or only in the current table; a winner that was launch.py's choice when swept (defaults)
    says so."""
    defaults = defaults or {}
    lines = []
    for key in sorted(set(best) | set(current)):
        if key not in best:
            lines.append(f"dropped  {key}: {current[key]} (no winner in this sweep)")
            continue
        if key not in current:
            line = f"new      {key}: {best[key]}"
        elif best[key] != current[key]:
            line = f"changed  {key}: {best[key]} (now {current[key]})"
        else:
            line = f"same     {key}: {best[key]}"
        lines.append(line + (" (launch.py's default when swept)" if defaults.get(key) == best[key] else ""))
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="attention_sweep.json written by sweep_attention.py")
    parser.add_argument("--out", default=str(TABLE), help=f"where to write the table (default: {TABLE.relative_to(REPO)})")
    parser.add_argument("--current", default=str(PACKAGE_TABLE),
                        help="the table to compare with and carry other architectures' entries from "
                             "(default: the package's tuned.py)")
    parser.add_argument("--arch", help="the architecture the sweep ran on (e.g. sm90), for a sweep that did not "
                                       "record it")
    args = parser.parse_args(argv)
    if Path(args.out).resolve() == PACKAGE_TABLE.resolve():
        parser.error(f"--out {args.out}: the package's table is changed by copying the written file over it, "
                     "as a change to the library, not by this script")
    payload = json.loads(Path(args.sweep).read_text())
    environment = payload.get("environment", {})
    arch = environment.get("arch") or args.arch
    if not arch:
        parser.error(f"{args.sweep} records no architecture: pass --arch (e.g. sm90 for an H100/H200)")
    if args.arch and args.arch != arch:
        parser.error(f"--arch {args.arch}: the sweep records that it ran on {arch}")
    best = best_configs(payload["rows"])
    if not best:
        parser.error("no candidate passed its check at every window: nothing to write")
    current = read_table(Path(args.current))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table_source(best, environment, arch, current))
    if current is None:
        print(f"(no table at {args.current} to compare with)")
    print(f"against {args.current} on {arch}:")
    print("\n".join(compare_tables(best, on_architecture(current or {}, arch), swept_defaults(payload["rows"]))))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
