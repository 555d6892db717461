"""`gatedfwa train --context-parallel N` on GPUs against one process: same losses?

Trains the same short run (a preset, bf16 autocast, eager) five ways on the GPUs of one host
and compares every step's training loss and gradient norm of each multi-process run with the
one-process run:

* ``one``: one process, one GPU;
* ``dp``: data parallel over N GPUs (DDP). With the preset's micro-batch size its ranks sum
  the same micro-batches as the one process accumulates, so it changes only the order of
  float32 sums;
* ``dp-micro-half``: the same with micro-batches of half the size, so that the weight
  gradients, which bf16 autocast rounds to bf16 once per micro-batch, are rounded over a
  different split of the batch: the yardstick for the context-parallel runs, whose ranks
  necessarily sum other parts of the batch (half of every window) than one process does;
* ``cp``: every window split across N GPUs (``--context-parallel N``);
* ``cp-fsdp``: the same with FSDP2 (``--fsdp``).

Everything goes to one pair of files, train_context_parallel.json / .md in --out: the
settings, every run's command and per-step records (metrics.jsonl), the per-step relative
loss and gradient-norm differences of dp, dp-micro-half, cp and cp-fsdp from one process, their largest
values, the final losses and tokens/s. The pair is rewritten after every run, so a run that
fails or is cut short still leaves the others' results (a failed run records its error and
the rest go on).

    python benchmarks/check_train_context_parallel.py --steps 20               # 2 GPUs
    python benchmarks/check_train_context_parallel.py --preset tiny --steps 4 --out /tmp/cp  # CPU processes

Why the context-parallel runs differ from one process by more than data parallelism does in
bf16: docs/distributed.md, "Precision", and benchmarks/check_context_parallel_drift.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402  (the commit measured: git's HEAD, clean tree)
from common import REPO, environment, write_results  # noqa: E402

NAME = "train_context_parallel"
SUMMARY_COLUMNS = ["arm", "processes", "options", "final train loss", "max rel. loss diff vs one",
                   "mean rel. loss diff vs one", "max rel. grad-norm diff vs one", "tokens/s (second half)",
                   "wall s", "error"]


def _train(run_dir: Path, processes: int, options: list[str], base: list[str]) -> dict:
    """Run `gatedfwa train` (under torchrun when processes > 1): {"command", "records"
    (metrics.jsonl), "wall_s"}, or {"command", "error"} when it fails."""
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    command = [*launcher, "-m", "gatedfwa.cli.main", "train", *base, *options, "--out", str(run_dir), "--no-progress"]
    print("+", " ".join(command), flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "4"}, capture_output=True, text=True)
    run = {"command": " ".join(command), "wall_s": time.perf_counter() - start}
    metrics = run_dir / "metrics.jsonl"
    if done.returncode != 0 or not metrics.exists():
        run["error"] = f"exit status {done.returncode}: {done.stderr[-4000:]}"
        print(run["error"], file=sys.stderr, flush=True)
        return run
    run["records"] = [json.loads(line) for line in metrics.read_text().splitlines()]
    return run


def _training_steps(run: dict) -> list[dict]:
    return [r for r in run.get("records", []) if "train_loss" in r]


def per_step_differences(reference: list[dict], other: list[dict], key: str) -> list[dict]:
    """[{"step", "one", "other", "rel_diff"}] for the steps both runs recorded `key` at:
    rel_diff = |other - one| / |one|."""
    theirs = {r["step"]: r[key] for r in other if key in r}
    rows = []
    for r in reference:
        if key in r and r["step"] in theirs:
            one, value = r[key], theirs[r["step"]]
            rows.append({"step": r["step"], "one": one, "other": value,
                         "rel_diff": abs(value - one) / max(abs(one), 1e-12)})
    return rows


def _summary(name: str, processes: int, options: list[str], run: dict, reference: list[dict]) -> tuple[dict, dict]:
    """The arm's row of the summary table and its per-step differences from one process."""
    row = {"arm": name, "processes": processes, "options": " ".join(options) or "-",
           "wall s": run.get("wall_s"), "error": run.get("error", "")[:80]}
    steps = _training_steps(run)
    differences = {}
    if steps:
        steady = [r["tokens_per_s"] for r in steps[len(steps) // 2:] if "tokens_per_s" in r]
        row["final train loss"] = steps[-1]["train_loss"]
        if steady:
            row["tokens/s (second half)"] = sum(steady) / len(steady)
    if steps and name != "one" and reference:
        for key in ("train_loss", "grad_norm"):
            differences[key] = per_step_differences(reference, steps, key)
        loss = [d["rel_diff"] for d in differences["train_loss"]]
        if len(loss) != len(reference):
            row["error"] = (row["error"] + f" recorded {len(loss)} of the {len(reference)} steps").strip()
        if loss:
            row["max rel. loss diff vs one"] = max(loss)
            row["mean rel. loss diff vs one"] = sum(loss) / len(loss)
        norms = [d["rel_diff"] for d in differences["grad_norm"]]
        if norms:
            row["max rel. grad-norm diff vs one"] = max(norms)
    return row, differences


def _per_step_table(reference: list[dict], differences: dict[str, dict]) -> list[str]:
    """Markdown lines: step, one process's loss, each arm's relative loss difference in %."""
    arms = [name for name, d in differences.items() if d.get("train_loss")]
    lines = ["", "## Per-step training loss: relative difference from one process", "",
             "| step | one: loss | " + " | ".join(f"{a}: diff %" for a in arms) + " |",
             "|" + "|".join("---" for _ in range(2 + len(arms))) + "|"]
    by_arm = {a: {d["step"]: d["rel_diff"] for d in differences[a]["train_loss"]} for a in arms}
    for r in reference:
        cells = [f"{100 * by_arm[a][r['step']]:.3g}" if r["step"] in by_arm[a] else "" for a in arms]
        lines.append(f"| {r['step']} | {r['train_loss']:.4f} | " + " | ".join(cells) + " |")
    return lines


def _write(out: str, settings: dict, arms: dict, runs: dict, complete: bool) -> None:
    reference = _training_steps(runs.get("one", {}))
    rows, differences = [], {}
    for name, run in runs.items():
        processes, options = arms[name]
        row, differences[name] = _summary(name, processes, options, run, reference)
        rows.append(row)
    payload = {"environment": environment(), **settings, "complete": complete, "summary": rows,
               "per_step_differences": {k: v for k, v in differences.items() if v}, "runs": runs}
    write_results(out, NAME, payload, rows, SUMMARY_COLUMNS)
    if reference:
        md = Path(out) / f"{NAME}.md"
        md.write_text(md.read_text() + "\n".join(_per_step_table(reference, differences)) + "\n")


def _micro_batch_size(preset: str, processes: int) -> int:
    """The windows per forward pass of each data-parallel process under `preset`
    (gatedfwa/train/config.py, TrainConfig.micro_steps)."""
    from gatedfwa.train.presets import get_preset

    settings = get_preset(preset)
    return settings.get("micro_batch_size") or max(1, settings["batch_size"] // processes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"),
                        help="folder for train_context_parallel.json and .md (default benchmarks/results)")
    parser.add_argument("--preset", default="gpu-20m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--gpus", type=int, default=min(2, torch.cuda.device_count()) or 2,
                        help="processes of the multi-process runs (default 2; on a machine without GPUs they "
                             "run on the CPU)")
    parser.add_argument("--context-parallel", type=int, default=None,
                        help="ranks each window is split across in the cp runs (default: --gpus)")
    provenance.add_options(parser)
    args = parser.parse_args()
    provenance.settle_or_exit(parser, args)
    if args.gpus < 2:
        parser.error("--gpus must be at least 2")
    split = args.context_parallel or args.gpus
    if args.gpus % split:
        parser.error(f"--context-parallel {split} must divide --gpus {args.gpus}")

    base = ["--preset", args.preset, "--max-steps", str(args.steps), "--eval-interval", str(args.steps),
            "--save-interval", "0", "--no-plot"]
    half = max(1, _micro_batch_size(args.preset, args.gpus) // 2)
    arms = {"one": (1, []), "dp": (args.gpus, []), "dp-micro-half": (args.gpus, ["--micro-batch-size", str(half)]),
            "cp": (args.gpus, ["--context-parallel", str(split)]),
            "cp-fsdp": (args.gpus, ["--context-parallel", str(split), "--fsdp"])}
    settings = {"preset": args.preset, "steps": args.steps, "gpus": args.gpus, "context_parallel": split,
                "base_options": " ".join(base)}
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, (processes, options) in arms.items():
            runs[name] = _train(Path(scratch) / name, processes, options, base)
            _write(args.out, settings, arms, runs, complete=False)
    _write(args.out, settings, arms, runs, complete=True)
    print((Path(args.out) / f"{NAME}.md").read_text())
    if any("error" in run for run in runs.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
