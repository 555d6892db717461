"""GatedFWAForCausalLM with GatedFWAConfig.gate: the config field (validated, saved, absent
in old configs), a model with gate="forgetting" that trains, whose gradients match a float64
re-implementation of the model, whose decoding equals its forward, and that round-trips
through save_pretrained / from_pretrained."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from gatedfwa.models import GatedFWAConfig, GatedFWAForCausalLM
from gatedfwa.ops import use_backend
from gatedfwa.testing import assert_within_rule, float32_slack
from tests.layers.reference import reference_attention_layer
from tests.models.test_generation import sharpened
from tests.models.test_model import tiny_config
from tests.models.test_static_generation import assert_compiled_steps_equal_parallel_forward


def test_gate_field_defaults_validates_and_sizes_the_layers():
    assert GatedFWAConfig().gate == "sharpened"
    with pytest.raises(ValueError, match=r"unknown gate 'forget'; choose from \['sharpened', 'forgetting'\]"):
        tiny_config(gate="forget")
    for gate, rows in (("sharpened", 8), ("forgetting", 4)):
        model = GatedFWAForCausalLM(tiny_config(gate=gate, attention_kinds=["gatedfwa", "swa"]))
        attn = model.model.layers[0].attn
        assert attn.gate == gate and attn.decay_gate_proj.weight.shape == (rows, 32)
        assert not hasattr(model.model.layers[1].attn, "decay_gate_proj")


def test_config_without_the_field_loads_as_the_default_gate(tmp_path):
    """config.json written before the gate field existed: the default gate, and the
    checkpoint's [2 HQ, C] gate weights load into it."""
    model = GatedFWAForCausalLM(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    fields = json.loads(path.read_text())
    assert fields["gate"] == "sharpened"
    del fields["gate"]
    path.write_text(json.dumps(fields))
    loaded = GatedFWAForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.gate == "sharpened"
    ids = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_save_load_round_trip(tmp_path):
    config = tiny_config(gate="forgetting", attention_kinds=["gatedfwa", "forgetting"], token_shift=True)
    model = sharpened(GatedFWAForCausalLM(config))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["gate"] == "forgetting"
    loaded = GatedFWAForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.gate == "forgetting" and loaded.model.layers[1].attn.gate == "forgetting"
    ids = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_forgetting_gate_model_trains():
    """A few Adam steps on one batch lower the loss; every parameter gets a finite gradient."""
    torch.manual_seed(0)
    model = GatedFWAForCausalLM(tiny_config(gate="forgetting", attention_kinds=["gatedfwa", "forgetting"]))
    ids = torch.randint(0, 61, (4, 16))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def _rms(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def reference_model_loss(model, ids, dtype):
    """The model's loss written out in ``dtype`` (float64 for the reference): embedding,
    blocks of RMSNorm + tests/layers/reference.py's attention + SwiGLU, final norm, tied head,
    shifted cross entropy. Gradients flow to the model's parameters."""
    eps = model.config.rms_norm_eps
    embed = model.model.embed_tokens.weight.to(dtype)
    x = embed[ids]
    for block in model.model.layers:
        h = _rms(x, block.attn_norm.weight.to(dtype), eps)
        x = x + reference_attention_layer(block.attn, h, dtype=dtype, differentiable=True)
        h = _rms(x, block.mlp_norm.weight.to(dtype), eps)
        mlp = block.mlp
        x = x + (F.silu(h @ mlp.gate_proj.weight.to(dtype).T) * (h @ mlp.up_proj.weight.to(dtype).T)) @ mlp.down_proj.weight.to(dtype).T
    logits = _rms(x, model.model.norm.weight.to(dtype), eps) @ embed.T
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forgetting_gate_gradients_match_float64_reference(backend, device):
    """Loss and every parameter's gradient within the rule of docs/correctness.md against
    the float64 re-implementation (float32 naive for the rule's own error); on Triton the
    fused gate + attention op and the gate kernels run (the interpreter on a CPU)."""
    model = sharpened(GatedFWAForCausalLM(tiny_config(gate="forgetting", attention_kinds=["gatedfwa", "forgetting"])))
    with torch.no_grad():
        for block in model.model.layers:
            block.attn.decay_gate_bias.normal_(0.0, 2.0)  # gates from ~0 to a few units of decay
    model = model.to(device)
    ids = torch.randint(0, 61, (2, 13), device=device)

    def gradients(loss_fn):
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return {"loss": loss.detach(), **{name: p.grad.clone() for name, p in model.named_parameters()}}

    with use_backend(backend):
        fast = gradients(lambda: model(ids, labels=ids).loss)
    naive = gradients(lambda: reference_model_loss(model, ids, torch.float32))
    ref = gradients(lambda: reference_model_loss(model, ids, torch.float64))
    assert ref["model.layers.0.attn.decay_gate_proj.weight"].shape == (4, 32)
    assert ref["model.layers.1.attn.decay_gate_bias"].abs().sum() > 0
    for name in ref:
        # Ten times the float32 slack, as the layer tests give the gradients through the gate.
        atol = float32_slack(ref[name], torch.float32) * 10
        assert_within_rule(name, fast[name], naive[name], ref[name], atol=atol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forgetting_gate_decoding_equals_forward(backend, device):
    """Prefill, then one token at a time through the model's cache, gives the logits of one
    parallel forward (T > 3w, a windowed and a window-free gated layer)."""
    model = sharpened(GatedFWAForCausalLM(tiny_config(gate="forgetting", attention_kinds=["gatedfwa", "forgetting"],
                                                      token_shift=True))).to(device)
    ids = torch.randint(0, 61, (2, 14), device=device)
    with torch.no_grad(), use_backend(backend):
        parallel = model(ids).logits
        out = model(ids[:, :6], use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        steps = [out.logits] + [model(ids[:, t:t + 1], cache=cache).logits for t in range(6, 14)]
    assert parallel.abs().max() > 1.0
    torch.testing.assert_close(torch.cat(steps, dim=1), parallel, rtol=1e-4, atol=1e-4)


def test_forgetting_gate_generate_matches_greedy_loop():
    model = sharpened(GatedFWAForCausalLM(tiny_config(gate="forgetting", attention_kinds="forgetting",
                                                      window_size=None)))
    prompt = torch.randint(1, 61, (1, 5))
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        ids = prompt
        for _ in range(6):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, ids)
    assert math.isfinite(model(ids, labels=ids).loss.item())


def test_forgetting_gate_compiled_static_decoding_equals_forward():
    """Compiled (fullgraph) decoding steps on the static cache, gate="forgetting"."""
    assert_compiled_steps_equal_parallel_forward(dict(gate="forgetting", attention_kinds=["gatedfwa", "forgetting"]),
                                                 12, backend="aot_eager")
