"""The commit a result is measured on, taken so that it cannot be wrong without an error.

Every script that writes results records ``git_commit`` (the full hash), ``dirty`` and
``commit_from`` in its JSON's ``environment`` (``common.environment()`` and
``experiments/kit.py`` take them from here). The rules:

* In a git checkout, the commit is git's HEAD at run time. If ``GATEDFWA_COMMIT`` is set as
  well it must name the same commit (a copy of the tree with stale git metadata recorded a
  commit older than the code it ran; this refuses that).
* Without git (a copy of the tree on a GPU machine), ``GATEDFWA_COMMIT`` must be set to the
  commit the copy came from, a hexadecimal hash of 7 to 40 digits. Take it with
  ``python benchmarks/provenance.py`` in that checkout: it prints HEAD, and refuses when the
  tree has changes, since a hash then does not describe the code that runs.
* The tree must be clean: ``git status --porcelain`` lists nothing, apart from untracked
  files under ``benchmarks/results/`` and ``runs/`` (where the scripts write). With uncommitted
  changes the script stops before measuring, unless ``--allow-dirty`` or
  ``GATEDFWA_ALLOW_DIRTY=1`` is given; the record then says ``dirty: true``, and
  ``check_provenance.py`` does not accept it among the committed results.

``--quick`` runs (logic checks on tiny sizes, never published) record what is known and do
not stop.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMIT_VARIABLE = "GATEDFWA_COMMIT"
ALLOW_DIRTY_VARIABLE = "GATEDFWA_ALLOW_DIRTY"
# Untracked files here are the scripts' own output, not a change to the measured code.
OUTPUT_FOLDERS = ("benchmarks/results/", "runs/")
UNKNOWN = "unknown"
HASH = re.compile(r"[0-9a-f]{7,40}")


class ProvenanceError(RuntimeError):
    """The commit of a run cannot be stated truthfully."""


def git(*args: str) -> str | None:
    """git's stdout in REPO, or None where git or a repository is missing or the command fails."""
    try:
        return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def head_commit() -> str | None:
    """Full hash of HEAD of this checkout, or None without git."""
    out = git("rev-parse", "--verify", "HEAD^{commit}")
    return out.strip() if out else None


def changed_paths() -> list[str]:
    """``git status --porcelain`` lines of tracked changes and of untracked files outside
    OUTPUT_FOLDERS (untracked folders are listed file by file)."""
    out = git("status", "--porcelain", "--untracked-files=all") or ""
    changed = []
    for line in out.splitlines():
        status, path = line[:2], line[3:]
        if status == "??" and path.startswith(OUTPUT_FOLDERS):
            continue
        changed.append(line)
    return changed


def allow_dirty_from_environment() -> bool:
    return os.environ.get(ALLOW_DIRTY_VARIABLE, "") not in ("", "0")


def measured_commit(allow_dirty: bool = False, strict: bool = True) -> dict:
    """``{"git_commit", "dirty", "commit_from"}`` of this run.

    ``dirty`` is True or False where git can tell, None where it cannot (no git, commit
    from GATEDFWA_COMMIT). With ``strict`` a commit that cannot be stated truthfully
    raises ProvenanceError; without it (quick runs) the record says what is known, at
    worst ``"unknown"``."""
    given = os.environ.get(COMMIT_VARIABLE, "").strip().lower()
    head = head_commit()
    try:
        if given and not HASH.fullmatch(given):
            raise ProvenanceError(f"{COMMIT_VARIABLE}={given!r}: expected a commit hash, 7 to 40 hexadecimal digits")
        if head is not None:
            if given and not head.startswith(given):
                raise ProvenanceError(
                    f"{COMMIT_VARIABLE}={given} but this checkout's HEAD is {head}: unset {COMMIT_VARIABLE} "
                    "(git is here) or check out that commit")
            changed = changed_paths()
            if changed and not allow_dirty:
                shown = "; ".join(changed[:5]) + (f"; and {len(changed) - 5} more" if len(changed) > 5 else "")
                raise ProvenanceError(
                    f"the tree has uncommitted changes ({shown}): commit them first, or pass --allow-dirty "
                    f"(or {ALLOW_DIRTY_VARIABLE}=1) for a run whose results are not committed "
                    "(recorded as dirty: true)")
            return {"git_commit": head, "dirty": bool(changed), "commit_from": "git"}
        if given:
            return {"git_commit": given, "dirty": None, "commit_from": COMMIT_VARIABLE}
        raise ProvenanceError(
            f"no git checkout at {REPO} and {COMMIT_VARIABLE} is not set: set it to the commit this tree was copied "
            f"from ({COMMIT_VARIABLE}=$(python benchmarks/provenance.py) in that checkout)")
    except ProvenanceError:
        if strict:
            raise
        return {"git_commit": head or given or UNKNOWN, "dirty": bool(changed_paths()) if head else None,
                "commit_from": "git" if head else COMMIT_VARIABLE if given else None}


_settled: dict | None = None


def add_options(parser: argparse.ArgumentParser) -> None:
    """``--allow-dirty`` on a script's command line."""
    parser.add_argument("--allow-dirty", action="store_true",
                        help=f"run on a tree with uncommitted changes (or set {ALLOW_DIRTY_VARIABLE}=1); the results "
                             "record dirty: true and are not accepted among the committed results")


def settle(args: argparse.Namespace | None = None, strict: bool = True) -> dict:
    """Takes the commit of this run now, before anything is measured, and keeps it for
    every record the run writes. Raises ProvenanceError where ``strict`` and the commit
    cannot be stated (the message says what to do)."""
    global _settled
    allow = bool(getattr(args, "allow_dirty", False)) or allow_dirty_from_environment()
    _settled = measured_commit(allow_dirty=allow, strict=strict)
    return _settled


def settle_or_exit(parser: argparse.ArgumentParser, args: argparse.Namespace, strict: bool = True) -> dict:
    """settle(), with a refusal reported as the script's usage error (exit status 2)."""
    try:
        return settle(args, strict)
    except ProvenanceError as error:
        parser.error(str(error))


def recorded(strict: bool = True) -> dict:
    """The commit fields for a record: those settle() took, else taken now."""
    if _settled is not None:
        return dict(_settled)
    return measured_commit(allow_dirty=allow_dirty_from_environment(), strict=strict)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="provenance.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    try:
        found = measured_commit(strict=True)
    except ProvenanceError as error:
        print(f"provenance.py: {error}", file=sys.stderr)
        return 1
    print(found["git_commit"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
