"""The NSA kinds in the model: forward/backward alone and mixed with other kinds, decoding
step by step equal to the parallel forward, generate(), save/load, config checks."""

import pytest
import torch

from gatedfwa.layers import GatedFWAttention, NSAttention
from gatedfwa.models import GatedFWAConfig, GatedFWAForCausalLM
from gatedfwa.ops.decode import WindowLayerCache
from gatedfwa.ops import use_backend
from gatedfwa.ops.nsa import NSALayerCache
from gatedfwa.testing import output_cache
from tests.models.test_generation import sharpened
from tests.models.test_model import tiny_config

NSA_FIELDS = dict(nsa_block_size=4, nsa_block_counts=2)
KINDS = ["nsa", "nsa-gatedfwa", ["nsa-gatedfwa", "full"], ["swa", "nsa"]]


def parallel_and_decoded_logits(model, ids, prompt_len):
    """(logits of one parallel pass, logits of a prefill of prompt_len tokens then one token
    at a time, the cache): both [B, T, vocab]."""
    with torch.no_grad():
        parallel = model(ids).logits
        out = model(ids[:, :prompt_len], use_cache=True)
        cache = output_cache(out)
        steps = [out.logits] + [model(ids[:, t:t + 1], cache=cache).logits for t in range(prompt_len, ids.shape[1])]
    return parallel, torch.cat(steps, dim=1), cache


@pytest.mark.parametrize("kinds", KINDS, ids=str)
def test_forward_backward_each_nsa_kind_and_mixes(kinds):
    model = GatedFWAForCausalLM(tiny_config(attention_kinds=kinds, token_shift=True, qk_norm=True, **NSA_FIELDS))
    ids = torch.randint(0, 61, (2, 19))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    for i, kind in enumerate(model.config.layer_kinds):
        attn = model.model.layers[i].attn
        assert isinstance(attn, NSAttention) == kind.startswith("nsa")
        assert isinstance(attn, GatedFWAttention)
        if kind.startswith("nsa"):
            assert attn.use_gate == (kind == "nsa-gatedfwa")
            assert (attn.window_size, attn.block_size, attn.block_counts) == (4, 4, 2)
            assert attn.branch_gate_proj.weight.shape == (3 * 4, 32)
        assert all(p.grad is not None for p in attn.parameters())


@pytest.mark.parametrize("kinds", KINDS, ids=str)
def test_step_by_step_logits_equal_parallel_forward(kinds):
    model = sharpened(GatedFWAForCausalLM(tiny_config(attention_kinds=kinds, token_shift=True, **NSA_FIELDS)))
    ids = torch.randint(0, 61, (2, 27))  # > 6 blocks of 4: selection has choices
    parallel, decoded, cache = parallel_and_decoded_logits(model, ids, 6)
    for i, kind in enumerate(model.config.layer_kinds):
        assert isinstance(cache[i], NSALayerCache if kind.startswith("nsa") else WindowLayerCache)
    assert parallel.abs().max() > 1.0
    torch.testing.assert_close(decoded, parallel, rtol=1e-4, atol=1e-4)


def test_generate_matches_greedy_loop_and_batched_rows_alone():
    model = sharpened(GatedFWAForCausalLM(tiny_config(attention_kinds=["nsa-gatedfwa", "nsa"], **NSA_FIELDS)))
    prompts = [torch.randint(1, 61, (n,)) for n in (3, 9)]
    with torch.no_grad():
        generated = model.generate(prompts[1][None], max_new_tokens=12, do_sample=False, pad_token_id=0)
        sequence = prompts[1][None]
        for _ in range(12):
            sequence = torch.cat([sequence, model(sequence).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(generated, sequence)
        ids = torch.zeros(2, 9, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prompts):
            ids[b, 9 - len(p):], mask[b, 9 - len(p):] = p, 1
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        for b, p in enumerate(prompts):
            alone = model.generate(p[None], max_new_tokens=12, do_sample=False, pad_token_id=0)
            assert torch.equal(batched[b, 9:], alone[0, len(p):]), b


def test_cache_memory_grows_by_the_kept_keys_per_token():
    """Per NSA layer and token: 2 H D kept values (float32 here) plus the summaries' share;
    the window part stays at w slots."""
    model = sharpened(GatedFWAForCausalLM(tiny_config(attention_kinds="nsa", num_hidden_layers=1, **NSA_FIELDS)))
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.randint(1, 61, (1, 5)), cache=cache)
        for _ in range(300):  # past the kept store's first 256 slots: it grows
            model(torch.randint(1, 61, (1, 1)), cache=cache)
    layer = cache[0]
    assert layer.window.capacity == 4
    assert layer.kept.seen_tokens == 305 and layer.kept.capacity >= 305
    assert layer.num_summaries == 305 // 4 and layer.key_summaries.shape[2] >= 305 // 4


def test_config_round_trip_and_checks(tmp_path):
    config = tiny_config(attention_kinds=["nsa-gatedfwa", "gatedfwa"], nsa_block_size=8, nsa_block_counts=3)
    model = GatedFWAForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    loaded = GatedFWAForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.layer_kinds == ["nsa-gatedfwa", "gatedfwa"]
    assert (loaded.config.nsa_block_size, loaded.config.nsa_block_counts) == (8, 3)
    ids = torch.randint(0, 61, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    for field in ("nsa_block_size", "nsa_block_counts"):
        with pytest.raises(ValueError, match=field):
            tiny_config(attention_kinds="nsa", **{field: 0})
    with pytest.raises(ValueError, match="window_size"):
        GatedFWAConfig(window_size=None, attention_kinds="nsa-gatedfwa")


@pytest.mark.parametrize("preset", ["cpu", "tiny", "gpu-20m", "gpu-125m"])
def test_every_training_preset_accepts_the_nsa_kinds(preset):
    """`gatedfwa train --preset P --attention nsa-gatedfwa`: the run's config validates and
    builds the model config (the model itself is built only for the small presets)."""
    from gatedfwa.train.config import TrainConfig
    from gatedfwa.train.presets import get_preset

    for kind in ("nsa", "nsa-gatedfwa"):
        run = TrainConfig.from_dict({**get_preset(preset), "attention": kind}, preset)
        run.validate()
        config = GatedFWAConfig(**run.model_fields(vocab_size=256))
        assert config.layer_kinds == [kind] * config.num_hidden_layers
    if preset == "tiny":
        assert isinstance(GatedFWAForCausalLM(config).model.layers[0].attn, NSAttention)


def test_triton_backend_decoding_equals_parallel(device):
    """The parallel path through the NSA Triton kernels (under the interpreter on CPU), the
    decode steps through the window decode kernel and the PyTorch NSA step: the path a GPU takes."""
    pytest.importorskip("triton")
    model = sharpened(GatedFWAForCausalLM(tiny_config(attention_kinds=["nsa-gatedfwa", "nsa"], **NSA_FIELDS)))
    model = model.to(device)
    with use_backend("triton"):
        parallel, decoded, _ = parallel_and_decoded_logits(model, torch.randint(0, 61, (2, 15), device=device), 6)
    torch.testing.assert_close(decoded, parallel, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the compiled kernels")
def test_gpu_decoding_equals_parallel_and_bf16_generate():
    config = tiny_config(attention_kinds=["nsa-gatedfwa", "nsa", "gatedfwa"], num_hidden_layers=3, hidden_size=128,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=32, window_size=32,
                         nsa_block_size=16, nsa_block_counts=4, token_shift=True)
    model = sharpened(GatedFWAForCausalLM(config)).cuda()
    ids = torch.randint(0, 61, (2, 300), device="cuda")
    parallel, decoded, _ = parallel_and_decoded_logits(model, ids, 200)
    torch.testing.assert_close(decoded, parallel, rtol=2e-3, atol=2e-3)
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        # An explicit mask: without one, generate() reads every token equal to pad_token_id as
        # padding, and random ids contain it mid-sequence.
        prompt = ids[:, :100]
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=64,
                                   do_sample=False, pad_token_id=0)
    assert generated.shape == (2, 164)
