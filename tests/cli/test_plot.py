"""``gatedfwa plot``: where the PNG goes without --out (never the working directory unasked),
what --out may name, and damaged metrics files named by file and line."""

import json
import random
import shutil
import sys

import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check(cli, args, message):
    status, out, err = cli(["plot", *args])
    assert status == 2, (status, out, err)
    assert "gatedfwa plot: error: " in err and message in err, err
    assert "Traceback" not in err and err.count("\n") == 1, err


@pytest.fixture
def two_runs(tmp_path, trained_run, monkeypatch):
    """Runs a/ and b/ (copies of the trained run) in a fresh working directory."""
    for name in ("a", "b"):
        shutil.copytree(trained_run, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_several_runs_default_into_the_first_run_folder(cli, two_runs):
    status, out, err = cli(["plot", "a", "b"])
    assert status == 0, err
    assert out.strip() == "plot: a/compare.png"
    assert (two_runs / "a" / "compare.png").read_bytes()[:8] == PNG_MAGIC
    # Nothing was written beside the runs, in the working directory.
    assert sorted(p.name for p in two_runs.iterdir()) == ["a", "b"]
    assert not (two_runs / "b" / "compare.png").exists()


def test_one_run_default_and_help(cli, two_runs):
    (two_runs / "a" / "loss.png").unlink(missing_ok=True)
    status, out, err = cli(["plot", "a"])
    assert status == 0 and out.strip() == "plot: a/loss.png", err
    assert (two_runs / "a" / "loss.png").read_bytes()[:8] == PNG_MAGIC
    status, out, _ = cli(["plot", "--help"])
    assert status == 0 and "compare.png inside the first run folder" in " ".join(out.split())


def test_out_in_a_missing_folder_is_refused_not_created(cli, two_runs):
    missing = two_runs / "no" / "such"
    _check(cli, ["a", "b", "--out", missing / "x.png"],
           f"--out {missing / 'x.png'}: the folder {missing} does not exist")
    assert not (two_runs / "no").exists()
    # An existing folder is fine.
    (two_runs / "plots").mkdir()
    status, out, err = cli(["plot", "a", "b", "--out", two_runs / "plots" / "cmp.png"])
    assert status == 0 and (two_runs / "plots" / "cmp.png").is_file(), err


def test_out_that_is_not_a_png_file(cli, two_runs):
    _check(cli, ["a", "--out", two_runs / "b"], f"--out {two_runs / 'b'} is a folder: name a .png file")
    _check(cli, ["a", "--out", "curves.svg"], "--out must name a .png file (the plot is a PNG image), got curves.svg")
    _check(cli, ["a", "--out", "curves"], "--out must name a .png file")
    assert sorted(p.name for p in two_runs.iterdir()) == ["a", "b"]


@pytest.mark.parametrize("damage, line, shown", [
    ("text", 2, "'this is not json'"),
    ("list", 2, "'[1, 2, 3]'"),
    ("wrong type", 2, """'{"step": 1, "tokens": "many", "train_loss": 3.0}'"""),
    ("binary", 1, None),
])
def test_damaged_metrics_named_by_file_and_line(cli, two_runs, damage, line, shown):
    metrics = two_runs / "a" / "metrics.jsonl"
    good = metrics.read_text().splitlines()
    if damage == "binary":
        metrics.write_bytes(random.Random(0).randbytes(2000))
    else:
        bad = {"text": "this is not json", "list": "[1, 2, 3]",
               "wrong type": json.dumps({"step": 1, "tokens": "many", "train_loss": 3.0})}[damage]
        metrics.write_text("\n".join([good[0], bad, *good[1:]]) + "\n")
    _check(cli, ["a", "b"], f"a/metrics.jsonl line {line} is not a metrics record")
    if shown is not None:
        _, _, err = cli(["plot", "a"])
        assert err.rstrip().endswith(shown), err
    assert not (two_runs / "a" / "compare.png").exists()


def test_a_last_line_cut_short_is_skipped(cli, two_runs):
    # A crash while writing leaves the last line without its newline: the rest still plots.
    metrics = two_runs / "a" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "tokens": 15')
    status, out, err = cli(["plot", "a"])
    assert status == 0, err


def test_without_matplotlib_plot_names_the_extra(cli, two_runs, monkeypatch):
    (two_runs / "a" / "loss.png").unlink(missing_ok=True)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    _check(cli, ["a"], "plots need matplotlib, which is not installed: pip install 'gatedfwa[plot]'")
    assert not (two_runs / "a" / "loss.png").exists()
