"""Compiled decoding through the model with the static cache (StaticWindowCache): the step
compiles whole (fullgraph) and does not recompile as the position advances, its logits equal
the parallel forward for mixed layer kinds; chunked prefill equals the parallel forward;
generate() takes the cache (cache_implementation="static", or passed in) and gives what the
growing cache gives."""

import os
import shutil

import pytest
import torch

from gatedfwa import StaticWindowCache
from gatedfwa.models import GatedFWAForCausalLM
from gatedfwa.ops import use_backend
from tests.conftest import DEVICE
from tests.models.test_generation import sharpened
from tests.models.test_model import tiny_config

KINDS = [
    dict(),
    dict(num_key_value_heads=4, token_shift=True, output_gate=True),
    dict(attention_kinds=["full", "swa"], token_shift=True),  # a bounded static cache for "full"
]


def assert_compiled_steps_equal_parallel_forward(overrides, length, **compile_options):
    """Prefill 5 tokens, then step token by token through torch.compile(model, fullgraph=True,
    **compile_options) on the static cache: the logits equal the parallel forward's, and
    advancing the position never recompiles."""
    torch._dynamo.reset()
    model = sharpened(GatedFWAForCausalLM(tiny_config(**overrides)))
    ids = torch.randint(0, 61, (2, length))
    with torch.no_grad():
        parallel = model(ids).logits
        cache = model.new_static_cache(max_length=length)
        steps = [model(ids[:, :5], cache=cache).logits]
        step = torch.compile(model, fullgraph=True, **compile_options)
        steps.append(step(ids[:, 5:6], cache=cache).logits.clone())
        with torch._dynamo.config.patch(error_on_recompile=True):
            for t in range(6, length):
                steps.append(step(ids[:, t:t + 1], cache=cache).logits.clone())
    assert parallel.abs().max() > 1.0
    torch.testing.assert_close(torch.cat(steps, dim=1), parallel, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides", KINDS, ids=["gatedfwa", "shift-outgate", "full-swa"])
def test_compiled_static_steps_equal_parallel_forward(overrides):
    assert_compiled_steps_equal_parallel_forward(overrides, 20, backend="aot_eager")


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="Inductor on the CPU needs a C++ compiler")
@pytest.mark.skipif(DEVICE != "cpu",
                    reason="the CPU counterpart (interpreted kernels) of the CUDA-graph tests below")
@pytest.mark.parametrize("overrides", [KINDS[0], KINDS[2]], ids=["gatedfwa", "full-swa"])
def test_inductor_static_steps_through_the_kernels(overrides):
    """The decode custom ops (Triton kernels, interpreted here) inside an Inductor graph, as on a
    GPU: gated layers mutate the cache's decays, ungated ones have none to mutate."""
    with use_backend("triton"):
        assert_compiled_steps_equal_parallel_forward(overrides, 9)


@pytest.mark.parametrize("overrides", KINDS[1:], ids=["shift-outgate", "full-swa"])
def test_chunked_prefill_equals_parallel_forward(overrides):
    model = sharpened(GatedFWAForCausalLM(tiny_config(**overrides)))
    ids = torch.randint(0, 61, (1, 150))
    with torch.no_grad():
        parallel = model(ids).logits
        # Chunks of 70 (> MAX_DECODE_LENGTH: the parallel op against the cached window)
        # and a last one of 10 (> the window of 4).
        cache = model.new_static_cache(max_length=160, prefill_chunk_size=70)
        chunked = model(ids[:, :150], cache=cache).logits
        assert cache.get_seq_length() == 150
        assert all(layer.keys.shape[2] in (4, 160) for layer in cache)
        following = model(ids[:, :1], cache=cache).logits  # decoding continues after the chunks
    torch.testing.assert_close(chunked, parallel, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(following).all()


def test_chunked_prefill_refuses_padding():
    model = sharpened(GatedFWAForCausalLM(tiny_config()))
    ids = torch.randint(1, 61, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="without padding"):
        model(ids, attention_mask=mask, cache=model.new_static_cache(16, prefill_chunk_size=5))


@pytest.mark.parametrize("how", ["cache_implementation", "passed_in"])
def test_generate_with_static_cache_equals_growing_cache(how):
    model = sharpened(GatedFWAForCausalLM(tiny_config(token_shift=True, attention_kinds=["gatedfwa", "full"])))
    prompt = torch.randint(1, 61, (2, 6))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # left padding
    settings = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0, attention_mask=mask)
    with torch.no_grad():
        expected = model.generate(prompt, **settings)
        if how == "cache_implementation":
            result = model.generate(prompt, cache_implementation="static", return_dict_in_generate=True, **settings)
        else:
            cache = model.new_static_cache(max_length=6 + 12)
            result = model.generate(prompt, cache=cache, return_dict_in_generate=True, **settings)
    returned = getattr(result, "cache", None) or getattr(result, "past_key_values", None)
    assert isinstance(returned, StaticWindowCache)
    assert torch.equal(result.sequences, expected)


def test_beam_search_reorders_the_static_cache_in_place():
    model = sharpened(GatedFWAForCausalLM(tiny_config(token_shift=True, attention_kinds=["gatedfwa", "full"])))
    prompt = torch.randint(1, 61, (2, 6))
    settings = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0, num_beams=3)
    with torch.no_grad():
        expected = model.generate(prompt, **settings)
        got = model.generate(prompt, cache_implementation="static", **settings)
    assert torch.equal(got, expected)


def test_static_cache_refuses_nsa_layers():
    model = GatedFWAForCausalLM(tiny_config(attention_kinds=["nsa", "gatedfwa"]))
    with pytest.raises(ValueError, match="NSA"):
        model.new_static_cache(32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: CUDA graphs")
def test_generate_compiles_and_matches_eager_on_gpu():
    """On a GPU generate() compiles the forward around the static cache (mode
    reduce-overhead: CUDA graphs); the greedy tokens equal those of the uncompiled run."""
    torch._dynamo.reset()
    model = sharpened(GatedFWAForCausalLM(tiny_config(attention_kinds=["gatedfwa", "full"]))).cuda()
    prompt = torch.randint(1, 61, (2, 9), device="cuda")
    settings = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        eager = model.generate(prompt, cache=model.new_static_cache(40), disable_compile=True, **settings)
        compiled = model.generate(prompt, cache_implementation="static", **settings)
    assert torch.equal(compiled, eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: CUDA graphs")
@pytest.mark.parametrize("overrides", KINDS, ids=["gatedfwa", "shift-outgate", "full-swa"])
def test_cuda_graph_steps_equal_parallel_forward(overrides):
    """Each token through the step compiled with mode="reduce-overhead" (one CUDA graph
    replay per token, Triton kernels inside) gives the parallel forward's logits."""
    torch._dynamo.reset()
    model = sharpened(GatedFWAForCausalLM(tiny_config(**overrides))).cuda()
    ids = torch.randint(0, 61, (2, 30), device="cuda")
    with torch.no_grad():
        parallel = model(ids).logits
        cache = model.new_static_cache(max_length=ids.shape[1])
        steps = [model(ids[:, :5], cache=cache).logits]
        step = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        for t in range(5, ids.shape[1]):
            torch.compiler.cudagraph_mark_step_begin()
            steps.append(step(ids[:, t:t + 1], cache=cache).logits.clone())
    torch.testing.assert_close(torch.cat(steps, dim=1), parallel, rtol=1e-3, atol=1e-3)
