"""Run the test suite on a GPU and write its summary: benchmarks/results/gpu_tests.{json,md}.

CI has no GPU, so the GPU answers of the tests (the compiled Triton kernels, the tests marked
``gpu``) reach the repository only through this record. It runs

    GATEDFWA_TEST_DEVICE=cuda TRITON_INTERPRET=0 python -m pytest <test files>

split over several pytest processes by test file (compiling the kernels is most of the time,
and one process would leave the GPU idle while it compiles), reads each process's JUnit XML
and writes, with the commit, the GPU and the versions: the counts per test file, every
failure and error with its first message line, and the skip reasons with their counts.

    python benchmarks/gpu_tests.py                      # the whole suite
    python benchmarks/gpu_tests.py tests/ops tests/models --processes 4
    python benchmarks/gpu_tests.py -m gpu tests/integrations   # a marker selection

Exit status: 0 when nothing failed, 1 otherwise (the summary is written either way).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402  (the commit measured: git's HEAD, clean tree)
from common import REPO, environment  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def test_files(paths: list[str]) -> list[Path]:
    """Every tests/**/test_*.py under the given paths (files or folders, relative to the repo)."""
    files = []
    for name in paths:
        path = (REPO / name).resolve()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(sorted(path.rglob("test_*.py")))
        else:
            raise SystemExit(f"gpu_tests.py: {name}: no such test file or folder")
    return files


def split_by_size(files: list[Path], processes: int) -> list[list[Path]]:
    """Groups of files of about equal total size (a stand-in for their run time): the largest
    file first into the lightest group."""
    groups: list[list[Path]] = [[] for _ in range(max(1, min(processes, len(files))))]
    weights = [0] * len(groups)
    for file in sorted(files, key=lambda f: f.stat().st_size, reverse=True):
        lightest = weights.index(min(weights))
        groups[lightest].append(file)
        weights[lightest] += file.stat().st_size
    return [g for g in groups if g]


def read_junit(path: Path) -> list[dict]:
    """One record per test case: file, name, outcome (passed/failed/error/skipped), message."""
    cases = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or node.text or "").strip().splitlines()[:1]
                message = message[0][:300] if message else ""
                break
        cases.append({"file": case.get("file", case.get("classname", "")), "name": case.get("name", ""), "outcome": outcome, "message": message,
                      "seconds": float(case.get("time", 0.0))})
    return cases


def run_groups(groups: list[list[Path]], marker: str | None, log_dir: Path,
               timeout_s: float) -> tuple[list[dict], list[dict]]:
    """Run each group in its own pytest process; return (test cases, per-process records).
    A process still running timeout_s after the start is stopped (its cases so far are lost,
    and it is recorded as an error), so that the summary is written within a time limit."""
    env = dict(os.environ, GATEDFWA_TEST_DEVICE="cuda", TRITON_INTERPRET="0", PYTHONUNBUFFERED="1")
    running = []
    for i, group in enumerate(groups):
        xml = log_dir / f"group{i}.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                   "-o", "junit_family=xunit1"]  # xunit1 records each case's file
        if marker:
            command += ["-m", marker]
        command += [str(f.relative_to(REPO)) for f in group]
        log = open(log_dir / f"group{i}.log", "w")
        running.append((i, group, xml, log, time.time(), subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                                                                           stderr=subprocess.STDOUT)))
    cases, processes = [], []
    deadline = time.time() + timeout_s
    for i, group, xml, log, started, process in running:
        try:
            status = process.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            process.kill()
            status = f"stopped after {timeout_s:.0f} s"
            process.wait()
        log.close()
        processes.append({"group": i, "files": [str(f.relative_to(REPO)) for f in group], "exit_status": status,
                          "seconds": round(time.time() - started, 1)})
        if xml.exists() and isinstance(status, int):
            cases.extend(read_junit(xml))
        else:  # pytest died before writing its report: keep the end of its log
            tail = (log_dir / f"group{i}.log").read_text(errors="replace").splitlines()[-20:]
            cases.append({"file": ", ".join(processes[-1]["files"]), "name": "(pytest process)", "outcome": "error",
                          "message": " | ".join(tail)[-300:], "seconds": 0.0})
    return cases, processes


def summarise(cases: list[dict]) -> dict:
    totals = collections.Counter(c["outcome"] for c in cases)
    per_file: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for c in cases:
        per_file[c["file"]][c["outcome"]] += 1
    skips = collections.Counter(c["message"] for c in cases if c["outcome"] == "skipped")
    return {
        "totals": {k: totals.get(k, 0) for k in ("passed", "failed", "error", "skipped")},
        "per_file": {f: {k: n.get(k, 0) for k in ("passed", "failed", "error", "skipped")} for f, n in sorted(per_file.items())},
        "failures": [c for c in cases if c["outcome"] in ("failed", "error")],
        "skip_reasons": dict(skips.most_common()),
    }


def write_markdown(path: Path, record: dict) -> None:
    env, summary = record["environment"], record["summary"]
    t = summary["totals"]
    dirty = " (dirty tree)" if env.get("dirty") else ""
    lines = [
        f"# GPU test run: {env.get('gpu', 'no GPU')}, torch {env['torch']}, triton {env['triton']}, "
        f"transformers {record['transformers']}, commit {env['git_commit'][:10]}{dirty}, {env['date']}",
        "",
        f"`{record['command']}`: **{t['passed']} passed, {t['failed']} failed, {t['error']} errors, "
        f"{t['skipped']} skipped** in {record['seconds']:.0f} s over {len(record['processes'])} pytest processes.",
        "",
        "| test file | passed | failed | errors | skipped |",
        "|---|---|---|---|---|",
    ]
    for file, n in summary["per_file"].items():
        lines.append(f"| {file} | {n['passed']} | {n['failed']} | {n['error']} | {n['skipped']} |")
    if summary["failures"]:
        lines += ["", "## Failures", ""]
        lines += [f"- `{c['file']}::{c['name']}` ({c['outcome']}): {c['message']}" for c in summary["failures"]]
    if summary["skip_reasons"]:
        lines += ["", "## Skipped, by reason", ""]
        lines += [f"- {n} x {reason or '(no reason given)'}" for reason, n in summary["skip_reasons"].items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=["tests"], help="test files or folders (default: tests)")
    parser.add_argument("-m", dest="marker", help="pytest marker expression, e.g. gpu")
    parser.add_argument("--processes", type=int, default=6, help="pytest processes side by side (default 6)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for gpu_tests.json / .md (default benchmarks/results)")
    parser.add_argument("--name", default="gpu_tests", help="file name stem (default gpu_tests)")
    parser.add_argument("--timeout", type=float, default=540.0,
                        help="seconds after which pytest processes still running are stopped (default 540)")
    provenance.add_options(parser)
    args = parser.parse_args()
    provenance.settle_or_exit(parser, args)

    import torch
    import transformers

    if not torch.cuda.is_available():
        raise SystemExit("gpu_tests.py: no CUDA device here; the CPU suite runs with plain `python -m pytest`")
    files = test_files(args.paths)
    groups = split_by_size(files, args.processes)
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        cases, processes = run_groups(groups, args.marker, Path(scratch), args.timeout)
    command = "python benchmarks/gpu_tests.py " + " ".join(
        ([f"-m {args.marker}"] if args.marker else []) + args.paths + [f"--processes {args.processes}"])
    record = {
        "environment": environment(),
        "transformers": transformers.__version__,
        "command": command,
        "seconds": round(time.time() - started, 1),
        "processes": processes,
        "summary": summarise(cases),
        "cases": cases,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    write_markdown(out / f"{args.name}.md", record)
    t = record["summary"]["totals"]
    print(f"{t['passed']} passed, {t['failed']} failed, {t['error']} errors, {t['skipped']} skipped "
          f"in {record['seconds']:.0f} s; written to {out / args.name}.{{json,md}}")
    for c in record["summary"]["failures"]:
        print(f"  {c['outcome'].upper()}: {c['file']}::{c['name']}: {c['message']}")
    return 0 if t["failed"] == 0 and t["error"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
