"""gatedfwa train -> resume -> generate -> plot on a tiny model, and exact resumption."""

import json
import shutil

import torch
from safetensors.torch import load_file

from tests.cli.conftest import FAST


def _losses(run_dir):
    """{(step, kind): loss} from a run's metrics.jsonl."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for kind in ("train_loss", "heldout_loss"):
            if kind in record:
                out[(record["step"], kind)] = record[kind]
    return out


def test_train_resume_generate_plot(tmp_path, cli):
    run = tmp_path / "run"
    # Default corpus (the standard library), plot on: the path a new user takes.
    status, out, err = cli(["train", "--preset", "tiny", "--no-progress", "--out", run, "--max-steps", 4,
                            "--save-interval", 2, "--eval-interval", 2])
    assert status == 0, err
    assert "standard library" in err and "held-out loss" in err
    assert f"checkpoint: {run / 'checkpoints' / 'step-0000004'}" in out
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]

    # Resume the run (its own settings) and extend it to 6 steps.
    status, out, err = cli(["train", "--resume", run, "--max-steps", 6, "--no-progress"])
    assert status == 0, err
    assert "resumed from" in err and "step-0000004" in err
    steps = [s for (s, kind) in _losses(run) if kind == "train_loss"]
    assert steps == [1, 2, 3, 4, 5, 6]  # one record per step, no duplicates

    status, out, err = cli(["generate", "--ckpt", run, "--prompt", "def ", "--max-new-tokens", 24, "--temperature", 0])
    assert status == 0, err
    assert out.startswith("def ") and len(out.encode()) > len("def ")
    assert "tokens/s" in err and "decoding cache" in err and "step-0000006" in err
    # The fixed-shape cache (what a GPU takes by default) gives the same greedy text.
    status, static_out, err = cli(["generate", "--ckpt", run, "--prompt", "def ", "--max-new-tokens", 24,
                                   "--temperature", 0, "--cache", "static"])
    assert status == 0, err
    assert static_out == out

    status, out, err = cli(["plot", run, "--out", tmp_path / "cmp.png"])
    assert status == 0, err
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_continues_exactly(tmp_path, cli, text_corpus):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    common = FAST + ["--data", text_corpus, "--max-steps", 6, "--eval-interval", 3]
    status, _, err = cli(["train", *common, "--out", whole, "--save-interval", 3])
    assert status == 0, err
    # Interrupted after step 3: continue from that checkpoint in another folder.
    status, _, err = cli(["train", "--resume", whole / "checkpoints" / "step-0000003", "--out", resumed, "--no-progress"])
    assert status == 0, err

    a, b = _losses(whole), _losses(resumed)
    assert a.keys() == b.keys() and len(a) == 6 + 3  # 6 training steps, held-out at 0, 3, 6
    assert all(a[key] == b[key] for key in a), {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    final_a = load_file(whole / "checkpoints" / "step-0000006" / "model.safetensors")
    final_b = load_file(resumed / "checkpoints" / "step-0000006" / "model.safetensors")
    assert final_a.keys() == final_b.keys()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_plot_writes_into_the_first_run_by_default(tmp_path, cli, trained_run, monkeypatch):
    # Without --out nothing lands in the working directory: one run gets RUN/loss.png,
    # several get compare.png inside the first run folder.
    runs = tmp_path / "runs"
    for name in ("a", "b"):
        shutil.copytree(trained_run, runs / name)
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    status, out, err = cli(["plot", runs / "a"])
    assert status == 0 and out.strip() == f"plot: {runs / 'a' / 'loss.png'}", err
    status, out, err = cli(["plot", runs / "a", runs / "b"])
    assert status == 0 and out.strip() == f"plot: {runs / 'a' / 'compare.png'}", err
    assert (runs / "a" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(workdir.iterdir()) == [] and sorted(p.name for p in runs.iterdir()) == ["a", "b"]
