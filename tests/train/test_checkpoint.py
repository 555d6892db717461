"""Reading checkpoints that were damaged after they were written: each problem is a one-line
ConfigError naming the file, and the newest earlier checkpoint of the run when there is one."""

import json

import pytest
import torch

from gatedfwa.errors import ConfigError
from gatedfwa.models import GatedFWAConfig, GatedFWAForCausalLM
from gatedfwa.train.checkpoint import check_model_files, load_model, read_training_state


def _tiny_model() -> GatedFWAForCausalLM:
    return GatedFWAForCausalLM(GatedFWAConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                              num_attention_heads=2, head_dim=16, window_size=4))


def _truncate(path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def test_sharded_weights_are_checked_shard_by_shard(tmp_path):
    model = _tiny_model()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    check_model_files(tmp_path)
    loaded = load_model(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))

    _truncate(shards[-1])
    with pytest.raises(ConfigError, match=f"--ckpt: {shards[-1]} is truncated or corrupt .*; restore the file or train again$"):
        check_model_files(tmp_path)
    shards[-1].unlink()
    with pytest.raises(ConfigError, match=f"has no {shards[-1].name} \\(the model weights\\)"):
        load_model(tmp_path, "--resume")
    (tmp_path / "model.safetensors.index.json").write_text("{\"weight_map\": ")
    with pytest.raises(ConfigError, match="model.safetensors.index.json is truncated or corrupt"):
        check_model_files(tmp_path)


def test_unreadable_config_json_is_named(tmp_path):
    _tiny_model().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gatedfwa", "hidden_size": 30, "num_attention_heads": 4}))
    with pytest.raises(ConfigError, match=f"--ckpt: cannot load the model in {tmp_path}: hidden_size"):
        load_model(tmp_path)


def test_training_state_without_its_parts_is_named(tmp_path):
    checkpoint = tmp_path / "checkpoints" / "step-0000002"
    checkpoint.mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-0000001").mkdir()  # not a checkpoint (no records): not offered
    torch.save({"format": 1, "step": 2}, checkpoint / "training_state.pt")
    with pytest.raises(ConfigError, match=r"training_state.pt is truncated or corrupt \(no optimizer, rng, tokens_seen in it\)"):
        read_training_state(checkpoint)
    torch.save([1, 2], checkpoint / "training_state.pt")
    with pytest.raises(ConfigError, match=r"\(not a training state\)"):
        read_training_state(checkpoint)
    torch.save({"format": 99}, checkpoint / "training_state.pt")
    with pytest.raises(ConfigError, match="has format 99, this version reads 1"):
        read_training_state(checkpoint)
