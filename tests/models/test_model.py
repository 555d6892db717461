"""GatedFWAForCausalLM: loss, attention kinds, padding, save/load, Auto classes, compile,
config validation."""

import pytest
import torch
import torch.nn.functional as F

import gatedfwa  # noqa: F401  (registers the Auto classes)
from gatedfwa.models import GatedFWAConfig, GatedFWAForCausalLM


def tiny_config(**overrides) -> GatedFWAConfig:
    fields = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, window_size=4)
    fields.update(overrides)
    return GatedFWAConfig(**fields)


def test_loss_is_shifted_mean_cross_entropy_with_ignore_index():
    model = GatedFWAForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 61, (3, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels)
    logits = out.logits
    assert logits.shape == (3, 10, 61)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 61), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    # At initialisation the loss is about log(vocab).
    assert abs(out.loss.item() - torch.log(torch.tensor(61.0)).item()) < 0.5
    last = model(ids, logits_to_keep=1).logits
    torch.testing.assert_close(last, logits[:, -1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kinds", ["gatedfwa", "swa", "full", "forgetting", ["gatedfwa", "full"], ["swa", "forgetting"]])
def test_each_attention_kind_runs_and_trains(kinds):
    model = GatedFWAForCausalLM(tiny_config(attention_kinds=kinds, token_shift=True, qk_norm=True, output_gate=True))
    ids = torch.randint(0, 61, (2, 11))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    for i, kind in enumerate(model.config.layer_kinds):
        attn = model.model.layers[i].attn
        assert attn.use_gate == (kind in ("gatedfwa", "forgetting"))
        assert attn.window_size == (4 if kind in ("gatedfwa", "swa") else None)
        assert all(p.grad is not None for p in attn.parameters())


def test_window_limits_what_a_token_sees():
    """With "swa"/"gatedfwa" in one layer, changing a token more than w positions back
    leaves the logits unchanged; "full" and "forgetting" see it."""
    for kind, sees in (("swa", False), ("gatedfwa", False), ("full", True), ("forgetting", True)):
        model = GatedFWAForCausalLM(tiny_config(num_hidden_layers=1, attention_kinds=kind)).eval()
        ids = torch.randint(0, 61, (1, 12))
        changed = ids.clone()
        changed[0, 2] = (ids[0, 2] + 1) % 61
        with torch.no_grad():
            diff = (model(ids).logits[0, -1] - model(changed).logits[0, -1]).abs().max().item()
        assert (diff > 1e-6) == sees, kind


def test_left_padded_batch_equals_rows_alone():
    model = GatedFWAForCausalLM(tiny_config(token_shift=True, attention_kinds=["gatedfwa", "full"])).eval()
    rows = [torch.randint(1, 61, (n,)) for n in (5, 9, 2)]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, 9 - len(row):] = row
        mask[b, 9 - len(row):] = 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for b, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            torch.testing.assert_close(batched[b, 9 - len(row):], alone, rtol=1e-5, atol=1e-5)


def test_pack_padded_is_the_one_packing_of_model_and_layer():
    from gatedfwa.layers import GatedFWAttention, rotary_angles
    from gatedfwa.layers.padding import pack_padded, unpack

    x = torch.randn(2, 5, 3)
    layout, packed, positions, _ = pack_padded(torch.ones(2, 5, dtype=torch.long), x)
    assert layout is None and packed is x and positions.tolist() == [list(range(5))] * 2  # no padding: as is
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 0, 1, 1, 0]])
    angles = torch.randn(2, 5, 4)
    layout, packed, positions, (packed_angles,) = pack_padded(mask, x, extra=(angles,))
    assert packed.shape == (1, 6, 3) and layout.cu_seqlens.tolist() == [0, 3, 6]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2]]  # each row counts its real tokens from 0
    torch.testing.assert_close(packed_angles[0], angles[mask.bool()])
    torch.testing.assert_close(unpack(packed, layout), x * mask[..., None])
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[batch, seqlen\] = \[2, 5\]"):
        pack_padded(mask[:, :4], x)

    # The model (packing once for all layers) and a layer called alone with the mask agree.
    model = GatedFWAForCausalLM(tiny_config(num_hidden_layers=1, token_shift=True)).eval()
    layer = model.model.layers[0].attn
    assert isinstance(layer, GatedFWAttention)
    hidden = torch.randn(2, 5, 32)
    with torch.no_grad():
        alone = layer(hidden, attention_mask=mask)
        layout, packed, positions, _ = pack_padded(mask, hidden)
        via_layout = unpack(layer(packed, layout=layout, rotary=rotary_angles(positions, 8, layer.rope_theta)), layout)
        unmasked = layer(hidden)
        ones = layer(hidden, attention_mask=torch.ones(2, 5))
    torch.testing.assert_close(alone, via_layout, rtol=1e-5, atol=1e-6)
    assert alone[mask == 0].abs().max() == 0
    torch.testing.assert_close(ones, unmasked, rtol=1e-5, atol=1e-6)


def test_save_load_round_trip_and_auto_class(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = tiny_config(attention_kinds=["gatedfwa", "swa"], token_shift=True, output_gate=True, qk_norm=True)
    model = GatedFWAForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    ids = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
        loaded = GatedFWAForCausalLM.from_pretrained(tmp_path).eval()
        assert torch.equal(loaded(ids).logits, expected)
        auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert isinstance(auto, GatedFWAForCausalLM)
        assert torch.equal(auto(ids).logits, expected)
    assert AutoConfig.from_pretrained(tmp_path).layer_kinds == ["gatedfwa", "swa"]
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_forward_compiles_fullgraph():
    """torch.compile(fullgraph=True) of the forward (with loss) on CPU, backend aot_eager
    (traces forward and backward graphs like inductor, without inductor's C++ build time)."""
    torch._dynamo.reset()
    model = GatedFWAForCausalLM(tiny_config(token_shift=True, qk_norm=True, output_gate=True,
                                            attention_kinds=["gatedfwa", "full"]))
    ids = torch.randint(0, 61, (2, 10))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(ids, labels=ids)
    out.loss.backward()
    eager = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, eager.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, eager.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(attention_kinds="linear"), ValueError, "unknown attention kind"),
        (dict(attention_kinds=["gatedfwa"] * 3), ValueError, "one kind per layer"),
        (dict(attention_kinds=7), TypeError, "attention_kinds"),
        (dict(window_size=0), ValueError, "window_size"),
        (dict(window_size=None), ValueError, "window_size"),
        (dict(num_attention_heads=4, num_key_value_heads=3), ValueError, "divisible"),
        (dict(hidden_size=30, num_attention_heads=4, head_dim=None), ValueError, "hidden_size"),
        (dict(head_dim=7), ValueError, "head_dim"),
        (dict(vocab_size=0), ValueError, "vocab_size"),
        (dict(gate_init_range=(0.9, 1.0)), ValueError, "gate_init_range"),
    ],
)
def test_config_validation(overrides, error, message):
    with pytest.raises(error, match=message):
        tiny_config(**overrides)


def test_config_refuses_misspelt_fields_and_keeps_transformers_keys(tmp_path):
    with pytest.raises(TypeError, match="unknown argument 'hiden_size'; did you mean 'hidden_size'"):
        tiny_config(hiden_size=64)
    # config.json carries transformers' own keys too; they load as before.
    config = tiny_config()
    config.save_pretrained(tmp_path)
    assert GatedFWAConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


def test_config_defaults_and_window_free_kinds():
    config = GatedFWAConfig()
    assert config.head_dim == 64 and config.num_key_value_heads == 12 and config.intermediate_size % 64 == 0
    assert GatedFWAConfig(window_size=None, attention_kinds="full").layer_kinds == ["full"] * 12


def test_initialisation():
    config = tiny_config(num_hidden_layers=8, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                         num_key_value_heads=8, head_dim=32, gate_init_range=(0.95, 0.995))
    model = GatedFWAForCausalLM(config)
    from gatedfwa.layers import gate_bias_init

    std, residual_std = 0.02, 0.02 / (2 * 8) ** 0.5
    for block in model.model.layers:
        torch.testing.assert_close(block.attn.decay_gate_bias.detach(), gate_bias_init(8, (0.95, 0.995)))
        assert abs(block.attn.q_proj.weight.std().item() - std) < 0.1 * std
        assert abs(block.attn.o_proj.weight.std().item() - residual_std) < 0.1 * residual_std
        assert abs(block.mlp.down_proj.weight.std().item() - residual_std) < 0.1 * residual_std
        assert torch.equal(block.attn_norm.weight, torch.ones(256))
