"""GatedFWAttention's parallel forward against an independent float64 re-implementation
(the rule of docs/correctness.md), padding and packing, initialisation and argument errors."""

import math

import pytest
import torch

from gatedfwa.layers import GatedFWAttention, gate_bias_init
from gatedfwa.ops import use_backend
from gatedfwa.testing import assert_within_rule, float32_slack
from tests.layers.reference import reference_attention_layer


def randomize_(layer: GatedFWAttention) -> GatedFWAttention:
    """Weights large enough that attention is far from uniform and gates vary per token."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name == "decay_gate_bias":
                p.copy_(torch.randn_like(p) * 2.0)
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
    return layer


LAYER_CASES = [
    # (heads, kv_heads, head_dim, window, gate, token_shift, qk_norm, output_gate)
    (4, 4, 16, 5, True, False, False, False),
    (4, 2, 12, 7, True, True, True, True),
    (6, 2, 10, 1, True, False, False, True),
    (4, 1, 16, 9, False, True, False, False),   # plain SWA (gate off), MQA
    (2, 2, 16, None, True, False, True, False),  # forgetting attention
    (2, 1, 8, None, False, False, False, False),  # full causal
    (4, 2, 16, 100, True, True, False, False),   # window longer than the sequence
]


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: "-".join(str(x) for x in c))
def test_parallel_forward_matches_reference(case):
    heads, kv_heads, head_dim, window, gate, shift, qk_norm, out_gate = case
    layer = randomize_(GatedFWAttention(
        hidden_size=24, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, window_size=window,
        use_gate=gate, token_shift=shift, qk_norm=qk_norm, output_gate=out_gate, rope_theta=500.0,
    ))
    x = torch.randn(2, 37, 24)
    out = layer(x)
    ref64 = reference_attention_layer(layer, x, dtype=torch.float64)
    naive32 = reference_attention_layer(layer, x, dtype=torch.float32)
    assert_within_rule("layer output", out, naive32, ref64)


def test_gradients_reach_every_parameter():
    layer = randomize_(GatedFWAttention(24, 4, 2, 8, window_size=5, token_shift=True, qk_norm=True, output_gate=True))
    x = torch.randn(2, 13, 24, requires_grad=True)
    layer(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_left_padding_and_holes_equal_unpadded_rows():
    """attention_mask drops padding exactly: each row's real tokens give what they give alone
    (positions counted among real tokens); padding rows of the output are zero."""
    layer = randomize_(GatedFWAttention(16, 4, 2, 8, window_size=4, token_shift=True))
    rows = [torch.randn(1, n, 16) for n in (9, 5, 12)]
    masks = [
        torch.tensor([0, 0, 0] + [1] * 9),            # left padding
        torch.tensor([0] * 7 + [1] * 5),
        torch.tensor([1] * 12),
    ]
    x = torch.randn(3, 12, 16)
    for b, (row, mask) in enumerate(zip(rows, masks)):
        x[b, mask.bool()] = row[0]
    mask = torch.stack(masks)
    out = layer(x, attention_mask=mask)
    for b, row in enumerate(rows):
        alone = layer(row)[0]
        torch.testing.assert_close(out[b, mask[b].bool()], alone, rtol=1e-5, atol=1e-6)
        assert (out[b, ~mask[b].bool()] == 0).all()
    # A hole in the middle: the tokens around it become neighbours.
    hole = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1]])
    out = layer(x[2:3], attention_mask=hole)
    alone = layer(x[2:3, hole[0].bool()])
    torch.testing.assert_close(out[0, hole[0].bool()], alone[0], rtol=1e-5, atol=1e-6)


def test_cu_seqlens_packing_equals_separate_sequences():
    layer = randomize_(GatedFWAttention(16, 2, 2, 8, window_size=3, token_shift=True, qk_norm=True))
    lengths = [4, 0, 7, 1]
    seqs = [torch.randn(1, n, 16) for n in lengths]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    out = layer(torch.cat(seqs, dim=1), cu_seqlens=cu)
    for i, s in enumerate(seqs):
        if lengths[i]:
            torch.testing.assert_close(out[:, cu[i]:cu[i + 1]], layer(s), rtol=1e-5, atol=1e-6)


def test_gate_bias_init_spreads_retention_over_heads():
    bias = gate_bias_init(8)
    retention = torch.sigmoid(bias.double())
    torch.testing.assert_close(retention[0].item(), 0.99, rtol=0, atol=1e-6)
    torch.testing.assert_close(retention[-1].item(), 0.999, rtol=0, atol=1e-6)
    assert (retention.diff() > 0).all()
    decay = 1 - retention
    ratios = decay[1:] / decay[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, ratios[0].item()), rtol=1e-4, atol=0)  # geometric
    layer = GatedFWAttention(16, 8, window_size=4)
    torch.testing.assert_close(layer.decay_gate_bias.detach(), bias)
    one = torch.sigmoid(gate_bias_init(1, (0.9, 0.999))).item()
    assert 0.9 < one < 0.999
    with pytest.raises(ValueError, match="gate_init_range"):
        gate_bias_init(4, (0.5, 1.0))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_size=16, num_heads=3, num_kv_heads=2, head_dim=8), "num_heads"),
        (dict(hidden_size=16, num_heads=3), "hidden_size"),
        (dict(hidden_size=16, num_heads=2, head_dim=7), "head_dim"),
        (dict(hidden_size=16, num_heads=2, window_size=0), "window_size"),
        (dict(hidden_size=16, num_heads=2, window_size=2.5), "window_size"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GatedFWAttention(**kwargs)


def test_mask_and_cu_seqlens_together_rejected():
    layer = GatedFWAttention(16, 2, window_size=4)
    with pytest.raises(ValueError, match="attention_mask"):
        layer(torch.randn(1, 4, 16), attention_mask=torch.ones(1, 4), cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))



@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradients_match_reference(backend, device):
    """Output and every gradient (x, q_proj and decay_gate_proj, whose weights run as one
    GEMM, decay_gate_bias, ...) within the rule of the independent reference (float32 naive,
    float64 reference). The triton case runs the fused gate + attention op (the interpreter on a
    CPU), which reads gate_pre as a column slice of the q and gate GEMM's output."""
    layer = randomize_(GatedFWAttention(24, 4, 2, 8, window_size=6, token_shift=True, qk_norm=True)).to(device)
    x = torch.randn(2, 21, 24, device=device)
    do = torch.randn(2, 21, 24, dtype=torch.float64, device=device)

    def gradients(forward, dtype):
        layer.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        out = forward(xx, dtype)
        out.backward(do.to(out.dtype))
        grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
        return {"output": out.detach(), "dx": xx.grad.clone(), **grads}

    with use_backend(backend):
        fast = gradients(lambda xx, dtype: layer(xx), torch.float32)
    naive = gradients(lambda xx, dtype: reference_attention_layer(layer, xx, dtype=dtype, differentiable=True),
                      torch.float32)
    ref = gradients(lambda xx, dtype: reference_attention_layer(layer, xx, dtype=dtype, differentiable=True),
                    torch.float64)
    assert "decay_gate_proj.weight" in ref and "decay_gate_bias" in ref
    for name in ref:
        # float32 slack as in tests/ops/window_attention/test_fused_gate.py: ten times it for the
        # gradients that flow through the kernels' dg (sums of float32 row and column sums of dS).
        through_gate = backend == "triton" and name in ("dx", "decay_gate_proj.weight", "decay_gate_bias")
        atol = float32_slack(ref[name], torch.float32) * (10 if through_gate else 1)
        assert_within_rule(name, fast[name], naive[name], ref[name], atol=atol)
