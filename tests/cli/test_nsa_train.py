"""gatedfwa train --attention nsa-gatedfwa: a tiny run trains, checkpoints and generates."""

from safetensors.torch import load_file

from tests.cli.conftest import FAST


def test_train_and_generate_with_the_nsa_kind(tmp_path, cli, text_corpus):
    run = tmp_path / "run"
    status, out, err = cli(["train", *FAST, "--attention", "nsa-gatedfwa", "--data", text_corpus, "--out", run,
                            "--max-steps", 2, "--eval-interval", 0, "--eval-windows", 2])
    assert status == 0, err
    assert "(nsa-gatedfwa)" in err
    weights = load_file(run / "checkpoints" / "step-0000002" / "model.safetensors")
    assert any(name.endswith("branch_gate_proj.weight") for name in weights)
    status, out, err = cli(["generate", "--ckpt", run, "--prompt", "def ", "--max-new-tokens", 8])
    assert status == 0, err
