"""Helpers for the command-line tests: a small real-text corpus and a way to run
``gatedfwa`` in-process and capture its exit status and output."""

import shutil
from pathlib import Path

import pytest

from gatedfwa.cli.main import main
from gatedfwa.train.data import stdlib_source_files

# Few, small steps: these tests check plumbing, not learning.
FAST = ["--preset", "tiny", "--no-progress", "--no-plot"]


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    """A folder of 30 standard-library sources (real text, ~20 files per held-out file)."""
    root, files = stdlib_source_files()
    chosen = [f for f in files if 2_000 < f.stat().st_size < 20_000][::40][:30]
    folder = tmp_path_factory.mktemp("corpus")
    for i, f in enumerate(chosen):
        shutil.copy(f, folder / f"{i:02d}_{f.name}")
    return folder


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, text_corpus):
    """A 2-step tiny run with checkpoints at steps 1 and 2 (tests copy it before changing it)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    status = main(["train", *FAST, "--data", str(text_corpus), "--out", str(run), "--max-steps", "2",
                   "--eval-interval", "0", "--save-interval", "1"])
    assert status == 0
    return run


@pytest.fixture
def run_copy(tmp_path, trained_run) -> Path:
    """A copy of the trained run, free to change: tmp_path/run."""
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


def folder_files(folder: Path) -> dict:
    """{relative path: bytes} of every file under folder, hidden ones included: two calls
    compare equal when nothing in the folder was written, moved or removed."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def cli(capsys):
    """run(args) -> (exit status, stdout, stderr) of ``gatedfwa args``."""

    def run(args):
        try:
            status = main([str(a) for a in args])
        except SystemExit as exit_:
            status = exit_.code
        out, err = capsys.readouterr()
        return status, out, err

    return run
