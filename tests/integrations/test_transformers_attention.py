"""attn_implementation="gatedfwa" in transformers models against attn_implementation="sdpa".

For every family (tests/integrations/tiny_models.py) and batch layout (rows, padding,
packing), the logits at real tokens and the gradients of every parameter follow the rule of
gatedfwa/testing.py: error against an sdpa run in float64 at most twice the error of the sdpa
run in the same precision (+ slack); Gemma 2, which has no sdpa, is compared with "eager".
On the CPU the op takes its PyTorch path; the tests marked gpu run the Triton kernels. Decoding steps, which fall back to SDPA, are checked
through generate(); unsupported features must raise.
"""

from __future__ import annotations

import os

import pytest
import torch

import gatedfwa  # noqa: F401  (registers attn_implementation="gatedfwa")
from gatedfwa.integrations import transformers_attention
from gatedfwa.integrations.transformers_masks import UnsupportedMaskError
from gatedfwa.ops import use_backend
from gatedfwa.testing import assert_within_rule, float32_slack
from tests.integrations.tiny_models import FAMILIES, WINDOW, build, family_config, reference_implementation

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the Triton kernels)")


def make_batch(layout: str, vocab: int, device, long: bool = False) -> dict:
    """Model inputs and the [B, T] mask of real tokens for one batch layout.

    rows: 2 full rows. padded: left padding, right padding and a full row.
    packed: one row holding 3 sequences (position_ids restart at 0), as
    DataCollatorWithFlattening lays out a batch, with and without cu_seq_lens_q/k.
    ``long`` multiplies the lengths by 20 (GPU runs: several kernel tiles per sequence).
    """
    scale = 20 if long else 1
    if layout == "rows":
        ids = torch.randint(0, vocab, (2, 13 * scale))
        inputs = dict(input_ids=ids)
        real = torch.ones_like(ids, dtype=torch.bool)
    elif layout == "padded":
        seqlen = 13 * scale
        ids = torch.randint(0, vocab, (3, seqlen))
        mask = torch.ones(3, seqlen, dtype=torch.long)
        mask[0, : 4 * scale] = 0
        mask[1, seqlen - 3 * scale:] = 0
        inputs = dict(input_ids=ids, attention_mask=mask)
        real = mask.bool()
    elif layout in ("packed", "packed-cu"):
        lengths = [7 * scale, 4 * scale, 9 * scale]
        ids = torch.randint(0, vocab, (1, sum(lengths)))
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        inputs = dict(input_ids=ids, position_ids=positions)
        if layout == "packed-cu":
            cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
            inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
        real = torch.ones_like(ids, dtype=torch.bool)
    else:
        raise ValueError(layout)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}, real.to(device)


def logits_and_gradients(model, inputs: dict, real: torch.Tensor, weights: torch.Tensor):
    """Logits at the real tokens, and every parameter's gradient of sum(logits * weights)
    over the real tokens (padding positions carry no meaning under either implementation)."""
    model.zero_grad(set_to_none=True)
    logits = model(**inputs, use_cache=False).logits
    (logits[real].double() * weights).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits[real].detach(), grads


def check_against_sdpa(family: str, layout: str, dtype: torch.dtype, device: str, size: str = "cpu") -> None:
    config = family_config(family, size)
    reference = reference_implementation(family)
    ref_model = build(config, reference, dtype=torch.float64, device=device)
    state = ref_model.state_dict()
    inputs, real = make_batch(layout, config.vocab_size, device, long=size == "gpu")
    weights = torch.randn(int(real.sum()), config.vocab_size, dtype=torch.float64, device=device)

    ref_logits, ref_grads = logits_and_gradients(ref_model, inputs, real, weights)
    low_model = build(config, reference, state, dtype, device)
    sdpa_logits, sdpa_grads = logits_and_gradients(low_model, inputs, real, weights)
    ours = build(config, "gatedfwa", state, dtype, device)
    logits, grads = logits_and_gradients(ours, inputs, real, weights)

    assert set(grads) == set(ref_grads) and len(grads) > 0
    assert_within_rule("logits", logits, sdpa_logits, ref_logits, atol=float32_slack(ref_logits, dtype))
    names = sorted(ref_grads)
    fast, low, ref = (scaled_gradient(g, ref_grads, names) for g in (grads, sdpa_grads, ref_grads))
    assert_within_rule("parameter gradients", fast, low, ref, atol=1e-5)


def scaled_gradient(grads: dict, ref_grads: dict, names: list[str]) -> torch.Tensor:
    """All parameter gradients as one vector, each tensor divided by the largest magnitude
    of its float64 reference: every tensor counts on the same scale, and the rule's maximum
    runs over the whole gradient. (Per tensor, in bf16, the ratio of two max errors of
    equally accurate runs of a whole model exceeds 2 now and then by chance.)"""
    return torch.cat([(grads[n].double() / ref_grads[n].abs().max().clamp(min=1e-30)).reshape(-1) for n in names])


@pytest.mark.parametrize("layout", ["rows", "padded", "packed", "packed-cu"])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_sdpa_cpu(family, layout):
    check_against_sdpa(family, layout, torch.float32, "cpu")


def test_layers_run_through_the_op(monkeypatch):
    """Every layer of a mixed full/sliding model goes through gated_window_attention with the
    window of its kind: a test that the comparisons above are not sdpa against sdpa."""
    calls = []
    real_op = transformers_attention.gated_window_attention

    def spy(q, k, v, **kwargs):
        calls.append((kwargs["window_size"], kwargs.get("cu_seqlens") is not None))
        return real_op(q, k, v, **kwargs)

    monkeypatch.setattr(transformers_attention, "gated_window_attention", spy)
    model = build(family_config("qwen2"), "gatedfwa")
    inputs, _ = make_batch("packed", model.config.vocab_size, "cpu")
    model(**inputs, use_cache=False)
    assert calls == [(None, True), (WINDOW, True)]  # layer 0 full, layer 1 sliding


def test_triton_path(device):
    """The Triton kernels behind the adapter (interpreted on the CPU), one padded batch."""
    with use_backend("triton"):
        check_against_sdpa("mistral", "padded", torch.float32, device)


@pytest.mark.parametrize("cache", [None, "static"])
def test_generate_matches_sdpa(cache):
    """Left-padded greedy generation past the window: prefill through the op (the static
    cache's full layers, whose keys span the whole cache, through SDPA), decoding steps
    through SDPA with sdpa's own masks; same tokens, scores within the rule."""
    config = family_config("gemma3")
    ref_model = build(config, "sdpa", dtype=torch.float64).eval()
    state = ref_model.state_dict()
    ids = torch.randint(0, config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    options = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, output_scores=True,
                   return_dict_in_generate=True, pad_token_id=0, cache_implementation=cache)

    def generate(model):
        out = model.eval().generate(ids, **options)
        return out.sequences, torch.stack(out.scores)

    ref_tokens, ref_scores = generate(ref_model)
    sdpa_tokens, sdpa_scores = generate(build(config, "sdpa", state))
    tokens, scores = generate(build(config, "gatedfwa", state))
    assert torch.equal(tokens, ref_tokens) and torch.equal(sdpa_tokens, ref_tokens)
    assert_within_rule("generation scores", scores, sdpa_scores, ref_scores,
                       atol=float32_slack(ref_scores, torch.float32))


# --------------------------------------------------------------------------------------
# What raises
# --------------------------------------------------------------------------------------


def test_attention_sinks_raise():
    model = build(family_config("gpt-oss"), "gatedfwa")
    with pytest.raises(NotImplementedError, match="attention sinks"):
        model(torch.randint(0, model.config.vocab_size, (1, 8)))


def dropout_config(family: str):
    config = family_config(family)
    config.attention_dropout = 0.1
    return config


# What the config declares raises when the model is built with attn_implementation="gatedfwa"
# or switched to it, naming the feature and the way out.
CONFIG_FEATURES = {
    "gemma2-softcap": (lambda: family_config("gemma2-softcap"), r"soft-capping \(softcap=50.0.*attn_logit_softcapping=None"),
    "gemma2-dropout": (lambda: dropout_config("gemma2"), r"attention dropout \(dropout=0.1\).*attention_dropout=0.0"),
    "mistral-dropout": (lambda: dropout_config("mistral"), r"attention dropout \(dropout=0.1\).*attention_dropout=0.0"),
}


@pytest.mark.parametrize("make_config,message", CONFIG_FEATURES.values(), ids=CONFIG_FEATURES.keys())
def test_config_features_raise_when_the_model_is_built(make_config, message):
    with pytest.raises(NotImplementedError, match=message):
        build(make_config(), "gatedfwa")


@pytest.mark.parametrize("make_config,message", CONFIG_FEATURES.values(), ids=CONFIG_FEATURES.keys())
def test_config_features_raise_when_the_model_is_switched(make_config, message):
    model = build(make_config(), "eager")
    with pytest.raises(NotImplementedError, match=message):
        model.set_attn_implementation("gatedfwa")
    assert model.config._attn_implementation == "eager"  # left as it was
    model(torch.randint(0, model.config.vocab_size, (1, 6)))


def test_attention_dropout_set_after_the_build_raises_in_training():
    """The check at the first forward stays for what changes after the build."""
    model = build(family_config("mistral"), "gatedfwa")
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    model.eval()(ids)  # no dropout at evaluation
    with pytest.raises(NotImplementedError, match="dropout"):
        model.train()(ids)


def test_switching_a_supported_model_to_gatedfwa_works():
    config = family_config("gemma2")
    model = build(config, "eager")
    model.set_attn_implementation("gatedfwa")
    assert model.config._attn_implementation == "gatedfwa"
    model(torch.randint(0, config.vocab_size, (1, 6)))


def test_padding_inside_a_window_raises():
    """A hole of padding inside a row: sdpa's window counts the hole's positions, the op
    counts tokens, so the two would differ; the mask check refuses it."""
    model = build(family_config("mistral"), "gatedfwa")
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    mask = torch.ones_like(ids)
    mask[0, 5:7] = 0
    with pytest.raises(UnsupportedMaskError, match="attention mask"):
        model(ids, attention_mask=mask)


def test_hole_in_full_attention_matches_sdpa():
    """Without a window a hole of padding changes nothing for the real tokens around it."""
    config = family_config("mistral")
    config.sliding_window = None
    ref_model = build(config, "sdpa")
    ids = torch.randint(0, config.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, 5:7] = 0
    ref = ref_model(ids, attention_mask=mask).logits
    ours = build(config, "gatedfwa", ref_model.state_dict())(ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], rtol=1e-4, atol=1e-4)


def test_disagreeing_cu_seq_lens_raise():
    model = build(family_config("mistral"), "gatedfwa")
    inputs, _ = make_batch("packed", model.config.vocab_size, "cpu")
    wrong = torch.tensor([0, 10, 20], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        model(**inputs, cu_seq_lens_q=wrong, cu_seq_lens_k=wrong, use_cache=False)


def test_non_causal_layer_raises():
    model = build(family_config("mistral"), "gatedfwa")
    for layer in model.model.layers:
        layer.self_attn.is_causal = False
    with pytest.raises(NotImplementedError, match="non-causal"):
        model(torch.randint(0, model.config.vocab_size, (1, 8)))


# --------------------------------------------------------------------------------------
# GPU: the Triton kernels
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("layout", ["rows", "padded", "packed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_sdpa_gpu(family, layout, dtype):
    assert os.environ.get("TRITON_INTERPRET") != "1", "GPU tests need the compiled kernels"
    with use_backend("auto"):  # the default choice on CUDA tensors, whatever GATEDFWA_BACKEND says
        check_against_sdpa(family, layout, dtype, "cuda", size="gpu")
