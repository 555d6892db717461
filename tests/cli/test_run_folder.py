"""The run folder (--out) is written only once training is ready, and an old run replaced by
--overwrite is deleted only once the new run has its first checkpoint: bad input, errors and
Ctrl-C before that leave every file as it was (gatedfwa/train/run_folder.py)."""

import pytest

import gatedfwa.train.trainer as trainer
from gatedfwa.train.run_folder import SET_ASIDE
from tests.cli.conftest import FAST, folder_files


@pytest.fixture
def old_run(run_copy):
    """A copy of the 2-step run, with a loss plot as `gatedfwa train` leaves one."""
    (run_copy / "loss.png").write_bytes(b"\x89PNG old plot")
    return run_copy


def _interrupt_at(monkeypatch, at_step):
    """Ctrl-C when the loop reaches optimizer step ``at_step`` (as a KeyboardInterrupt there)."""
    schedule = trainer.learning_rate

    def learning_rate(config, step):
        if step == at_step:
            raise KeyboardInterrupt
        return schedule(config, step)

    monkeypatch.setattr(trainer, "learning_rate", learning_rate)


@pytest.mark.parametrize("bad", [
    ["--data", "{tmp}/missing"],
    ["--tokenizer", "no-such-tokenizer"],
    ["--seq-len", "1", "--window", "1"],
])
def test_failing_overwrite_keeps_the_old_run(cli, old_run, text_corpus, tmp_path, bad):
    before = folder_files(old_run)
    data = [] if "--data" in bad else ["--data", text_corpus]
    bad = [a.replace("{tmp}", str(tmp_path)) for a in bad]
    status, _, err = cli(["train", *FAST, *data, *bad, "--out", old_run, "--overwrite"])
    assert status == 2 and "gatedfwa train: error:" in err and "Traceback" not in err, err
    assert folder_files(old_run) == before


def test_overwrite_replaces_the_old_run_once_the_new_one_has_a_checkpoint(cli, old_run, text_corpus):
    old_state = (old_run / "checkpoints" / "step-0000002" / "training_state.pt").read_bytes()
    status, out, err = cli(["train", *FAST, "--data", text_corpus, "--out", old_run, "--overwrite",
                            "--max-steps", 3, "--save-interval", 0, "--eval-interval", 0])
    assert status == 0, err
    assert f"checkpoint: {old_run / 'checkpoints' / 'step-0000003'}" in out
    # Only the new run is left: its checkpoint and metrics, no plot of the old one, nothing hidden.
    assert sorted(p.name for p in old_run.iterdir()) == ["checkpoints", "metrics.jsonl"]
    assert sorted(p.name for p in (old_run / "checkpoints").iterdir()) == ["step-0000003"]
    steps = [line for line in (old_run / "metrics.jsonl").read_text().splitlines() if '"train_loss"' in line]
    assert len(steps) == 3
    assert (old_run / "checkpoints" / "step-0000003" / "training_state.pt").read_bytes() != old_state


def test_ctrl_c_before_the_first_checkpoint_of_an_overwrite_puts_the_old_run_back(cli, old_run, text_corpus,
                                                                                   monkeypatch):
    before = folder_files(old_run)
    _interrupt_at(monkeypatch, at_step=2)  # two steps trained, no checkpoint yet (save interval 10)
    status, _, err = cli(["train", *FAST, "--data", text_corpus, "--out", old_run, "--overwrite", "--max-steps", 20])
    assert status == 130, err
    assert "interrupted at step 2, before the new run's first checkpoint" in err and "back in place" in err
    assert folder_files(old_run) == before


def test_ctrl_c_after_the_first_checkpoint_of_an_overwrite_keeps_the_new_run(cli, old_run, text_corpus,
                                                                             monkeypatch):
    _interrupt_at(monkeypatch, at_step=2)
    status, _, err = cli(["train", *FAST, "--data", text_corpus, "--out", old_run, "--overwrite", "--max-steps", 20,
                          "--save-interval", 1])
    assert status == 130, err
    assert "interrupted at step 2; last checkpoint:" in err, err
    assert sorted(p.name for p in (old_run / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
    assert not (old_run / SET_ASIDE).exists() and not (old_run / "loss.png").exists()


def test_a_replacement_killed_before_its_first_checkpoint_still_counts_as_the_run(cli, old_run, text_corpus,
                                                                                   monkeypatch):
    # What a process killed (kill -9) after setting the old run aside leaves: the old run in
    # the hidden folder, a new metrics.jsonl and no checkpoint beside it.
    aside = old_run / SET_ASIDE
    aside.mkdir()
    for name in ("checkpoints", "metrics.jsonl", "loss.png"):
        (old_run / name).rename(aside / name)
    (old_run / "metrics.jsonl").write_text('{"step": 0, "heldout_loss": 5.0}\n')
    old, left = folder_files(aside), folder_files(old_run)
    status, _, err = cli(["train", *FAST, "--data", text_corpus, "--out", old_run])
    assert status == 2 and "already holds a run (step-0000002)" in err, err
    status, _, err = cli(["train", *FAST, "--data", text_corpus, "--out", old_run, "--overwrite", "--seq-len", 100000])
    assert status == 2 and folder_files(old_run) == left, err  # refused: nothing touched
    # Stopped before its first checkpoint, the next replacement puts the old run back in place.
    _interrupt_at(monkeypatch, at_step=1)
    status, _, err = cli(["train", *FAST, "--data", text_corpus, "--out", old_run, "--overwrite"])
    assert status == 130 and "back in place" in err, err
    assert folder_files(old_run) == old and not aside.exists()
    monkeypatch.undo()
    status, _, err = cli(["train", *FAST, "--data", text_corpus, "--out", old_run, "--overwrite", "--max-steps", 1])
    assert status == 0, err
    assert sorted(p.name for p in old_run.iterdir()) == ["checkpoints", "metrics.jsonl"]


def _binary_file(tmp):
    (tmp / "blob.dat").write_bytes(bytes(range(256)) * 8)
    return ["--data", tmp / "blob.dat"]


def _odd_bin(tmp):
    (tmp / "ids.bin").write_bytes(b"\x01\x00\x02")
    return ["--data", tmp / "ids.bin"]


def _empty_folder(tmp):
    (tmp / "empty").mkdir()
    return ["--data", tmp / "empty"]


@pytest.mark.parametrize("bad", [
    lambda tmp: ["--data", tmp / "missing"],
    _empty_folder,
    _binary_file,
    _odd_bin,
    lambda tmp: ["--tokenizer", "no-such-tokenizer"],
    lambda tmp: ["--hf-dataset", "no-such-owner/no-such-dataset"],
    lambda tmp: ["--seq-len", "100000"],  # longer than the corpus's held-out split
], ids=["missing", "empty", "binary", "odd-length-bin", "tokenizer", "hf-dataset", "too-long-seq-len"])
def test_early_errors_create_no_run_folder(cli, text_corpus, tmp_path, bad):
    args = bad(tmp_path)
    data = [] if "--data" in args or "--hf-dataset" in args else ["--data", text_corpus]
    out = tmp_path / "runs" / "new"
    status, _, err = cli(["train", *FAST, *data, *args, "--out", out])
    assert status == 2 and "gatedfwa train: error:" in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_before_the_first_step_keeps_nothing(cli, text_corpus, tmp_path, monkeypatch):
    _interrupt_at(monkeypatch, at_step=0)
    out = tmp_path / "runs" / "new"
    status, _, err = cli(["train", *FAST, "--data", text_corpus, "--out", out])
    assert status == 130, err
    assert "interrupted at step 0, before the first checkpoint: nothing was kept" in err
    assert not (tmp_path / "runs").exists()
