"""Checkpoints written before the attention's decay gate was renamed (keys attn.gate_proj,
attn.gate_bias) load through from_pretrained and gatedfwa.train.checkpoint.load_model to
the same logits, the MLP's gate_proj untouched; saving writes the current names
(gatedfwa/integrations/transformers_checkpoints.py)."""

import re

import torch
from safetensors.torch import load_file, save_file

from gatedfwa.models import GatedFWAForCausalLM
from gatedfwa.train.checkpoint import load_model
from tests.models.test_model import tiny_config


def gate_keys(path) -> list[str]:
    """The keys with "gate" in a saved checkpoint."""
    return sorted(key for key in load_file(path / "model.safetensors") if "gate" in key)


def gate_keys_of(model) -> list[str]:
    """The state_dict keys with "gate" of a model in memory."""
    return sorted(key for key in model.state_dict() if "gate" in key)


def write_with_old_names(model: GatedFWAForCausalLM, path) -> None:
    """save_pretrained, then the attention's decay gate keys renamed to their old names."""
    model.save_pretrained(path)
    weights = load_file(path / "model.safetensors")
    old_names = {key: re.sub(r"attn\.decay_gate_(proj|bias)", r"attn.gate_\1", key) for key in weights}
    assert sum(key != old_name for key, old_name in old_names.items()) == 2 * 2  # weight and bias of 2 gated layers
    assert sum(key.endswith("mlp.gate_proj.weight") for key in old_names.values()) == 3
    old = {old_names[key]: value for key, value in weights.items()}
    save_file(old, path / "model.safetensors", metadata={"format": "pt"})


def test_checkpoint_with_the_old_gate_names_loads_to_the_same_logits(tmp_path):
    config = tiny_config(num_hidden_layers=3, attention_kinds=["gatedfwa", "swa", "nsa-gatedfwa"],
                         nsa_block_size=4, nsa_block_counts=2, token_shift=True, output_gate=True)
    model = GatedFWAForCausalLM(config).eval()
    with torch.no_grad():  # every parameter away from its initial value, so that none loads by chance
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    write_with_old_names(model, tmp_path)
    ids = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
        loaded, info = GatedFWAForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert torch.equal(loaded.eval()(ids).logits, expected)
        assert torch.equal(load_model(tmp_path).eval()(ids).logits, expected)
    resaved = tmp_path / "resaved"
    loaded.save_pretrained(resaved)
    assert gate_keys(resaved) == gate_keys_of(model)


def test_a_new_model_saves_the_current_names(tmp_path):
    model = GatedFWAForCausalLM(tiny_config())
    model.save_pretrained(tmp_path)
    keys = gate_keys(tmp_path)
    assert keys == gate_keys_of(model)
    assert "model.layers.0.attn.decay_gate_proj.weight" in keys and "model.layers.0.mlp.gate_proj.weight" in keys
