"""GatedFWAttention and NSAttention with each registered gate (``gate=``): parameter shapes
and initial bias, the parallel forward and every gradient against the independent float64
re-implementation (tests/layers/reference.py writes each gate's formula out), and decoding
with the window cache equal to the parallel forward."""

import pytest
import torch

from gatedfwa import WindowLayerCache
from gatedfwa.layers import GatedFWAttention, NSAttention, gate_bias_init
from gatedfwa.ops import use_backend
from gatedfwa.ops.gate import GATES
from gatedfwa.testing import assert_within_rule, float32_slack
from tests.layers.reference import LITERAL_GATES, reference_attention_layer
from tests.layers.test_attention import randomize_
from tests.layers.test_decoding import decode_in_steps

GATE_NAMES = list(GATES)


def test_every_registered_gate_has_a_literal_reference():
    assert set(LITERAL_GATES) == set(GATES)


@pytest.mark.parametrize("gate, width", [("sharpened", 2), ("forgetting", 1)])
def test_parameters_follow_the_gate(gate, width):
    """decay_gate_proj has the gate's inputs per head times HQ rows; the names and the
    default gate's shapes are those of every checkpoint so far."""
    layer = GatedFWAttention(24, 4, 2, 8, window_size=5, gate=gate, gate_init_range=(0.9, 0.99))
    assert layer.decay_gate_proj.weight.shape == (width * 4, 24)
    assert layer.gate_width == width * 4
    torch.testing.assert_close(layer.decay_gate_bias.detach(), gate_bias_init(4, (0.9, 0.99)))
    assert f"gate={gate}" in repr(layer)
    assert "gate=None" in repr(GatedFWAttention(24, 4, window_size=5, use_gate=False, gate=gate))


def test_unknown_gate_is_named():
    with pytest.raises(ValueError, match="unknown gate 'logsigmoid'; registered gates are 'sharpened'"):
        GatedFWAttention(24, 4, window_size=5, gate="logsigmoid")


@pytest.mark.parametrize("gate", GATE_NAMES)
@pytest.mark.parametrize("window", [5, None], ids=["w5", "forgetting-attention"])
def test_parallel_forward_matches_reference(gate, window):
    layer = randomize_(GatedFWAttention(24, 4, 2, 8, window_size=window, token_shift=True, qk_norm=True, gate=gate))
    x = torch.randn(2, 29, 24)
    with torch.no_grad():
        out = layer(x)
    assert_within_rule("layer output", out, reference_attention_layer(layer, x, dtype=torch.float32),
                       reference_attention_layer(layer, x, dtype=torch.float64))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_input_gate_gradients_match_reference(backend, device):
    """Output and every gradient with gate="forgetting", within the rule of the reference.
    On Triton the layer runs q and the one-row-per-head gate projection as one GEMM and the
    fused gate + attention op (the interpreter on a CPU)."""
    layer = randomize_(GatedFWAttention(24, 4, 2, 8, window_size=6, token_shift=True, gate="forgetting")).to(device)
    x = torch.randn(2, 21, 24, device=device)
    do = torch.randn(2, 21, 24, dtype=torch.float64, device=device)

    def gradients(forward):
        layer.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        out = forward(xx)
        out.backward(do.to(out.dtype))
        return {"output": out.detach(), "dx": xx.grad.clone(),
                **{name: p.grad.clone() for name, p in layer.named_parameters()}}

    with use_backend(backend):
        fast = gradients(layer)
    naive = gradients(lambda xx: reference_attention_layer(layer, xx, dtype=torch.float32, differentiable=True))
    ref = gradients(lambda xx: reference_attention_layer(layer, xx, dtype=torch.float64, differentiable=True))
    assert ref["decay_gate_proj.weight"].shape == (4, 24)
    for name in ref:
        # As tests/layers/test_attention.py: ten times the float32 slack through the kernels' dg.
        through_gate = backend == "triton" and name in ("dx", "decay_gate_proj.weight", "decay_gate_bias")
        atol = float32_slack(ref[name], torch.float32) * (10 if through_gate else 1)
        assert_within_rule(name, fast[name], naive[name], ref[name], atol=atol)


@pytest.mark.parametrize("window", [4, None], ids=["w4", "forgetting-attention"])
def test_one_input_gate_decoding_equals_parallel(window):
    """Prefill then steps of 1, 3 and 2 tokens through the cache, gate="forgetting": every
    position within the rule of the float64 reference, as the parallel forward."""
    layer = randomize_(GatedFWAttention(16, 4, 2, 8, window_size=window, token_shift=True, output_gate=True,
                                        gate="forgetting"))
    x = torch.randn(2, 3 * 4 + 5, 16)
    with torch.no_grad():
        decoded = decode_in_steps(layer, x, 6, [1, 3, 2], WindowLayerCache(window))
        parallel = layer(x)
    ref64 = reference_attention_layer(layer, x, dtype=torch.float64)
    naive32 = reference_attention_layer(layer, x, dtype=torch.float32)
    assert_within_rule("decoded", decoded, naive32, ref64)
    assert_within_rule("parallel", parallel, naive32, ref64)


def test_nsa_layer_takes_the_gate():
    """The "nsa-gatedfwa" layer's sliding branch with gate="forgetting"."""
    layer = randomize_(NSAttention(16, 4, 2, 8, window_size=4, block_size=4, block_counts=2, gate="forgetting"))
    assert layer.decay_gate_proj.weight.shape == (4, 16)
    x = torch.randn(2, 19, 16)
    with torch.no_grad():
        out = layer(x)
    assert_within_rule("out", out, reference_attention_layer(layer, x, dtype=torch.float32),
                       reference_attention_layer(layer, x, dtype=torch.float64))
