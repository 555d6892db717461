"""Bad input ends with a one-line message naming the problem and exit status 2, never a
traceback."""

import random
import shutil
from pathlib import Path

import pytest

from gatedfwa.cli.main import build_parser
from tests.cli.conftest import FAST, folder_files


def _check(cli, args, message, command="train", one_line=True):
    status, out, err = cli(args)
    assert status == 2, (status, out, err)
    assert f"gatedfwa {command}: error:" in err and message in err, err
    assert "Traceback" not in err
    if one_line:
        assert err.count("\n") == 1, err


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else random.Random(0).randbytes(len(data)))


@pytest.mark.parametrize("args, message", [
    (["--data", "{tmp}/missing"], "--data: no such file or folder: {tmp}/missing"),
    (["--data", "{tmp}/empty"], "the corpus is empty"),
    (["--preset", "huge"], "unknown preset 'huge'; choose one of: cpu, tiny"),
    (["--attention", "linear"], "--attention: unknown attention kind 'linear'; choose one of: gatedfwa, swa, full, forgetting"),
    (["--window", "128", "--seq-len", "64"], "model.window_size (128) is larger than the context seq_len (64)"),
    (["--max-steps", "0"], "max_steps must be a positive integer"),
    (["--seq-len", "1", "--window", "1"], "seq_len must be at least 2, got 1: a causal language model predicts"),
    (["--threads", "0"], "threads must be a positive integer, got 0"),
    (["--config", "{tmp}/nope.json"], "--config: no such file"),
    (["--config", "{tmp}/bad.json"], "is not valid JSON"),
    (["--set", "colour=blue"], "unknown setting(s) colour"),
    (["--resume", "{tmp}/missing"], "--resume: no such checkpoint or run folder"),
    (["--resume", "{tmp}/empty"], "holds no checkpoint"),
    (["--batch-size", "6", "--micro-batch-size", "4"], "batch_size 6 must be a multiple of micro_batch_size 4"),
])
def test_train_bad_input(tmp_path, cli, text_corpus, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text("{not json")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    data = [] if "--data" in args else ["--data", str(text_corpus)]
    _check(cli, ["train", *FAST, *data, "--out", tmp_path / "out", *args], message.replace("{tmp}", str(tmp_path)))


def test_resume_from_another_config(cli, trained_run, text_corpus, tmp_path):
    # Another preset, or one changed model setting: refused, with the differences listed.
    _check(cli, ["train", "--preset", "cpu", "--resume", trained_run, "--out", tmp_path / "x"], "was trained with another config",
           one_line=False)
    status, _, err = cli(["train", "--resume", trained_run, "--set", "model.hidden_size=32", "--out", tmp_path / "y"])
    assert status == 2 and "model.hidden_size: 64 in the checkpoint, 32 now" in err and "Traceback" not in err
    _check(cli, ["train", "--resume", trained_run, "--attention", "swa", "--out", tmp_path / "z"],
           "model.attention_kinds: 'gatedfwa' in the checkpoint, 'swa' now", one_line=False)


def test_unavailable_hugging_face_data_and_tokenizer(cli, tmp_path):
    # Nothing is downloaded: a dataset or tokenizer missing from the local cache (or the
    # optional 'datasets' package itself) is reported, not fetched.
    status, _, err = cli(["train", *FAST, "--hf-dataset", "no-such-owner/no-such-dataset", "--out", tmp_path / "a"])
    assert status == 2 and "Traceback" not in err
    assert "needs the optional 'datasets' package" in err or "is not available locally" in err, err
    _check(cli, ["train", *FAST, "--tokenizer", "no-such-tokenizer", "--out", tmp_path / "b"],
           "tokenizer 'no-such-tokenizer' is not available locally")


def test_existing_run_is_not_overwritten_silently(cli, trained_run, text_corpus):
    _check(cli, ["train", *FAST, "--data", text_corpus, "--out", trained_run], "already holds a run")


def test_generate_and_plot_bad_input(cli, tmp_path, trained_run):
    _check(cli, ["generate", "--ckpt", tmp_path / "missing"], "--ckpt: no such checkpoint or run folder", "generate")
    _check(cli, ["generate", "--ckpt", trained_run, "--prompt", ""], "--prompt must not be empty", "generate")
    _check(cli, ["generate", "--ckpt", trained_run, "--temperature", "-1"], "--temperature must be >= 0", "generate")
    _check(cli, ["generate", "--ckpt", trained_run, "--device", "abacus"], "--device: unknown device 'abacus'", "generate")
    _check(cli, ["plot", tmp_path], "not a run folder (no metrics.jsonl in it)", "plot")
    _check(cli, ["plot", trained_run, "--out", tmp_path / "x.jpg"], "--out must name a .png file", "plot")


def test_every_option_has_help(cli):
    from gatedfwa.attention_kinds import ATTENTION_KINDS

    parser = build_parser()
    status, out, _ = cli(["--help"])
    assert status == 0 and all(name in out for name in ("train", "generate", "plot"))
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        status, out, _ = cli([name, "--help"])
        assert status == 0
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            for flag in action.option_strings:
                assert flag in out
        if name == "train":  # the kinds come from the one list of them
            assert all(f"{kind} ({about.description})" in " ".join(out.split()) for kind, about in ATTENTION_KINDS.items())


@pytest.mark.parametrize("how", ["truncated", "overwritten"])
@pytest.mark.parametrize("name", ["model.safetensors", "training_state.pt"])
def test_damaged_checkpoint_file_for_resume(cli, trained_run, tmp_path, name, how):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    damaged = run / "checkpoints" / "step-0000002" / name
    _damage(damaged, how)
    before = folder_files(run)
    earlier = run / "checkpoints" / "step-0000001"
    _check(cli, ["train", "--resume", run, "--no-progress"],
           f"--resume: {damaged} is truncated or corrupt (")
    _check(cli, ["train", "--resume", run, "--no-progress", "--out", tmp_path / "elsewhere"],
           f"; use an earlier checkpoint: --resume {earlier}")
    assert folder_files(run) == before and not (tmp_path / "elsewhere").exists()  # nothing written or lost
    # The checkpoint it points at resumes.
    status, _, err = cli(["train", "--resume", earlier, "--no-progress", "--no-plot", "--out", tmp_path / "resumed"])
    assert status == 0, err


@pytest.mark.parametrize("how", ["truncated", "overwritten"])
def test_damaged_model_file_for_generate(cli, trained_run, tmp_path, how):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    damaged = run / "checkpoints" / "step-0000002" / "model.safetensors"
    _damage(damaged, how)
    _check(cli, ["generate", "--ckpt", run], f"--ckpt: {damaged} is truncated or corrupt (", "generate")
    # Alone (no earlier checkpoint beside it), the advice is to restore or retrain.
    shutil.rmtree(run / "checkpoints" / "step-0000001")
    _check(cli, ["generate", "--ckpt", damaged.parent], "; restore the file or train again", "generate")
    (damaged.parent / "model.safetensors").unlink()
    _check(cli, ["generate", "--ckpt", run], "has no model.safetensors (the model weights)", "generate")


def test_out_naming_a_file(cli, text_corpus, trained_run, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    _check(cli, ["train", *FAST, "--data", text_corpus, "--out", notes],
           f"--out {notes} is an existing file, not a folder: name a folder for the run")
    _check(cli, ["train", *FAST, "--data", text_corpus, "--out", notes / "run"], f"--out {notes / 'run'}: cannot create the run folder")
    assert notes.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [notes]
    (tmp_path / "plots.png").mkdir()
    _check(cli, ["plot", trained_run, "--out", tmp_path / "plots.png"], "is a folder: name a .png file", "plot")
    _check(cli, ["plot", trained_run, "--out", notes / "loss.png"], "cannot write the plot", "plot")


@pytest.mark.parametrize("source", ["config", "set"])
def test_misspelt_model_setting(cli, text_corpus, tmp_path, source):
    if source == "config":
        config = tmp_path / "settings.toml"
        config.write_text("[model]\nhiden_size = 64\n")
        option = ["--config", config]
    else:
        option = ["--set", "model.hiden_size=64"]
    _check(cli, ["train", *FAST, "--data", text_corpus, *option, "--out", tmp_path / "out"],
           "model: unknown setting(s) hiden_size; valid model settings (GatedFWAConfig fields): hidden_size, ")
    assert not (tmp_path / "out").exists()
