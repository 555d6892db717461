"""Merges the arms of two runs of one experiment into one record, when they are like for like.

    python benchmarks/experiments/merge.py BASE.json EXTRA.json --out DIR

A run that adds arms to a published one (e.g. lm_equal_tokens with ``--kinds nsa
nsa-gatedfwa``, or cost with ``--set parts='["decode"]'``) writes its own JSON; this script
combines the two into ``DIR/<name>.json`` and redraws ``DIR/<name>.png``. The arms are like
for like only if everything but the selection of arms is the same, so the two configs must
be equal except for the keys in SELECTION_KEYS (which kinds, seeds, parts, the device
setting and the time budget); the data order, steps and initialisation of an arm depend only
on its seed and the config, never on which other arms ran. An arm of EXTRA replaces the arm
of BASE with the same name (the experiment's ARM_KEYS, e.g. kind and seed); the results are
then derived again from the merged arms by the experiment's ``summarise``.

The merged record keeps both runs' provenance under ``sources`` (file, environment with
commit, GPU and versions, wall time) and marks every arm with the index of the source it
came from (``source``). Runs on different GPUs or different torch or triton versions are
refused: their speeds are not comparable.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import kit

# Settings that choose which arms run, not how an arm runs.
SELECTION_KEYS = {"kinds", "seeds", "parts", "decode_kinds", "device", "budget_s"}
# What must agree between the two environments for their arms to be compared.
ENVIRONMENT_KEYS = ("gpu", "torch", "triton")


def arm_name(module, arm: dict) -> tuple:
    return tuple(arm.get(key) for key in module.ARM_KEYS)


def union(first: list, second: list) -> list:
    """Items of ``first`` then those of ``second`` not in it, in order."""
    return first + [item for item in second if item not in first]


def check_like_for_like(base: dict, extra: dict) -> None:
    if base["experiment"] != extra["experiment"]:
        raise ValueError(f"different experiments: {base['experiment']} and {extra['experiment']}")
    if base["quick"] != extra["quick"]:
        raise ValueError("one record is a --quick run and the other is not")
    keys = (set(base["config"]) | set(extra["config"])) - SELECTION_KEYS
    differing = sorted(key for key in keys if base["config"].get(key) != extra["config"].get(key))
    if differing:
        raise ValueError(f"the runs are not like for like: their configs differ in {', '.join(differing)}")
    env_differing = [key for key in ENVIRONMENT_KEYS
                     if base["environment"].get(key) != extra["environment"].get(key)]
    if env_differing:
        raise ValueError("the runs come from different environments ("
                         + ", ".join(f"{key}: {base['environment'].get(key)} vs {extra['environment'].get(key)}"
                                     for key in env_differing) + ")")


def merge(base_path: Path, extra_path: Path, out_dir: Path) -> kit.Record:
    """The merged record, saved as ``out_dir/<name>.json`` with its PNG."""
    base, extra = json.loads(Path(base_path).read_text()), json.loads(Path(extra_path).read_text())
    check_like_for_like(base, extra)
    module = importlib.import_module(base["experiment"])
    config = dict(base["config"])
    for key in SELECTION_KEYS:
        if isinstance(config.get(key), list) and isinstance(extra["config"].get(key), list):
            config[key] = union(config[key], extra["config"][key])
    record = kit.Record(base["experiment"], base["claim"], config, out_dir, base["quick"])
    sources = [{"file": str(path), "environment": data["environment"], "wall_s": data["wall_s"]}
               for path, data in ((base_path, base), (extra_path, extra))]
    record.data.update(environment=extra["environment"], sources=sources,
                       seeds=union(base["config"].get("seeds") or [], extra["config"].get("seeds") or []))
    replaced = {arm_name(module, arm) for arm in extra["arms"]}
    arms = [{**arm, "source": 0} for arm in base["arms"] if arm_name(module, arm) not in replaced]
    arms += [{**arm, "source": 1} for arm in extra["arms"]]
    record.data["arms"] = arms
    done = {arm_name(module, arm) for arm in arms}
    record.data["skipped"] = [entry for entry in base["skipped"] + extra["skipped"] if arm_name(module, entry) not in done]
    record.data["wall_s"] = sum(source["wall_s"] or 0 for source in sources)
    module.summarise(config, record)
    module.plot(record, Path(out_dir) / f"{module.NAME}.png")
    record.save()
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="merge.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path, help="the published record")
    parser.add_argument("extra", type=Path, help="the run with the arms to add or replace")
    parser.add_argument("--out", type=Path, required=True, help="folder of the merged JSON and PNG")
    args = parser.parse_args(argv)
    try:
        record = merge(args.base, args.extra, args.out)
    except (ValueError, KeyError, AttributeError) as error:
        parser.error(str(error))
    print(f"{record.name}: {len(record.arms)} arms -> {record.json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
