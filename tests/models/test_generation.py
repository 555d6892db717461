"""Decoding with the window cache through the model and generate(): equal to the parallel
forward, memory bounded by the window, batched prompts of different lengths."""

import math

import pytest
import torch

from gatedfwa import WindowCache
from gatedfwa.models import GatedFWAForCausalLM
from gatedfwa.ops import use_backend
from gatedfwa.testing import output_cache
from tests.models.test_model import tiny_config


def sharpened(model: GatedFWAForCausalLM) -> GatedFWAForCausalLM:
    """Weights of std 1/sqrt(fan_in): logits of order 1 and attention far from uniform, so
    that a wrong cache entry shows in the logits."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, 1.0 / math.sqrt(module.in_features))
    return model.eval()


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(num_key_value_heads=4, token_shift=True, output_gate=True),
    dict(num_key_value_heads=1, qk_norm=True, attention_kinds=["swa", "gatedfwa"]),
    dict(attention_kinds=["forgetting", "full"], token_shift=True),
], ids=["gatedfwa-gqa", "mha-shift-outgate", "mqa-qknorm-swa", "windowless"])
def test_step_by_step_logits_equal_parallel_forward(overrides):
    model = sharpened(GatedFWAForCausalLM(tiny_config(**overrides)))
    ids = torch.randint(0, 61, (2, 3 * 4 + 6))  # T > 3w (w = 4)
    with torch.no_grad():
        parallel = model(ids).logits
        out = model(ids[:, :5], use_cache=True)
        cache = output_cache(out)
        steps = [out.logits]
        for t in range(5, ids.shape[1]):
            out = model(ids[:, t:t + 1], cache=cache)
            steps.append(out.logits)
    decoded = torch.cat(steps, dim=1)
    assert parallel.abs().max() > 1.0  # the comparison below is not one of near-zero values
    torch.testing.assert_close(decoded, parallel, rtol=1e-4, atol=1e-4)


def test_cache_memory_stays_bounded_over_ten_windows():
    window = 4
    model = sharpened(GatedFWAForCausalLM(tiny_config(token_shift=True, attention_kinds=["gatedfwa", "swa"])))
    prompt = torch.randint(1, 61, (2, 3))  # 0 is the pad id
    with torch.no_grad():
        result = model.generate(prompt, max_new_tokens=10 * window, min_new_tokens=10 * window, do_sample=False,
                                pad_token_id=0, return_dict_in_generate=True)
    assert result.sequences.shape == (2, 3 + 10 * window)
    returned = getattr(result, "cache", None) or getattr(result, "past_key_values", None)
    assert isinstance(returned, WindowCache)  # generate() decoded with the model's window cache
    assert all(layer.keys.shape == (2, 2, window, 8) for layer in returned)
    assert returned.get_seq_length() == 3 + 10 * window - 1  # the last token is never fed back
    cache = model.new_cache()
    shapes, sizes = None, None
    with torch.no_grad():
        model(prompt, cache=cache)
        for t in range(10 * window):
            model(result.sequences[:, 3 + t:4 + t], cache=cache)
            now = {(i, name): tuple(x.shape) for i, layer in enumerate(cache) for name, x in layer.tensors().items()}
            if shapes is None:
                shapes, sizes = now, cache.memory_bytes()
            assert now == shapes
            assert cache.memory_bytes() == sizes
    assert all(layer.keys.shape == (2, 2, window, 8) for layer in cache)
    assert cache.get_seq_length() == 3 + 10 * window


def test_generate_matches_manual_greedy_loop_without_cache():
    model = sharpened(GatedFWAForCausalLM(tiny_config(token_shift=True, attention_kinds=["gatedfwa", "full"])))
    prompt = torch.randint(1, 61, (1, 7))  # 0 is the pad id
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=15, do_sample=False, pad_token_id=0)
        sequence = prompt
        for _ in range(15):
            next_token = model(sequence).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(generated, sequence)


def test_batched_prompts_of_different_lengths_generate_like_alone():
    model = sharpened(GatedFWAForCausalLM(tiny_config(token_shift=True, output_gate=True,
                                                       attention_kinds=["gatedfwa", "forgetting"])))
    prompts = [torch.randint(1, 61, (n,)) for n in (3, 9, 6)]
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, longest - len(p):] = p
        mask[b, longest - len(p):] = 1
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        for b, p in enumerate(prompts):
            alone = model.generate(p[None], max_new_tokens=12, do_sample=False, pad_token_id=0)
            assert torch.equal(batched[b, longest:], alone[0, len(p):]), b


def test_cache_arguments_are_checked():
    model = GatedFWAForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 61, (1, 4))
    with pytest.raises(TypeError, match="WindowCache"):
        model(ids, cache=object())
    with pytest.raises(ValueError, match="layers"):
        model(ids, cache=WindowCache([4]))
    out = model(ids, use_cache=True)
    cache = output_cache(out)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids[:, :1], cache=cache, attention_mask=torch.tensor([[1, 1, 1, 1, 0]]))
    assert model(ids).logits.shape == (1, 4, 61)  # no cache unless asked for
    assert getattr(model(ids), "cache", None) is None


def test_triton_backend_decoding_equals_parallel(device):
    """The same equivalence through the Triton kernels (attention, gate, decode; under the
    interpreter on CPU): the path a GPU takes."""
    pytest.importorskip("triton")
    model = sharpened(GatedFWAForCausalLM(tiny_config(token_shift=True, attention_kinds=["gatedfwa", "full"])))
    model = model.to(device)
    ids = torch.randint(0, 61, (2, 14), device=device)  # T > 3w
    with torch.no_grad(), use_backend("triton"):
        parallel = model(ids).logits
        out = model(ids[:, :6], use_cache=True)
        cache = output_cache(out)
        steps = [out.logits] + [model(ids[:, t:t + 1], cache=cache).logits for t in range(6, 14)]
    torch.testing.assert_close(torch.cat(steps, dim=1), parallel, rtol=1e-4, atol=1e-4)
