"""The committed results name real commits, and the scripts that write results record the
commit truthfully: benchmarks/check_provenance.py over benchmarks/results/, the documents'
citations of results files, and benchmarks/provenance.py's rules (git's HEAD, a clean tree
unless allowed, GATEDFWA_COMMIT only as a hash and only where git cannot tell)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import check_provenance  # noqa: E402
import provenance  # noqa: E402

STALE = "0033347841fa1ba9c6a12e7995200bd223e6b88f"  # recorded by runs of code newer than it


def _needs_history():
    if provenance.head_commit() is None:
        pytest.skip("needs a git checkout: the commits are checked against its history (an sdist has none)")
    if (provenance.git("rev-parse", "--is-shallow-repository") or "").strip() == "true":
        pytest.skip("a shallow clone lacks the history the recorded commits are checked against")


def test_every_committed_result_is_backed_by_its_commit():
    """No results file fails check_provenance.py unless it is listed, with its reason, in
    KNOWN_UNBACKED; a listed file that passes must leave the list."""
    _needs_history()
    assert check_provenance.check(verbose=False) == []


def test_known_unbacked_files_each_give_a_reason():
    assert all(reason.strip() for reason in check_provenance.KNOWN_UNBACKED.values())


def test_documents_cite_only_results_files_that_exist(tmp_path):
    cited = check_provenance.cited_results()
    assert "README.md" in cited and any(cited.values()), "no benchmarks/results/ path found: is the pattern right?"
    assert check_provenance.missing_citations() == []

    # The scan fails on a missing file, expands braces and globs, and ignores prose.
    (tmp_path / "docs").mkdir()
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "decode.md").write_text("")
    (tmp_path / "README.md").write_text("See `benchmarks/results/decode.md`, benchmarks/results/decode_{sweep,x}.md "
                                        "and benchmarks/results/deco*.md. Results go to benchmarks/results/.\n")
    (tmp_path / "docs" / "a.md").write_text("(benchmarks/results/gone.json)\n")
    assert check_provenance.missing_citations(tmp_path) == [
        "README.md: benchmarks/results/decode_sweep.md", "README.md: benchmarks/results/decode_x.md",
        "docs/a.md: benchmarks/results/gone.json"]


def _write(folder: Path, name: str, record: dict, header: str | None = None) -> Path:
    path = folder / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    markdown = path.with_suffix(".md")
    markdown.unlink(missing_ok=True)
    if header is not None:
        markdown.write_text(f"# {name}\n\n{header}\n")
    return path


def test_the_check_names_each_kind_of_offender(tmp_path):
    _needs_history()
    head = provenance.head_commit()

    def problems(name, record, header=None):
        return check_provenance.check_file(_write(tmp_path, name, record, header), tmp_path).problems

    assert problems("hf_attention", {"environment": {"git_commit": head}}, f"H200, commit {head[:10]}, today") == []
    assert problems("hf_attention", {"environment": {"git_commit": STALE}}) == [
        f"commit {STALE} predates benchmarks/bench_hf_attention.py, the script that writes this file"]
    assert problems("decode", {"environment": {"git_commit": "0123abc"}}) == [
        "commit 0123abc is not in this repository's history"]
    assert problems("decode", {"environment": {"git_commit": head, "dirty": True}}) == [
        "measured on a tree with uncommitted changes (dirty: true)"]
    assert problems("decode", {"environment": {"git_commit": head}}, "commit 0123456789") == [
        f"decode.md's header does not name commit {head[:10]}"]
    assert problems("decode", {"environment": {}}) == ["names no commit (no git_commit)"]
    assert problems("decode_quick", {"environment": {"git_commit": head}, "quick": True})[0].startswith(
        "a --quick logic check")
    assert problems("mystery", {"environment": {"git_commit": head}}) == [
        "no writer script known for this file: add it to WRITERS in check_provenance.py"]
    # The sweep moved from bench_attention.py to sweep_attention.py: a file measured before the
    # move names a commit holding only the former, which is accepted; a commit holding neither is not.
    assert problems("attention_sweep", {"environment": {"git_commit": STALE}}) == []
    root = provenance.git("rev-list", "--max-parents=0", "HEAD").split()[0]
    assert problems("attention_sweep", {"environment": {"git_commit": root}}) == [
        f"commit {root} predates benchmarks/sweep_attention.py and benchmarks/bench_attention.py, the scripts that "
        "write this file"]
    merged = {"environment": {}, "sources": [{"environment": {"git_commit": head}},
                                             {"environment": {"git_commit": "unknown"}}], "arms": []}
    assert problems("experiments/cost", merged) == ["commit unknown"]


def test_the_check_finds_arms_relabelled_with_a_later_commit():
    """The lm_equal_tokens record of 747a507 said its eight paper-kind arms came from
    c04152f, but the file held them before that commit existed (fbf056a)."""
    _needs_history()
    path = REPO / "benchmarks" / "results" / "experiments" / "lm_equal_tokens.json"
    if provenance.git("cat-file", "-e", "747a507:benchmarks/results/experiments/lm_equal_tokens.json") is None:
        pytest.skip("the history holds no record of 747a507")
    relabelled = json.loads(provenance.git("show", "747a507:benchmarks/results/experiments/lm_equal_tokens.json"))
    assert check_provenance.early_arms(path, relabelled) == [
        "8 arm(s) attributed to c04152fcab were committed in fbf056a0fb, which does not descend from that commit"]
    assert check_provenance.early_arms(path, json.loads(path.read_text())) == []


# --------------------------------------------------------------------------------------
# provenance.py: the commit a run records
# --------------------------------------------------------------------------------------


@pytest.fixture
def repository(tmp_path, monkeypatch):
    """A git repository with one commit, as provenance.REPO."""
    if provenance.git("--version") is None:
        pytest.skip("needs git")
    monkeypatch.delenv(provenance.COMMIT_VARIABLE, raising=False)
    monkeypatch.delenv(provenance.ALLOW_DIRTY_VARIABLE, raising=False)
    for variable in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(variable, raising=False)
    run = lambda *args: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                                       check=True, capture_output=True)
    run("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    run("add", "code.py")
    run("commit", "-q", "-m", "code")
    monkeypatch.setattr(provenance, "REPO", tmp_path)
    monkeypatch.setattr(provenance, "_settled", None)
    return tmp_path


def test_a_clean_checkout_records_its_head(repository):
    head = provenance.head_commit()
    assert re.fullmatch(r"[0-9a-f]{40}", head)
    # The scripts' output folders may hold new files.
    (repository / "benchmarks" / "results").mkdir(parents=True)
    (repository / "benchmarks" / "results" / "new.json").write_text("{}")
    (repository / "runs").mkdir()
    (repository / "runs" / "log.txt").write_text("")
    assert provenance.measured_commit() == {"git_commit": head, "dirty": False, "commit_from": "git"}


@pytest.mark.parametrize("change", ["modified", "untracked"])
def test_a_dirty_tree_is_refused_unless_allowed(repository, monkeypatch, change):
    if change == "modified":
        (repository / "code.py").write_text("x = 2\n")
    else:
        (repository / "notes.py").write_text("")
    with pytest.raises(provenance.ProvenanceError, match="uncommitted changes.*--allow-dirty"):
        provenance.measured_commit()
    head = provenance.head_commit()
    assert provenance.measured_commit(allow_dirty=True) == {"git_commit": head, "dirty": True, "commit_from": "git"}
    monkeypatch.setenv(provenance.ALLOW_DIRTY_VARIABLE, "1")
    assert provenance.recorded()["dirty"] is True
    # A quick run records what it finds and goes on.
    monkeypatch.delenv(provenance.ALLOW_DIRTY_VARIABLE)
    assert provenance.measured_commit(strict=False)["dirty"] is True


def test_the_commit_variable_must_agree_with_git(repository, monkeypatch):
    head = provenance.head_commit()
    monkeypatch.setenv(provenance.COMMIT_VARIABLE, head[:8])
    assert provenance.measured_commit()["git_commit"] == head
    monkeypatch.setenv(provenance.COMMIT_VARIABLE, STALE)
    with pytest.raises(provenance.ProvenanceError, match="HEAD is"):
        provenance.measured_commit()


def test_without_git_the_commit_variable_is_required_and_must_be_a_hash(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "REPO", tmp_path)  # no repository here
    monkeypatch.setattr(provenance, "_settled", None)
    monkeypatch.delenv(provenance.COMMIT_VARIABLE, raising=False)
    with pytest.raises(provenance.ProvenanceError, match="GATEDFWA_COMMIT is not set"):
        provenance.measured_commit()
    assert provenance.measured_commit(strict=False)["git_commit"] == "unknown"
    monkeypatch.setenv(provenance.COMMIT_VARIABLE, "ABC1234")
    assert provenance.measured_commit() == {"git_commit": "abc1234", "dirty": None, "commit_from": "GATEDFWA_COMMIT"}
    for wrong in ("main", "abc12", "HEAD~1", "x" * 40):
        monkeypatch.setenv(provenance.COMMIT_VARIABLE, wrong)
        with pytest.raises(provenance.ProvenanceError, match="expected a commit hash"):
            provenance.measured_commit()


def test_a_script_refuses_before_measuring(monkeypatch, capsys):
    """The experiments' command line stops with a usage error (exit status 2) when the
    commit cannot be stated, before anything runs."""
    sys.path.insert(0, str(BENCHMARKS / "experiments"))
    import run as driver

    monkeypatch.setattr(provenance, "_settled", None)
    monkeypatch.setenv(provenance.COMMIT_VARIABLE, "not-a-hash")
    with pytest.raises(SystemExit) as stopped:
        driver.main(["cost", "--out", "/nonexistent/never-written"])
    assert stopped.value.code == 2 and "expected a commit hash" in capsys.readouterr().err


def _writes_results(source: str) -> bool:
    return bool(re.search(r"\b(environment|write_results)\(", source))


def test_every_script_that_writes_results_takes_the_commit_through_provenance():
    """Each script of benchmarks/ that records an environment or writes results offers
    --allow-dirty and settles the commit before it measures; the experiments do so through
    kit.py and run.py."""
    scripts = [path for path in sorted(BENCHMARKS.glob("*.py"))
               if path.name not in ("common.py", "provenance.py", "check_provenance.py")
               and _writes_results(path.read_text())]
    assert len(scripts) >= 14, [path.name for path in scripts]
    for path in scripts + [BENCHMARKS / "experiments" / "kit.py", BENCHMARKS / "experiments" / "run.py"]:
        source = path.read_text()
        # directly, or through common.start_gpu_run, which settles it first
        settles = "settle_or_exit(parser, args" in source or "start_gpu_run(parser, args)" in source
        assert settles, f"{path.name} does not settle the commit"
        assert "add_options(parser)" in source or path.name == "run.py", f"{path.name} offers no --allow-dirty"
    common = (BENCHMARKS / "common.py").read_text()
    assert "**provenance.recorded()" in common
    assert "provenance.settle_or_exit(parser, args)" in common.split("def start_gpu_run", 1)[1]
