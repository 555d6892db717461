"""Checks that every committed result names the commit it was measured on, truthfully, and
that every results file the documentation cites exists.

    python benchmarks/check_provenance.py        # exit status 1 on a new problem

For each JSON file under benchmarks/results/ (experiments included), every commit it names
(``git_commit`` in its environment, and in each of a merged record's ``sources``):

1. is a commit of this repository's history (``git rev-parse --verify``);
2. is an ancestor of HEAD;
3. is an ancestor of the commit that first committed a version of the file naming it: the
   results were committed after the code they measured;
4. holds the script that writes the file (WRITERS; one of them where the writer moved):
   results cannot predate their code;

and the record is not ``dirty`` (run on uncommitted changes, provenance.py) nor ``quick``
(a logic check), does not say ``unknown``, and its ``<name>.md`` beside it names the same
commit in its header line.

Every ``benchmarks/results/...`` path in README.md, benchmarks/README.md and docs/*.md
must exist (``*`` and ``{a,b}`` are expanded and must match at least one file).

Files that fail and cannot be repaired from the records are listed in KNOWN_UNBACKED with
the reason, reviewed by hand: their problems are printed as known and do not fail the
check, so that the debt stays visible while new offenders fail. A listed file that passes
fails the check until it is taken off the list. tests/test_results_provenance.py runs this.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import provenance

REPO = provenance.REPO
RESULTS = REPO / "benchmarks" / "results"
DOCS = ["README.md", "benchmarks/README.md", "docs/*.md"]

# Which script writes which results file (the first pattern that matches the file's path
# relative to benchmarks/results/, without its extension).
WRITERS = [
    (r"experiments/(?P<name>\w+)", "benchmarks/experiments/{name}.py"),
    # bench_attention.py also checked, swept and profiled until those parts moved to scripts of
    # their own; files measured before the move name it (any listed script is accepted).
    (r"attention_check", ("benchmarks/check_attention.py", "benchmarks/bench_attention.py")),
    (r"attention_speed\w*", "benchmarks/bench_attention.py"),
    (r"attention_sweep(_best)?", ("benchmarks/sweep_attention.py", "benchmarks/bench_attention.py")),
    (r"attention_profile", ("benchmarks/profile_attention_kernels.py", "benchmarks/bench_attention.py")),
    (r"bench_generate", "benchmarks/bench_generate.py"),
    (r"context_parallel_(check|speed)", "benchmarks/bench_context_parallel.py"),
    (r"context_parallel_drift", "benchmarks/check_context_parallel_drift.py"),
    (r"decode(_sweep)?", "benchmarks/bench_decode.py"),
    (r"gate_(numerics|bandwidth|end_to_end)", "benchmarks/bench_gate.py"),
    (r"gate_gradient", "benchmarks/bench_gate_gradient.py"),
    (r"hf_attention", "benchmarks/bench_hf_attention.py"),
    (r"kernel_instructions(_d\d+)?", "benchmarks/kernel_instructions.py"),
    (r"model_gate_cost", "benchmarks/bench_model_gate_cost.py"),
    (r"nsa_\w+", "benchmarks/bench_nsa.py"),
    (r"op_host", "benchmarks/profile_op_host.py"),
    (r"profile_decode_host", "benchmarks/profile_decode_host.py"),
    (r"gpu_tests", "benchmarks/gpu_tests.py"),
    (r"train_context_parallel", "benchmarks/check_train_context_parallel.py"),
]

# Results files that fail the check and cannot be repaired from the records, with the
# reason; each needs a re-run on a GPU. Paths relative to benchmarks/results/.
_STALE = ("recorded 0033347 (2026-11-28), which predates {script}; the GPU copy of the tree had stale git metadata "
          "and GATEDFWA_COMMIT was not set, and nothing in the records tells which commit ran (2026-11-30); the JSON "
          "says git_commit: unknown; re-run pending")
KNOWN_UNBACKED = {
    "hf_attention.json": _STALE.format(script="bench_hf_attention.py"),
    "nsa_speed.json": _STALE.format(script="bench_nsa.py"),
    "experiments/context_use.json": _STALE.format(script="experiments/context_use.py"),
    "experiments/memory_gradient_flow.json": _STALE.format(script="experiments/memory_gradient_flow.py"),
    "experiments/second_domain.json": _STALE.format(script="experiments/second_domain.py"),
    "experiments/cost.json": "source 0 (training, gate share, decoding seed 0) " + _STALE.format(
        script="experiments/cost.py"),
    "experiments/lm_equal_tokens.json": "source 0 (gatedfwa, swa, full, forgetting; seeds 0 and 1) " + _STALE.format(
        script="experiments/lm_equal_tokens.py"),
}


@dataclass
class FileReport:
    path: str  # relative to benchmarks/results/
    commits: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def git_ok(*args: str) -> bool:
    return provenance.git(*args) is not None


@functools.lru_cache(maxsize=None)
def full_hash(commit: str) -> str | None:
    out = provenance.git("rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    return out.strip() if out else None


@functools.lru_cache(maxsize=None)
def is_ancestor(older: str, newer: str) -> bool:
    return git_ok("merge-base", "--is-ancestor", older, newer)


def writer_of(relative: str) -> tuple[str, ...] | None:
    """The scripts that may have written a results file (the current one first), or None."""
    stem = relative.rsplit(".", 1)[0]
    for pattern, scripts in WRITERS:
        match = re.fullmatch(pattern, stem)
        if match:
            scripts = (scripts,) if isinstance(scripts, str) else scripts
            return tuple(script.format(**match.groupdict()) for script in scripts)
    return None


def named_commits(value) -> list[str]:
    """Every ``git_commit`` value in a JSON value, in order, once each."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "git_commit" and isinstance(item, str):
                found.append(item)
            else:
                found.extend(named_commits(item))
    elif isinstance(value, list):
        for item in value:
            found.extend(named_commits(item))
    return list(dict.fromkeys(found))


def has_true(value, name: str) -> bool:
    """Whether ``name: true`` appears anywhere in a JSON value."""
    if isinstance(value, dict):
        return any((key == name and item is True) or has_true(item, name) for key, item in value.items())
    if isinstance(value, list):
        return any(has_true(item, name) for item in value)
    return False


@functools.lru_cache(maxsize=None)
def committed_versions(relative: str) -> tuple[tuple[str, str], ...]:
    """(commit, text) of each committed version of a file (renames followed), oldest first."""
    log = provenance.git("log", "--format=%H", "--name-only", "--follow", "--", relative) or ""
    versions, sha = [], None
    for token in log.split():  # "<hash>" lines, each followed by the file's path at that commit
        if re.fullmatch(r"[0-9a-f]{40}", token):
            sha = token
            continue
        text = provenance.git("show", f"{sha}:{token}")
        if text is not None:
            versions.append((sha, text))
    return tuple(reversed(versions))


def first_committed_with(path: Path, text: str) -> str | None:
    """The oldest commit whose version of ``path`` contains ``text``; None if none does (or
    the file lies outside the repository)."""
    if not path.resolve().is_relative_to(REPO):
        return None
    relative = path.resolve().relative_to(REPO).as_posix()
    return next((sha for sha, version in committed_versions(relative) if text in version), None)


def arm_commits(record: dict) -> list[tuple[str, str]]:
    """(commit, text that marks the arm) for each arm of an experiment record: the commit of
    the arm's run (its source's, in a merged record) and its wall time as JSON writes it."""
    sources = record.get("sources") or []
    marked = []
    for arm in record.get("arms") or []:
        if not isinstance(arm.get("wall_s"), float):
            continue
        env = sources[arm["source"]]["environment"] if sources and "source" in arm else record.get("environment", {})
        marked.append((str(env.get("git_commit")), json.dumps(arm["wall_s"])))
    return marked


def commit_problems(path: Path, commit: str, writer: tuple[str, ...] | None) -> list[str]:
    """Checks 1-4 of the docstring for one commit a file names."""
    if commit == provenance.UNKNOWN:
        return ["commit unknown"]
    full = full_hash(commit)
    if full is None:
        return [f"commit {commit} is not in this repository's history"]
    if not is_ancestor(full, "HEAD"):
        return [f"commit {commit} is not an ancestor of HEAD"]
    problems = []
    first = first_committed_with(path, commit)
    if first is not None and not is_ancestor(full, first):
        problems.append(f"commit {commit} is not an ancestor of {first[:10]}, which first committed it here")
    if writer is not None and not any(git_ok("cat-file", "-e", f"{full}:{script}") for script in writer):
        written_by = (f"{writer[0]}, the script that writes this file" if len(writer) == 1 else
                      f"{' and '.join(writer)}, the scripts that write this file")
        problems.append(f"commit {commit} predates {written_by}")
    return problems


def early_arms(path: Path, record: dict) -> list[str]:
    """Arms attributed to a commit that the file's history had before that commit existed:
    each arm is found by its wall time in the committed versions of ``path``, and the
    commit of its run must be an ancestor of the first version that holds it (a merge
    that relabels old arms with a newer commit fails here)."""
    early: dict[tuple[str, str], int] = {}
    for commit, mark in arm_commits(record):
        full = full_hash(commit) if commit != provenance.UNKNOWN else None
        first = first_committed_with(path, mark)
        if full is not None and first is not None and not is_ancestor(full, first):
            early[commit, first] = early.get((commit, first), 0) + 1
    return [f"{count} arm(s) attributed to {commit[:10]} were committed in {first[:10]}, which does not descend "
            "from that commit" for (commit, first), count in early.items()]


def check_file(path: Path, results: Path = RESULTS) -> FileReport:
    """Every check of the docstring for one JSON file under ``results``."""
    relative = path.relative_to(results).as_posix()
    report = FileReport(relative)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        report.problems.append(f"not readable as JSON: {error}")
        return report
    report.commits = named_commits(record)
    if not report.commits:
        report.problems.append("names no commit (no git_commit)")
    if has_true(record, "dirty"):
        report.problems.append("measured on a tree with uncommitted changes (dirty: true)")
    if record.get("quick") is True:
        report.problems.append("a --quick logic check, not a measurement")
    writer = writer_of(relative)
    if writer is None:
        report.problems.append("no writer script known for this file: add it to WRITERS in check_provenance.py")
    for commit in report.commits:
        report.problems += commit_problems(path, commit, writer)
    report.problems += early_arms(path, record)
    environment = record.get("environment")
    top = environment.get("git_commit") if isinstance(environment, dict) else None
    markdown = path.with_suffix(".md")
    if markdown.exists() and isinstance(top, str) and f"commit {top[:10]}" not in markdown.read_text():
        report.problems.append(f"{markdown.name}'s header does not name commit {top[:10]}")
    return report


def results_files() -> list[Path]:
    return sorted(RESULTS.rglob("*.json"))


def expand(reference: str) -> list[str]:
    """``a_{x,y}.md`` -> [``a_x.md``, ``a_y.md``] (one brace group)."""
    match = re.search(r"\{([^{}]*)\}", reference)
    if not match:
        return [reference]
    return [reference[:match.start()] + part + reference[match.end():] for part in match.group(1).split(",")]


def cited_results(root: Path = REPO) -> dict[str, list[str]]:
    """{document: [each benchmarks/results/... path it names]} for the documents in DOCS."""
    cited = {}
    for pattern in DOCS:
        for doc in sorted(root.glob(pattern)):
            found = re.findall(r"benchmarks/results/[\w./*{},-]*[\w*}]", doc.read_text())
            cited[doc.relative_to(root).as_posix()] = list(dict.fromkeys(found))
    return cited


def missing_citations(root: Path = REPO) -> list[str]:
    """'document: path' for each cited results path that matches no file."""
    missing = []
    for doc, references in cited_results(root).items():
        for reference in references:
            for path in expand(reference):
                if not (any(root.glob(path)) if "*" in path else (root / path).exists()):
                    missing.append(f"{doc}: {path}")
    return missing


def check(verbose: bool = True) -> list[str]:
    """The new problems (empty when the check passes); prints every file's state."""
    failures = []
    seen = set()
    for path in results_files():
        report = check_file(path)
        seen.add(report.path)
        known = KNOWN_UNBACKED.get(report.path)
        if report.problems and known:
            if verbose:
                print(f"known  {report.path}: {'; '.join(report.problems)} ({known})")
        elif report.problems:
            failures.append(f"{report.path}: {'; '.join(report.problems)}")
        elif known:
            failures.append(f"{report.path}: passes now; take it off KNOWN_UNBACKED in check_provenance.py")
        elif verbose:
            print(f"ok     {report.path}: {', '.join(c[:10] for c in report.commits)}")
    failures += [f"{path}: listed in KNOWN_UNBACKED but not found" for path in sorted(set(KNOWN_UNBACKED) - seen)]
    failures += [f"cites a missing results file: {entry}" for entry in missing_citations()]
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="check_provenance.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quiet", action="store_true", help="print only the problems")
    args = parser.parse_args(argv)
    if provenance.head_commit() is None:
        print("check_provenance.py: needs a git checkout (the history is what it checks against)", file=sys.stderr)
        return 2
    failures = check(verbose=not args.quiet)
    for failure in failures:
        print(f"FAIL   {failure}")
    known = f"{len(KNOWN_UNBACKED)} known unbacked (KNOWN_UNBACKED)"
    print(f"{len(failures)} new problem(s); {known}" if failures else f"no new problems; {known}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
