"""Runs several experiments in one process and writes each one's JSON and PNG.

    python benchmarks/experiments/run.py --quick --out /tmp/exp                 # all six, CPU, about a minute
    python benchmarks/experiments/run.py lm_equal_tokens context_use memory_gradient_flow --out DIR --budget-s 480
    python benchmarks/experiments/run.py associative_recall second_domain cost --out DIR --budget-s 420

One process lets experiments share what they have in common: lm_equal_tokens,
context_use and memory_gradient_flow study the same trained models, which are trained
once (lm.py caches them). Each experiment has its own time budget (``budget_s`` in its
config) inside the overall ``--budget-s``; arms that no longer fit are recorded as skipped.
An experiment that fails leaves its error in its JSON and the others still run; the exit
status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

import torch

import kit

EXPERIMENTS = ["lm_equal_tokens", "context_use", "memory_gradient_flow", "associative_recall", "second_domain", "cost"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments", nargs="*", metavar="NAME",
                        help=f"which to run, in this order (default: all: {' '.join(EXPERIMENTS)})")
    kit.add_common_options(parser)
    args = parser.parse_args(argv)
    unknown = [name for name in args.experiments if name not in EXPERIMENTS]
    if unknown:
        parser.error(f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    names = args.experiments or EXPERIMENTS
    try:
        overrides = kit.parse_overrides(args.overrides)
        configs = {name: kit.build_config(importlib.import_module(name), args.quick, args.kinds, args.seeds, args.device,
                                          overrides) for name in names}
    except ValueError as error:
        parser.error(f"{error} (--set applies to every experiment named)")
    kit.provenance.settle_or_exit(parser, args, strict=not args.quick)
    deadline = kit.Deadline(args.budget_s)
    threads = torch.get_num_threads()
    if args.quick:
        torch.set_num_threads(1)  # tiny models: threads only contend
    failed = []
    try:
        for name in names:
            try:
                kit.run_experiment(importlib.import_module(name), configs[name], args.out, args.quick, deadline)
            except Exception:
                traceback.print_exc()
                failed.append(name)
    finally:
        torch.set_num_threads(threads)
    print(f"done: {len(names) - len(failed)} of {len(names)} experiments" + (f"; failed: {', '.join(failed)}" if failed else ""),
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
