"""GatedFWAttention calls its projection modules, so that what wraps them (forward hooks,
LoRA, a replaced forward) applies in the parallel path as in decoding; plain modules keep
the one fused q + decay gate GEMM, and the fused and the per-module paths agree."""

import pytest
import torch
from torch import nn

from gatedfwa import WindowLayerCache
from gatedfwa.layers import GatedFWAttention, NSAttention
from tests.layers.test_attention import randomize_


def layer_and_input(cls=GatedFWAttention, **kwargs):
    layer = randomize_(cls(24, 4, 2, 6, window_size=5, token_shift=True, output_gate=True, **kwargs))
    return layer, torch.randn(2, 11, 24)


@pytest.fixture
def linear_calls(monkeypatch):
    """The nn.Linear modules whose forward ran (a spy on the class's forward)."""
    calls = []
    original = nn.Linear.forward

    def forward(module, x):
        calls.append(module)
        return original(module, x)

    monkeypatch.setattr(nn.Linear, "forward", forward)
    return calls


def test_plain_projections_run_as_one_gemm(linear_calls):
    layer, x = layer_and_input()
    layer(x)
    called = {id(m) for m in linear_calls}
    assert id(layer.k_proj) in called and id(layer.o_proj) in called
    assert id(layer.q_proj) not in called and id(layer.decay_gate_proj) not in called


@pytest.mark.parametrize("cls", [GatedFWAttention, NSAttention], ids=["gatedfwa", "nsa-gatedfwa"])
@pytest.mark.parametrize("projection", ["q_proj", "decay_gate_proj"])
def test_forward_hook_on_a_fused_projection_runs_and_applies(cls, projection):
    """A hook that doubles the projection's output acts like doubled weights, in the
    parallel forward (where q_proj and decay_gate_proj run fused without hooks) and decoding."""
    extra = dict(block_size=4, block_counts=2) if cls is NSAttention else {}
    layer, x = layer_and_input(cls, **extra)
    doubled = cls(24, 4, 2, 6, window_size=5, token_shift=True, output_gate=True, **extra)
    doubled.load_state_dict(layer.state_dict())
    with torch.no_grad():
        getattr(doubled, projection).weight.mul_(2.0)
    calls = []

    def hook(module, inputs, output):
        calls.append(output.shape)
        return output * 2.0

    getattr(layer, projection).register_forward_hook(hook)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), doubled(x), rtol=1e-5, atol=1e-5)
        assert calls == [(2, 11, getattr(layer, projection).out_features)]
        new_cache = (lambda lay: lay.new_cache()) if cls is NSAttention else (lambda lay: WindowLayerCache(5))
        cache, doubled_cache = new_cache(layer), new_cache(doubled)
        layer(x[:, :6], cache=cache), doubled(x[:, :6], cache=doubled_cache)
        torch.testing.assert_close(layer(x[:, 6:7], cache=cache), doubled(x[:, 6:7], cache=doubled_cache),
                                   rtol=1e-5, atol=1e-5)


def test_per_module_path_equals_the_fused_gemm():
    """A hook that changes nothing moves the layer to the per-module path: the output and
    every gradient stay those of the fused GEMM."""
    layer, x = layer_and_input()
    do = torch.randn(2, 11, 24)

    def run():
        layer.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        out = layer(xx)
        out.backward(do)
        return {"out": out.detach(), "dx": xx.grad, **{n: p.grad.clone() for n, p in layer.named_parameters()}}

    fused = run()
    calls = []
    handle = layer.q_proj.register_forward_pre_hook(lambda module, inputs: calls.append(module))
    per_module = run()
    handle.remove()
    assert calls == [layer.q_proj]
    assert fused.keys() == per_module.keys()
    for name in fused:
        torch.testing.assert_close(per_module[name], fused[name], rtol=1e-5, atol=1e-6, msg=name)


def test_what_disables_the_fused_gemm(linear_calls):
    """A global module hook, a subclass of nn.Linear, and a forward replaced on the instance
    (as accelerate's device-map hooks do) all make the layer call q_proj."""
    layer, x = layer_and_input()

    def q_proj_called() -> bool:
        linear_calls.clear()
        layer(x)
        return any(m is layer.q_proj for m in linear_calls)

    assert not q_proj_called()
    handle = nn.modules.module.register_module_forward_hook(lambda module, inputs, output: None)
    try:
        assert q_proj_called()
    finally:
        handle.remove()
    assert not q_proj_called()

    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return 2.0 * super().forward(x)

    scaled = ScaledLinear(24, 24, bias=False)
    scaled.load_state_dict(layer.q_proj.state_dict())
    plain_q_proj, layer.q_proj = layer.q_proj, scaled
    assert q_proj_called()
    layer.q_proj = plain_q_proj
    layer.q_proj.forward = lambda x: nn.Linear.forward(layer.q_proj, x)
    assert q_proj_called()
