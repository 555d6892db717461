"""Merges the arms of two runs of one experiment into one record, when they are like for like.

    python benchmarks/experiments/merge.py BASE.json EXTRA.json --out DIR
    python benchmarks/experiments/merge.py BASE.json EXTRA.json --out DIR --allow-mixed-commits "REASON"

A run that adds arms to a published one (e.g. lm_equal_tokens with ``--kinds nsa
nsa-gatedfwa``, or cost with ``--set parts='["decode"]'``) writes its own JSON; this script
combines the two into ``DIR/<name>.json`` and redraws ``DIR/<name>.png``. The arms are like
for like only if everything but the selection of arms is the same, so the two configs must
be equal except for the keys in SELECTION_KEYS (which kinds, seeds, parts, the device
setting and the time budget); the data order, steps and initialisation of an arm depend only
on its seed and the config, never on which other arms ran. An arm of EXTRA replaces the arm
of BASE with the same name (the experiment's ARM_KEYS, e.g. kind and seed); the results are
then derived again from the merged arms by the experiment's ``summarise``.

Provenance. The merged record lists under ``sources`` every run whose arms it holds (file,
environment with commit, GPU and versions, wall time): a BASE that is itself a merge
contributes its own sources, not itself, so each arm keeps the run it came from. Each arm's
``source`` is the index of its run in ``sources``; runs none of whose arms remain are
dropped. The record's ``environment`` holds what all sources share (GPU, versions; the
commit only if they all have the same one).

Runs on different GPUs or different torch or triton versions are refused: their speeds are
not comparable. Runs of different code are refused too: two sources have the same code when
they name the same commit, or commits whose ``gatedfwa/`` and ``benchmarks/`` trees (results
aside) are equal in git; a source with an unknown commit or a dirty tree matches none.
``--allow-mixed-commits REASON`` merges them anyway and records the commits and the reason
under ``mixed_commits``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import kit

import provenance  # noqa: E402  (on sys.path through kit)

# Settings that choose which arms run, not how an arm runs.
SELECTION_KEYS = {"kinds", "seeds", "parts", "decode_kinds", "device", "budget_s"}
# What must agree between the two environments for their arms to be compared.
ENVIRONMENT_KEYS = ("gpu", "torch", "triton")
# The code an arm's numbers depend on: two commits whose trees agree here measured the same.
MEASURED_CODE = ("gatedfwa", "benchmarks", ":(exclude)benchmarks/results")


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


def runs_of(path: Path, data: dict) -> tuple[list[dict], list[int]]:
    """(sources, the source index of each arm) of one record: a merged record's own
    sources, or the record itself as its only source."""
    if data.get("sources"):
        return [dict(source) for source in data["sources"]], [arm["source"] for arm in data["arms"]]
    source = {"file": str(path), "environment": data["environment"], "wall_s": data["wall_s"]}
    return [source], [0] * len(data["arms"])


def same_code(first: dict, second: dict) -> bool:
    """Whether two sources' environments name the same measured code (see the docstring)."""
    commits = [env.get("git_commit") for env in (first, second)]
    if any(not commit or commit == provenance.UNKNOWN for commit in commits):
        return False
    if first.get("dirty") or second.get("dirty"):
        return False
    if commits[0] == commits[1]:
        return True
    return provenance.git("diff", "--quiet", commits[0], commits[1], "--", *MEASURED_CODE) is not None


def code_groups(sources: list[dict]) -> list[list[int]]:
    """Indices of ``sources`` grouped by measured code, in first-seen order."""
    groups: list[list[int]] = []
    for index, source in enumerate(sources):
        for group in groups:
            if same_code(sources[group[0]]["environment"], source["environment"]):
                group.append(index)
                break
        else:
            groups.append([index])
    return groups


def shared_environment(sources: list[dict]) -> dict:
    """The environment fields every source has with the same value, and ``git_commits``
    (each source's commit, in order of first appearance) where they differ."""
    envs = [source["environment"] for source in sources]
    shared = {key: value for key, value in envs[0].items() if all(env.get(key) == value for env in envs[1:])}
    commits = list(dict.fromkeys(str(env.get("git_commit")) for env in envs))
    if len(commits) > 1:
        shared["git_commits"] = commits
    return shared


def mixed_commits(sources: list[dict], base_sources: list[dict], from_extra: list[dict], earlier: dict | None,
                  reason: str | None) -> dict | None:
    """None when every source of the merged record measured the same code; else
    ``{"commits", "reasons"}`` to record, given a ``reason`` or a base already mixed by a
    recorded decision (``earlier``) to which the extra run adds no code of its own.
    Raises ValueError otherwise."""
    if len(code_groups(sources)) <= 1:
        return None
    commits = list(dict.fromkeys(str(source["environment"].get("git_commit")) for source in sources))
    reasons = (earlier or {}).get("reasons", [])
    if reason:
        return {"commits": commits, "reasons": reasons + [reason]}
    new_code = [source for source in from_extra
                if not any(same_code(source["environment"], old["environment"]) for old in base_sources)]
    if reasons and not new_code:
        return {"commits": commits, "reasons": reasons}
    raise ValueError(
        f"the runs measured different code (commits {', '.join(commits)}; an unknown commit or a dirty tree "
        "matches none): re-run the arms on one commit, or pass --allow-mixed-commits REASON")


def merge(base_path: Path, extra_path: Path, out_dir: Path, allow_mixed_commits: str | None = None) -> kit.Record:
    """The merged record, saved as ``out_dir/<name>.json`` with its PNG.

    ``allow_mixed_commits``: the reason for merging runs of different code (recorded);
    without it such runs are refused with a ValueError."""
    base, extra = json.loads(Path(base_path).read_text()), json.loads(Path(extra_path).read_text())
    check_like_for_like(base, extra)
    module = importlib.import_module(base["experiment"])
    config = dict(base["config"])
    for key in SELECTION_KEYS:
        if isinstance(config.get(key), list) and isinstance(extra["config"].get(key), list):
            config[key] = union(config[key], extra["config"][key])

    base_sources, base_index = runs_of(base_path, base)
    extra_sources, extra_index = runs_of(extra_path, extra)
    replaced = {arm_name(module, arm) for arm in extra["arms"]}
    arms = [(arm, index) for arm, index in zip(base["arms"], base_index) if arm_name(module, arm) not in replaced]
    arms += [(arm, len(base_sources) + index) for arm, index in zip(extra["arms"], extra_index)]
    candidates = base_sources + extra_sources
    kept = sorted({index for _, index in arms})  # runs with no arm left drop out
    renumber = {old: new for new, old in enumerate(kept)}
    sources = [candidates[old] for old in kept]

    from_extra = [candidates[old] for old in kept if old >= len(base_sources)]
    mixed = mixed_commits(sources, base_sources, from_extra, base.get("mixed_commits"), allow_mixed_commits)

    record = kit.Record(base["experiment"], base["claim"], config, out_dir, base["quick"],
                        env=shared_environment(sources))
    record.data.update(sources=sources,
                       seeds=union(base["config"].get("seeds") or [], extra["config"].get("seeds") or []))
    if mixed:
        record.data["mixed_commits"] = mixed
    record.data["arms"] = [{**arm, "source": renumber[index]} for arm, index in arms]
    done = {arm_name(module, arm) for arm, _ in arms}
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
    parser.add_argument("--allow-mixed-commits", metavar="REASON",
                        help="merge runs of different code anyway; the commits and REASON are recorded")
    args = parser.parse_args(argv)
    if args.allow_mixed_commits is not None and not args.allow_mixed_commits.strip():
        parser.error("--allow-mixed-commits: expected a reason, got an empty string")
    try:
        record = merge(args.base, args.extra, args.out, args.allow_mixed_commits)
    except (ValueError, KeyError, AttributeError) as error:
        parser.error(str(error))
    print(f"{record.name}: {len(record.arms)} arms from {len(record.data['sources'])} runs -> {record.json_path}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
