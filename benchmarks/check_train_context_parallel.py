"""`gatedfwa train --context-parallel N` on GPUs against one process: same losses?

Trains the same short run (a preset, bf16 autocast, eager) four ways on the GPUs of one host
and compares the per-step training loss and gradient norm of each multi-process run with the
one-process run:

* ``one``: one process, one GPU;
* ``dp``: data parallel over all GPUs (DDP), the yardstick: it changes only the order of float
  sums, which is what "equal within floating-point tolerance" has to mean in bf16;
* ``cp``: every window split across all GPUs (``--context-parallel N``);
* ``cp-fsdp``: the same with FSDP2 (``--fsdp``).

Writes train_context_parallel.json / .md (every run's per-step records, the largest relative
loss and gradient-norm differences, tokens/s) to --out.

    python benchmarks/check_train_context_parallel.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402  (the commit measured: git's HEAD, clean tree)
from common import REPO, environment, write_results  # noqa: E402


def _train(run_dir: Path, processes: int, options: list[str], base: list[str]) -> list[dict]:
    """Run `gatedfwa train` (under torchrun when processes > 1); its metrics.jsonl records."""
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    command = [*launcher, "-m", "gatedfwa.cli.main", "train", *base, *options, "--out", str(run_dir), "--no-progress"]
    print("+", " ".join(command), flush=True)
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "4"}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _largest_relative_difference(reference: list[dict], other: list[dict], key: str) -> float:
    pairs = [(a[key], b[key]) for a, b in zip(reference, other) if key in a and key in b]
    if len(pairs) != sum(key in a for a in reference):
        raise RuntimeError(f"the runs recorded different steps for {key}")
    return max(abs(b - a) / max(abs(a), 1e-12) for a, b in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--preset", default="gpu-20m")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    provenance.add_options(parser)
    args = parser.parse_args()
    provenance.settle_or_exit(parser, args)
    if args.gpus < 2:
        raise SystemExit("needs at least 2 GPUs (--gpus)")

    base = ["--preset", args.preset, "--max-steps", str(args.steps), "--eval-interval", str(args.steps),
            "--save-interval", "0", "--no-plot"]
    arms = {"one": (1, []), "dp": (args.gpus, []), "cp": (args.gpus, ["--context-parallel", str(args.gpus)]),
            "cp-fsdp": (args.gpus, ["--context-parallel", str(args.gpus), "--fsdp"])}
    records = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, (processes, options) in arms.items():
            records[name] = _train(Path(scratch) / name, processes, options, base)

    train = {name: [r for r in rows if "train_loss" in r] for name, rows in records.items()}
    rows = []
    for name in arms:
        steady = [r["tokens_per_s"] for r in train[name][len(train[name]) // 2:]]
        row = {"arm": name, "processes": arms[name][0], "options": " ".join(arms[name][1]) or "-",
               "final train loss": train[name][-1]["train_loss"],
               "tokens/s (second half)": sum(steady) / len(steady)}
        if name != "one":
            row["max rel. loss diff vs one"] = _largest_relative_difference(train["one"], train[name], "train_loss")
            row["max rel. grad-norm diff vs one"] = _largest_relative_difference(train["one"], train[name], "grad_norm")
        rows.append(row)
    payload = {"environment": environment(), "preset": args.preset, "steps": args.steps, "gpus": args.gpus,
               "summary": rows, "records": records}
    write_results(args.out, "train_context_parallel", payload, rows,
                  ["arm", "processes", "options", "final train loss", "max rel. loss diff vs one",
                   "max rel. grad-norm diff vs one", "tokens/s (second half)"])
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
