"""What every experiment script shares: the command line, seeds, the time budget, the
result record (JSON with config, seeds, versions, commit and every number) and the plotting
helpers (matplotlib, mean line with the seeds' spread as a band).

An experiment is a module with

    NAME:   str                         file stem of its JSON and PNG
    CLAIM:  str                         the claim it tests, one sentence
    config(quick: bool) -> dict         every setting of the run (stored in the JSON)
    run(config, record, deadline)       fills record.results (saving as it goes)
    plot(record, png_path)              draws the figure from record.results

and ends with ``if __name__ == "__main__": kit.main(sys.modules[__name__])``. ``run.py``
runs several of them in one process (so trained models are shared, see lm.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "experiments"
# Scripts run from anywhere find the package of this checkout and benchmarks/common.py.
for _path in (REPO, REPO / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import provenance  # noqa: E402  (the commit measured, shared with the bench_*.py scripts)


# --------------------------------------------------------------------------------------
# Seeds, devices, versions
# --------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Python-side and torch generators (data orders use their own numpy generators)."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def environment(quick: bool = False) -> dict:
    """Date, commit (``git_commit``, ``dirty``, ``commit_from``: provenance.py), package
    versions and the device the numbers come from. Outside ``quick`` runs a commit that
    cannot be stated truthfully raises provenance.ProvenanceError."""
    from importlib import metadata

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **provenance.recorded(strict=not quick),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
    }
    for package in ("triton", "numpy", "transformers", "matplotlib", "music21"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(), cuda=torch.version.cuda)
    return info


# --------------------------------------------------------------------------------------
# Time budget
# --------------------------------------------------------------------------------------


class Deadline:
    """A wall-clock limit. Experiments ask before each arm whether an arm as long as the
    longest one so far still fits; those that do not are recorded as skipped, never cut
    short, so every number in a record comes from a complete arm."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.end = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()

    def allows(self, estimate_s: float) -> bool:
        return self.remaining() >= estimate_s

    def narrowed(self, seconds: float | None) -> "Deadline":
        """The earlier of this deadline and ``seconds`` from now."""
        if seconds is None:
            return self
        return Deadline(min(self.remaining(), seconds))


# --------------------------------------------------------------------------------------
# The record of one experiment
# --------------------------------------------------------------------------------------


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf/nan; "inf"/"nan" stay visible
    if isinstance(value, Path):
        return str(value)
    return value


class Record:
    """Everything one experiment produces, written to ``<out>/<name>.json`` after every arm
    (so a run stopped from outside still leaves the finished arms)."""

    def __init__(self, name: str, claim: str, config: dict, out_dir: Path, quick: bool,
                 env: dict | None = None):
        """``env``: the record's environment, given by merge.py (whose arms come from other
        runs); taken now (``environment(quick)``) if None."""
        self.name, self.out_dir = name, Path(out_dir)
        self.started = time.monotonic()
        self.data = {
            "experiment": name, "claim": claim, "quick": quick, "config": config,
            "seeds": config.get("seeds"),
            "environment": environment(quick) if env is None else env,
            "arms": [], "skipped": [], "results": {}, "figures": [], "wall_s": None,
        }

    @property
    def config(self) -> dict:
        return self.data["config"]

    @property
    def arms(self) -> list[dict]:
        return self.data["arms"]

    @property
    def results(self) -> dict:
        return self.data["results"]

    @property
    def json_path(self) -> Path:
        return self.out_dir / f"{self.name}.json"

    def add_arm(self, arm: dict) -> None:
        self.arms.append(arm)
        self.save()

    def skip(self, arm: dict, reason: str) -> None:
        self.data["skipped"].append({**arm, "reason": reason})
        self.save()

    def save(self) -> None:
        if not self.data.get("sources"):  # a merged record keeps the sum of its sources' times
            self.data["wall_s"] = time.monotonic() - self.started
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_jsonable(self.data), indent=1) + "\n")
        tmp.replace(self.json_path)


def run_arms(arms: list[dict], run_one, record: Record, deadline: Deadline, label=None) -> None:
    """run_one(arm) -> dict of numbers, for each arm while the deadline allows one more arm
    as long as the longest so far; each result is stored as ``{**arm, **numbers, wall_s}``."""
    longest = 0.0
    for arm in arms:
        if not deadline.allows(longest):
            record.skip(arm, f"time budget: {deadline.remaining():.0f} s left, an arm took up to {longest:.0f} s")
            continue
        started = time.monotonic()
        numbers = run_one(arm)
        wall = time.monotonic() - started
        longest = max(longest, wall)
        record.add_arm({**arm, **numbers, "wall_s": wall})
        print(f"  {record.name}: {label(arm) if label else arm} done in {wall:.1f} s", file=sys.stderr, flush=True)


def run_arms_parallel(arms: list[dict], run_one, record: Record, deadline: Deadline, workers: int, label=None) -> None:
    """run_arms with up to ``workers`` arms at once, each in its own process (spawned, so
    each has its own CUDA context). For models so small that a step is bound by kernel
    launches on the host: one process leaves the GPU mostly idle, several fill it.

    ``run_one`` must be a module-level function (it is pickled). Arms run in waves of
    ``workers``; a wave starts only while the deadline allows one as long as the longest so
    far. Results are recorded in arm order as each wave completes. ``workers <= 1`` is
    run_arms."""
    if workers <= 1 or len(arms) <= 1:
        return run_arms(arms, run_one, record, deadline, label)
    import concurrent.futures
    import multiprocessing

    longest = 0.0
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        for first in range(0, len(arms), workers):
            wave = arms[first:first + workers]
            if not deadline.allows(longest):
                for arm in wave:
                    record.skip(arm, f"time budget: {deadline.remaining():.0f} s left, a wave took up to {longest:.0f} s")
                continue
            started = time.monotonic()
            futures = [pool.submit(_timed, run_one, arm) for arm in wave]
            for arm, future in zip(wave, futures):
                numbers, wall = future.result()
                record.add_arm({**arm, **numbers, "wall_s": wall})
                print(f"  {record.name}: {label(arm) if label else arm} done in {wall:.1f} s", file=sys.stderr, flush=True)
            longest = max(longest, time.monotonic() - started)


def _timed(run_one, arm: dict) -> tuple[dict, float]:
    """(run_one(arm), its wall seconds), in a worker process."""
    started = time.monotonic()
    numbers = run_one(arm)
    return numbers, time.monotonic() - started


def spread(values) -> dict:
    """mean, std (sample, 0 for one value), min, max and n of finite values."""
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def group_by(arms: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    """Arms grouped by the values of ``keys`` (in first-seen order)."""
    groups: dict[tuple, list[dict]] = {}
    for arm in arms:
        groups.setdefault(tuple(arm.get(k) for k in keys), []).append(arm)
    return groups


def log_bins(last: int, count: int) -> np.ndarray:
    """Edges of about ``count`` logarithmic bins over 0..last: 0, then unique rounded
    values of geomspace(1, last) (the first bin is [0, 1), i.e. position or distance 0)."""
    edges = np.unique(np.round(np.geomspace(1, last, count + 1)).astype(int))
    return np.concatenate(([0], edges))


# --------------------------------------------------------------------------------------
# Plotting
# --------------------------------------------------------------------------------------


def pyplot():
    """matplotlib.pyplot with the file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


KIND_COLORS = {"gatedfwa": "C0", "swa": "C1", "full": "C2", "forgetting": "C3", "nsa": "C4", "nsa-gatedfwa": "C5"}


def kind_color(kind: str, index: int = 0) -> str:
    return KIND_COLORS.get(kind, f"C{4 + index % 6}")


def plot_band(ax, x, curves, label: str, color: str, marker=None) -> None:
    """Mean of ``curves`` (one list of y per seed, equal lengths) as a line, min..max as a band."""
    y = np.asarray(curves, dtype=float)
    if y.ndim != 2 or y.shape[1] == 0:
        return
    mean = np.nanmean(y, axis=0)
    ax.plot(x, mean, color=color, label=label, marker=marker, markersize=3)
    if y.shape[0] > 1:
        ax.fill_between(x, np.nanmin(y, axis=0), np.nanmax(y, axis=0), color=color, alpha=0.2, linewidth=0)


def save_figure(fig, record: Record, png_path: Path) -> None:
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    pyplot().close(fig)
    record.data["figures"].append(Path(png_path).name)


def title_note(record: Record) -> str:
    """A short provenance line for figure titles."""
    env = record.data["environment"]
    where = env.get("gpu") or "CPU"
    quick = " (quick)" if record.data["quick"] else ""
    commits = [str(source["environment"].get("git_commit"))[:8] for source in record.data.get("sources", [])]
    if commits:  # a record merged from runs of several commits (merge.py)
        return f"{where}, commits {' + '.join(dict.fromkeys(commits))}{quick}"
    return f"{where}, commit {str(env.get('git_commit'))[:8]}{quick}"


# --------------------------------------------------------------------------------------
# Running experiments
# --------------------------------------------------------------------------------------


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny CPU version (seconds): checks the code path")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder of the JSON and PNG files (default {DEFAULT_OUT})")
    parser.add_argument("--kinds", nargs="+", help="attention kinds to compare (default: the experiment's list)")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds per arm (default: the experiment's list)")
    parser.add_argument("--device", default=None, help="auto (default: cuda if available; cpu with --quick), cpu, cuda")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock limit; arms that no longer fit are recorded as skipped")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=JSON",
                        help="replace one top-level setting of the config, e.g. --set parts='[\"decode\"]' or "
                             "--set steps=3000 (repeatable; the key must exist)")
    provenance.add_options(parser)


def parse_overrides(items: list[str]) -> dict:
    """``["KEY=JSON", ...]`` -> {KEY: value}; a value that is not JSON is taken as a string."""
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set: expected KEY=JSON, got {item!r}")
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text
    return overrides


def build_config(module, quick: bool, kinds=None, seeds=None, device=None, overrides=None) -> dict:
    config = module.config(quick)
    for key, value in (overrides or {}).items():
        if key not in config:
            raise ValueError(f"--set {key}: {module.NAME} has no setting {key!r}; it has {', '.join(sorted(config))}")
        config[key] = value
    if kinds:
        config["kinds"] = list(kinds)
    if seeds:
        config["seeds"] = list(seeds)
    config["device"] = device or config.get("device") or ("cpu" if quick else "auto")
    return config


def run_experiment(module, config: dict, out_dir: Path, quick: bool, deadline: Deadline) -> Record:
    """Runs one experiment, saves its JSON and draws its PNG; an exception is stored in the
    record (``error``) and re-raised after saving."""
    record = Record(module.NAME, module.CLAIM, config, out_dir, quick)
    record.save()
    own = config.get("budget_s")
    deadline = deadline.narrowed(None if quick or own is None else own)
    print(f"{module.NAME}: start ({deadline.remaining():.0f} s allowed)", file=sys.stderr, flush=True)
    try:
        module.run(config, record, deadline)
        module.plot(record, out_dir / f"{module.NAME}.png")
    except BaseException as error:
        record.data["error"] = f"{type(error).__name__}: {error}"
        record.data["traceback"] = traceback.format_exc(limit=8)
        record.save()
        raise
    record.save()
    print(f"{module.NAME}: done in {record.data['wall_s']:.1f} s -> {record.json_path}", file=sys.stderr, flush=True)
    return record


def main(module, argv=None) -> Record:
    """Command line of one experiment script."""
    parser = argparse.ArgumentParser(prog=f"{module.NAME}.py", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_options(parser)
    args = parser.parse_args(argv)
    try:
        config = build_config(module, args.quick, args.kinds, args.seeds, args.device, parse_overrides(args.overrides))
    except ValueError as error:
        parser.error(str(error))
    provenance.settle_or_exit(parser, args, strict=not args.quick)
    return run_experiment(module, config, args.out, args.quick, Deadline(args.budget_s))
