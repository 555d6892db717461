"""PEFT adapters on GatedFWAForCausalLM (real peft): LoRA on every linear layer trains (every
adapter tensor gets a gradient, a step changes the logits), prefill then step-by-step
decoding with the adapter equals the parallel forward, the merged model equals the adapted
one, an adapter on q_proj or the decay gate alone takes effect, the decay gate is a target
apart from the MLP's gate_proj, and LoraConfig without target_modules works."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from gatedfwa.models import GatedFWAForCausalLM
from gatedfwa.testing import output_cache
from tests.models.test_generation import sharpened
from tests.models.test_model import tiny_config

CONFIGS = {
    "gatedfwa": dict(),
    "gatedfwa-shift-outgate-qknorm": dict(token_shift=True, output_gate=True, qk_norm=True),
    "swa-gatedfwa-shift": dict(attention_kinds=["swa", "gatedfwa"], token_shift=True),
    "nsa-gatedfwa": dict(attention_kinds=["nsa-gatedfwa", "gatedfwa"], output_gate=True,
                         nsa_block_size=4, nsa_block_counts=2),
}


def adapted(overrides: dict, target_modules="all-linear"):
    """A tiny model (weights of std 1/sqrt(fan_in)) with a rank-4 LoRA on ``target_modules``
    whose both factors start random, so that the adapter changes the output from the start
    and both factors get gradients."""
    model = sharpened(GatedFWAForCausalLM(tiny_config(**overrides)))
    config = LoraConfig(task_type="CAUSAL_LM", target_modules=target_modules, r=4, lora_alpha=8,
                        init_lora_weights=False)
    return get_peft_model(model, config)


def adapter_parameters(peft_model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in peft_model.named_parameters() if "lora_" in name}


def decoded_logits(model, ids, prompt_len: int) -> torch.Tensor:
    """Logits of a prefill of prompt_len tokens (use_cache=True) then one token at a time."""
    out = model(ids[:, :prompt_len], use_cache=True)
    cache = output_cache(out)
    steps = [out.logits] + [model(ids[:, t:t + 1], cache=cache).logits for t in range(prompt_len, ids.shape[1])]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_lora_on_every_linear_trains(overrides):
    peft_model = adapted(overrides).train()
    adapters = adapter_parameters(peft_model)
    ids = torch.randint(0, 61, (2, 14))
    with torch.no_grad():
        before = peft_model(ids).logits
    peft_model(ids, labels=ids).loss.backward()
    without_gradient = [name for name, p in adapters.items() if p.grad is None or not p.grad.abs().max() > 0]
    assert not without_gradient
    wrapped = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in adapters}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "decay_gate_proj", "gate_proj", "up_proj", "down_proj"} <= wrapped
    with torch.no_grad():
        for p in adapters.values():
            p -= 0.1 * p.grad
        after = peft_model(ids).logits
    assert (after - before).abs().max() > 1e-3


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_decoding_with_the_adapter_equals_the_parallel_forward_and_merging_changes_nothing(overrides):
    peft_model = adapted(overrides).eval()
    ids = torch.randint(0, 61, (2, 13))
    with torch.no_grad():
        parallel = peft_model(ids).logits
        with peft_model.disable_adapter():
            base = peft_model(ids).logits
        decoded = decoded_logits(peft_model, ids, 5)
        merged = peft_model.merge_and_unload()(ids).logits
    assert (parallel - base).abs().max() > 0.1  # the adapter matters
    torch.testing.assert_close(decoded, parallel, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged, parallel, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target", ["q_proj", "decay_gate_proj"])
def test_adapter_on_one_attention_projection_takes_effect(target):
    """The projections that run fused for plain modules: an adapter on either alone changes
    the parallel forward (as it does decoding) and its factors get gradients."""
    peft_model = adapted(dict(token_shift=True), target_modules=[target])
    ids = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        with peft_model.disable_adapter():
            base = peft_model(ids).logits
        adapted_logits = peft_model(ids).logits
        decoded = decoded_logits(peft_model, ids, 4)
    assert (adapted_logits - base).abs().max() > 1e-2
    torch.testing.assert_close(decoded, adapted_logits, rtol=1e-4, atol=1e-4)
    peft_model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in adapter_parameters(peft_model).values())


def test_gate_proj_targets_only_the_mlp():
    peft_model = adapted(dict(), target_modules=["gate_proj"])
    targeted = peft_model.base_model.targeted_module_names
    assert len(targeted) == 2 and all(name.endswith("mlp.gate_proj") for name in targeted)


def test_default_targets_without_target_modules():
    model = GatedFWAForCausalLM(tiny_config(attention_kinds=["swa", "gatedfwa"]))
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM"))
    targeted = sorted(peft_model.base_model.targeted_module_names)
    assert targeted == sorted(f"model.layers.{i}.attn.{name}" for i in range(2) for name in ("q_proj", "v_proj"))
