"""One-line messages that say what was wrong and what to do: binary files given as training
text, another model's checkpoint given to generate or --resume, and GATEDFWA_BACKEND values
that cannot work (a misspelt backend, Triton absent, Triton kernels without a GPU)."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

from gatedfwa.errors import ConfigError
from gatedfwa.ops import backend
from tests.cli.conftest import FAST
from tests.cli.test_startup import PACKAGE

PNG_HEADER = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x06\x00\x00\x00"


def _check(cli, args, message, command="train"):
    status, out, err = cli(args)
    assert status == 2, (status, out, err)
    assert f"gatedfwa {command}: error: " in err and message in err, err
    assert "Traceback" not in err and err.count("\n") == 1, err


@pytest.mark.parametrize("content", [random.Random(0).randbytes(4096), PNG_HEADER + bytes(200)], ids=["random", "png"])
def test_binary_file_as_training_text(cli, tmp_path, text_corpus, content):
    binary = tmp_path / "picture.png"
    binary.write_bytes(content)
    expected = (f"--data: {binary} is not text (it has NUL bytes, as images and other binary files do); --data takes "
                f"text files and folders of them, or one pre-tokenized .bin file of uint16 token ids")
    _check(cli, ["train", *FAST, "--data", binary, "--out", tmp_path / "out"], expected)
    # Named beside real text it is refused too (inside a folder it would be skipped).
    _check(cli, ["train", *FAST, "--data", text_corpus, binary, "--out", tmp_path / "out"], expected)


def test_folder_of_binary_files(cli, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(PNG_HEADER)
    _check(cli, ["train", *FAST, "--data", folder, "--out", tmp_path / "out"],
           f"the corpus is empty: no text files found in {folder} (files with a NUL byte in their first 8 KiB "
           f"are binary and skipped)")


@pytest.fixture
def llama_folder(tmp_path):
    """A folder as transformers' save_pretrained leaves it for another kind of model."""
    folder = tmp_path / "tiny-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_another_models_folder_for_generate_and_resume(cli, llama_folder, tmp_path):
    expected = (f"{llama_folder} holds a 'llama' model (model_type in its config.json), not a gatedfwa checkpoint; "
                f"gatedfwa checkpoints are written by `gatedfwa train`")
    _check(cli, ["generate", "--ckpt", llama_folder], f"--ckpt: {expected}", "generate")
    _check(cli, ["train", "--resume", llama_folder, "--out", tmp_path / "out"], f"--resume: {expected}")
    assert not (tmp_path / "out").exists()


def test_another_models_checkpoint_inside_a_run_folder(cli, trained_run, tmp_path):
    # A run folder whose newest checkpoint holds another model's config.json.
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    newest = run / "checkpoints" / "step-0000002"
    (newest / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    _check(cli, ["generate", "--ckpt", run], f"--ckpt: {newest} holds a 'gpt2' model", "generate")


def test_gatedfwa_model_without_training_record(cli, trained_run, tmp_path):
    # What save_pretrained writes (a model, no train_config.json): named as such, not "no checkpoint".
    export = tmp_path / "export"
    shutil.copytree(trained_run / "checkpoints" / "step-0000002", export)
    (export / "train_config.json").unlink()
    _check(cli, ["generate", "--ckpt", export],
           f"--ckpt: {export} holds a model (config.json) but no train_config.json, so it is not a checkpoint of "
           f"`gatedfwa train`", "generate")


@pytest.mark.parametrize("value", ["cuda", "tritn", "pytorch"])
def test_bad_backend_value(cli, monkeypatch, trained_run, value):
    monkeypatch.setenv("GATEDFWA_BACKEND", value)
    _check(cli, ["generate", "--ckpt", trained_run],
           f"GATEDFWA_BACKEND='{value}' is not a backend; accepted values: auto, triton, torch", "generate")
    with pytest.raises(ConfigError, match="accepted values: auto, triton, torch"):
        backend.select_backend(torch.device("cpu"))


def test_auto_backend(monkeypatch):
    monkeypatch.setenv("GATEDFWA_BACKEND", "auto")
    assert backend.select_backend(torch.device("cpu")) == "torch"
    # Without Triton, CUDA tensors take the PyTorch path instead of failing.
    monkeypatch.setattr(backend, "triton", None)
    assert backend.select_backend(torch.device("cuda")) == "torch"


def test_triton_backend_without_triton_installed(text_corpus, tmp_path):
    # Triton's absence, simulated: a None entry in sys.modules makes `import triton` fail.
    code = ("import sys; sys.modules['triton'] = None\n"
            "from gatedfwa.cli.main import main\n"
            f"main(['train', '--preset', 'tiny', '--data', {str(text_corpus)!r}, '--out', {str(tmp_path / 'out')!r}])\n")
    env = {**os.environ, "GATEDFWA_BACKEND": "triton", "PYTHONPATH": str(PACKAGE.parent)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr == ("gatedfwa train: error: GATEDFWA_BACKEND=triton asks for the Triton kernels, but Triton is "
                             "not installed: pip install triton, or set GATEDFWA_BACKEND=auto or GATEDFWA_BACKEND=torch "
                             "(or unset it) for the PyTorch path\n")
    assert not (tmp_path / "out").exists()


def test_triton_backend_where_the_kernels_cannot_run(monkeypatch):
    monkeypatch.setenv("GATEDFWA_BACKEND", "triton")
    # The op path, Triton absent (as the command line's early check cannot see a broken install).
    monkeypatch.setattr(backend, "triton", None)
    with pytest.raises(ConfigError, match="but Triton is not installed: pip install triton, or set GATEDFWA_BACKEND=auto"):
        backend.select_backend(torch.device("cuda"))
    # Triton present, CPU tensors and no interpreter: the kernels would fail inside Triton.
    monkeypatch.setattr(backend, "triton", object())
    monkeypatch.setattr(backend, "interpreting", lambda: False)
    with pytest.raises(ConfigError, match="the Triton kernels need CUDA tensors, these are on cpu: run on a GPU, "
                                          "set GATEDFWA_BACKEND=auto or GATEDFWA_BACKEND=torch"):
        backend.select_backend(torch.device("cpu"))
    monkeypatch.setattr(backend, "interpreting", lambda: True)
    assert backend.select_backend(torch.device("cpu")) == "triton"
