"""The attention-kind registry (gatedfwa/attention_kinds.py) and the cache protocol
(gatedfwa/models/cache_protocol.py): a kind registered from this file alone builds a model
that trains and decodes; unknown, taken and unregistered names give clear errors; the cache
classes implement the protocol."""

import inspect
import subprocess
import sys

import pytest
import torch

from gatedfwa.attention_kinds import (
    ATTENTION_KINDS,
    attention_kind,
    register_attention_kind,
    unregister_attention_kind,
)
from gatedfwa.layers import GatedFWAttention, NSAttention
from gatedfwa.models import GatedFWAConfig, GatedFWAForCausalLM, enable_context_parallel
from gatedfwa.models.builtin_kinds import attention_layer_options
from gatedfwa.models.cache_protocol import LayerCache, ModelCache
from gatedfwa.ops import StaticWindowCache, StaticWindowLayerCache, WindowCache, WindowLayerCache
from gatedfwa.ops.nsa import NSALayerCache
from tests.models.test_generation import sharpened
from tests.models.test_model import tiny_config

# ---------------------------------------------------------------------------------------
# A kind of this test's own: GatedFWA whose window is half of window_size.
# ---------------------------------------------------------------------------------------

KIND = "half-window"


def half_window(config) -> int:
    return max(1, config.window_size // 2)


def half_window_layer(config, layer_idx):
    """Named by path in the registration below (imported when the first layer is built)."""
    return GatedFWAttention(**{**attention_layer_options(config, layer_idx), "window_size": half_window(config)})


def half_window_cache(config, layer_idx):
    return WindowLayerCache(half_window(config))


def half_window_static_cache(config, layer_idx, max_length):
    return StaticWindowLayerCache(half_window(config), max_length)


@pytest.fixture
def half_window_kind():
    kind = register_attention_kind(
        KIND, description="gated window of window_size // 2", uses_gate=True, uses_window=True,
        layer_factory=f"{__name__}:half_window_layer", cache_factory=half_window_cache,
        static_cache_factory=half_window_static_cache,
    )
    try:
        yield kind
    finally:
        unregister_attention_kind(KIND)


def test_registered_kind_builds_its_layers_and_caches(half_window_kind):
    assert ATTENTION_KINDS[KIND] is half_window_kind and attention_kind(KIND) is half_window_kind
    config = tiny_config(attention_kinds=[KIND, "gatedfwa"])
    assert config.layer_window(0) == 4 and config.layer_uses_gate(0)  # uses_window, uses_gate
    model = GatedFWAForCausalLM(config)
    layers = [block.attn for block in model.model.layers]
    assert [type(layer) for layer in layers] == [GatedFWAttention, GatedFWAttention]
    assert [layer.window_size for layer in layers] == [2, 4]
    assert [cache.window_size for cache in model.new_cache()] == [2, 4]
    static = model.new_static_cache(16)
    assert [type(cache) for cache in static] == [StaticWindowLayerCache] * 2
    assert [cache.window_size for cache in static] == [2, 4]


def test_registered_kind_attends_within_its_own_window(half_window_kind):
    """A token 3 positions back is outside the half window (2) and inside "gatedfwa"'s (4)."""
    for kind, sees in ((KIND, False), ("gatedfwa", True)):
        model = sharpened(GatedFWAForCausalLM(tiny_config(num_hidden_layers=1, attention_kinds=kind)))
        ids = torch.randint(0, 61, (1, 12))
        changed = ids.clone()
        changed[0, -4] = (ids[0, -4] + 1) % 61
        with torch.no_grad():
            diff = (model(ids).logits[0, -1] - model(changed).logits[0, -1]).abs().max().item()
        assert (diff > 1e-6) == sees, kind


def test_registered_kind_trains_a_step(half_window_kind):
    model = GatedFWAForCausalLM(tiny_config(attention_kinds=[KIND, "swa"], token_shift=True))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 61, (2, 11))
    before = {name: p.detach().clone() for name, p in model.model.layers[0].attn.named_parameters()}
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.model.layers[0].attn.parameters())
    optimizer.step()
    after = dict(model.model.layers[0].attn.named_parameters())
    assert all(not torch.equal(before[name], after[name]) for name in before)
    with torch.no_grad():
        assert model(ids, labels=ids).loss < loss


@pytest.mark.parametrize("static", [False, True], ids=["growing", "static"])
def test_registered_kind_decodes_as_its_parallel_forward(half_window_kind, static):
    """Prefill 5 tokens, then one token at a time: the logits equal the parallel forward's."""
    model = sharpened(GatedFWAForCausalLM(tiny_config(attention_kinds=[KIND, "gatedfwa"], token_shift=True)))
    ids = torch.randint(0, 61, (2, 14))
    with torch.no_grad():
        parallel = model(ids).logits
        cache = model.new_static_cache(ids.shape[1]) if static else model.new_cache()
        steps = [model(ids[:, :5], cache=cache).logits]
        steps += [model(ids[:, t:t + 1], cache=cache).logits for t in range(5, ids.shape[1])]
    assert cache[0].capacity == 2  # the kind's cache, a ring of its window
    assert parallel.abs().max() > 1.0
    torch.testing.assert_close(torch.cat(steps, dim=1), parallel, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------
# A kind with a layer of its own: the attention hooks overridden in a subclass
# ---------------------------------------------------------------------------------------

SDPA_KIND = "sdpa-window"


class SdpaWindowAttention(GatedFWAttention):
    """Plain sliding-window attention through PyTorch's SDPA and an explicit mask: only the
    attention hooks are its own (decoding keeps the base layer's window cache and op)."""

    calls = 0

    def attend(self, q, k, v, x, cu_seqlens, gate_pre=None):
        assert cu_seqlens is None and gate_pre is None
        type(self).calls += 1
        seqlen = q.shape[1]
        positions = torch.arange(seqlen)
        distance = positions[:, None] - positions[None, :]
        mask = (distance >= 0) & (distance < self.window_size)
        group = self.num_heads // self.num_kv_heads
        k, v = (t.repeat_interleave(group, dim=2) for t in (k, v))
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=self.scale)
        return o.transpose(1, 2)

    def attend_with_gates(self, q, k, v, x, cu_seqlens, gate_pre=None):
        return self.attend(q, k, v, x, cu_seqlens, gate_pre), None


def sdpa_window_layer(config, layer_idx):
    return SdpaWindowAttention(**{**attention_layer_options(config, layer_idx), "use_gate": False})


@pytest.fixture
def sdpa_window_kind():
    kind = register_attention_kind(
        SDPA_KIND, description="sliding window through SDPA", uses_gate=False, uses_window=True,
        layer_factory=sdpa_window_layer, cache_factory=lambda config, layer_idx: WindowLayerCache(config.window_size))
    try:
        yield kind
    finally:
        unregister_attention_kind(SDPA_KIND)


def test_a_layer_of_its_own_matches_the_kind_it_reimplements(sdpa_window_kind):
    """The subclass's attend (SDPA under a window mask) gives the logits and gradients of the
    built-in "swa" kind with the same weights, through the same shared layer code (GQA, token
    shift, QK norm), and decodes through the base layer's cache as its parallel forward."""
    options = dict(num_hidden_layers=2, num_key_value_heads=1, token_shift=True, qk_norm=True)
    ours = GatedFWAForCausalLM(tiny_config(attention_kinds=SDPA_KIND, **options))
    builtin = GatedFWAForCausalLM(tiny_config(attention_kinds="swa", **options))
    builtin.load_state_dict(ours.state_dict())
    assert all(type(block.attn) is SdpaWindowAttention for block in ours.model.layers)
    ids = torch.randint(0, 61, (2, 13))
    SdpaWindowAttention.calls = 0
    loss = ours(ids, labels=ids).loss
    assert SdpaWindowAttention.calls == 2
    reference = builtin(ids, labels=ids).loss
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    loss.backward()
    reference.backward()
    for (name, p), q in zip(ours.named_parameters(), builtin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        parallel = ours(ids).logits
        cache = ours.new_cache()
        steps = [ours(ids[:, :6], cache=cache).logits]
        steps += [ours(ids[:, t:t + 1], cache=cache).logits for t in range(6, ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), parallel, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------

def test_unknown_kind_is_refused_naming_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown attention kind 'nope'.*gatedfwa.*register_attention_kind"):
        attention_kind("nope")
    with pytest.raises(ValueError, match=r"unknown attention kind 'nope' in attention_kinds.*'nsa-gatedfwa'"):
        tiny_config(attention_kinds="nope")
    with pytest.raises(ValueError, match="unknown attention kind 'nope'"):
        unregister_attention_kind("nope")


def test_unregistered_kind_is_unknown_again(half_window_kind):
    tiny_config(attention_kinds=KIND)
    unregister_attention_kind(KIND)
    try:
        assert KIND not in ATTENTION_KINDS
        with pytest.raises(ValueError, match=f"unknown attention kind '{KIND}'"):
            tiny_config(attention_kinds=KIND)
    finally:  # the fixture unregisters it again
        register_attention_kind(KIND, description="again", uses_gate=True, uses_window=True,
                                layer_factory=half_window_layer)


def test_taken_and_built_in_names_are_refused(half_window_kind):
    with pytest.raises(ValueError, match=f"'{KIND}' is already registered"):
        register_attention_kind(KIND, description="twice", uses_gate=False, uses_window=False,
                                layer_factory=half_window_layer)
    with pytest.raises(ValueError, match="'gatedfwa' is already registered"):
        register_attention_kind("gatedfwa", description="mine", uses_gate=True, uses_window=True,
                                layer_factory=half_window_layer)
    with pytest.raises(ValueError, match="'swa' is built in and cannot be unregistered"):
        unregister_attention_kind("swa")
    assert "swa" in ATTENTION_KINDS
    with pytest.raises(TypeError):
        ATTENTION_KINDS["mine"] = half_window_kind  # a read-only view: registering goes through the function


@pytest.mark.parametrize("fields, error, match", [
    (dict(layer_factory="no_colon_here"), TypeError, "layer_factory of attention kind 'bad'.*path"),
    (dict(layer_factory=half_window_layer, cache_factory=3), TypeError, "cache_factory of attention kind 'bad'"),
    (dict(layer_factory=half_window_layer, uses_gate=1), TypeError, "uses_gate of attention kind 'bad' must be a bool"),
    (dict(layer_factory=half_window_layer, description=""), TypeError, "description of attention kind 'bad'"),
])
def test_malformed_registrations_are_refused(fields, error, match):
    arguments = {**dict(description="bad kind", uses_gate=True, uses_window=True), **fields}
    with pytest.raises(error, match=match):
        register_attention_kind("bad", **arguments)
    assert "bad" not in ATTENTION_KINDS
    with pytest.raises(ValueError, match="non-empty string"):
        register_attention_kind("", description="empty", uses_gate=True, uses_window=True,
                                layer_factory=half_window_layer)


def test_missing_capabilities_are_named_where_they_are_needed():
    """A kind without caches, context parallelism, or with a factory path that does not
    import: each use says which kind lacks what."""
    register_attention_kind("plain-only", description="training only", uses_gate=False, uses_window=False,
                            layer_factory=half_window_layer)
    register_attention_kind("missing", description="factory gone", uses_gate=False, uses_window=False,
                            layer_factory="gatedfwa.models.builtin_kinds:no_such_factory")
    try:
        model = GatedFWAForCausalLM(tiny_config(attention_kinds=["gatedfwa", "plain-only"]))
        with pytest.raises(ValueError, match="'plain-only' \\(training only\\) has no decoding cache"):
            model.new_cache()
        with pytest.raises(ValueError, match="'plain-only' \\(training only\\) have no static cache"):
            model.new_static_cache(8)
        # The kinds are refused before the group is used: any non-None value stands for one.
        with pytest.raises(ValueError, match=r"supports the attention kinds \['gatedfwa', 'swa'\] only.*'plain-only'"):
            enable_context_parallel(model, group=object())
        with pytest.raises(ImportError, match="'missing': its layer_factory .*no_such_factory"):
            GatedFWAForCausalLM(tiny_config(attention_kinds="missing"))
    finally:
        unregister_attention_kind("plain-only")
        unregister_attention_kind("missing")


def test_layer_factory_must_return_a_module():
    register_attention_kind("not-a-module", description="returns a function", uses_gate=False, uses_window=False,
                            layer_factory=lambda config, layer_idx: len)
    try:
        with pytest.raises(TypeError, match="'not-a-module' must return an nn.Module, got builtin_function"):
            GatedFWAForCausalLM(tiny_config(attention_kinds="not-a-module"))
    finally:
        unregister_attention_kind("not-a-module")


# ---------------------------------------------------------------------------------------
# The built-in kinds and the cache protocol
# ---------------------------------------------------------------------------------------

def test_built_in_kinds_build_their_layers_and_caches():
    expected = {  # kind: layer class, cache class, static cache class (None: none)
        "gatedfwa": (GatedFWAttention, WindowLayerCache, StaticWindowLayerCache),
        "swa": (GatedFWAttention, WindowLayerCache, StaticWindowLayerCache),
        "full": (GatedFWAttention, WindowLayerCache, StaticWindowLayerCache),
        "forgetting": (GatedFWAttention, WindowLayerCache, StaticWindowLayerCache),
        "nsa": (NSAttention, NSALayerCache, None),
        "nsa-gatedfwa": (NSAttention, NSALayerCache, None),
    }
    assert set(expected) <= set(ATTENTION_KINDS)
    config = tiny_config(num_hidden_layers=len(expected), attention_kinds=list(expected), nsa_block_size=4,
                         nsa_block_counts=2)
    model = GatedFWAForCausalLM(config)
    cache = model.new_cache()
    for i, (name, (layer_class, cache_class, static_class)) in enumerate(expected.items()):
        kind = ATTENTION_KINDS[name]
        assert type(model.model.layers[i].attn) is layer_class, name
        assert type(cache[i]) is cache_class, name
        assert kind.supports_cache
        assert kind.supports_static_cache == (static_class is not None), name
        if static_class is not None:
            assert type(kind.new_static_cache(config, i, 16)) is static_class
        assert kind.supports_context_parallel == (name in ("gatedfwa", "swa")), name
        assert (model.model.layers[i].attn.window_size is not None) == kind.uses_window, name
        assert model.model.layers[i].attn.use_gate == kind.uses_gate, name


def test_listing_the_kinds_imports_no_torch():
    """The command line's help lists the kinds from the registry without loading torch."""
    code = ("import sys, gatedfwa.attention_kinds as kinds; "
            "print(len(kinds.ATTENTION_KINDS), sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(maxsplit=1) == ["6", "[]\n"]


def _protocol_members(protocol) -> dict[str, object]:
    return {name: value for name, value in vars(protocol).items()
            if not name.startswith("_") or name in ("__len__", "__getitem__")}


def assert_implements(instance, protocol) -> None:
    """isinstance against the runtime-checkable protocol (every member present), and every
    protocol method callable on the instance with the protocol's parameters, by name."""
    assert isinstance(instance, protocol), f"{type(instance).__name__} is not a {protocol.__name__}"
    for name, member in _protocol_members(protocol).items():
        if isinstance(member, property):
            assert not callable(getattr(instance, name)), f"{type(instance).__name__}.{name} must be a value"
            continue
        if not callable(member):
            continue
        wanted = [p for p in inspect.signature(member).parameters.values() if p.name != "self"]
        actual = inspect.signature(getattr(instance, name))
        try:
            actual.bind(*[object() for p in wanted if p.default is inspect.Parameter.empty])
            actual.bind(**{p.name: object() for p in wanted})
        except TypeError as error:
            raise AssertionError(f"{type(instance).__name__}.{name}{actual} does not take {protocol.__name__}'s "
                                 f"parameters {[p.name for p in wanted]}: {error}") from None


@pytest.mark.parametrize("make", [
    lambda: WindowLayerCache(4), lambda: WindowLayerCache(None), lambda: StaticWindowLayerCache(4),
    lambda: StaticWindowLayerCache(None, max_length=8), lambda: NSALayerCache(4, 2),
], ids=["window", "growing", "static-window", "static-growing", "nsa"])
def test_layer_caches_implement_the_protocol(make):
    assert_implements(make(), LayerCache)


def test_model_caches_implement_the_protocol():
    model = GatedFWAForCausalLM(tiny_config(attention_kinds=["gatedfwa", "full"]))
    for cache in (model.new_cache(), model.new_static_cache(8)):
        assert isinstance(cache, (WindowCache, StaticWindowCache))
        assert_implements(cache, ModelCache)
        for layer in cache:
            assert_implements(layer, LayerCache)


def test_protocol_check_can_fail():
    class NoReorder:
        seen_tokens = 0
        holds_tokens = False
        token_counts = None

        def get_seq_length(self):
            return 0

        def reset(self):
            pass

        def memory_bytes(self):
            return 0

    class WrongReorder(NoReorder):
        def reorder(self):  # takes no batch_indices
            pass

    with pytest.raises(AssertionError, match="is not a LayerCache"):
        assert_implements(NoReorder(), LayerCache)
    with pytest.raises(AssertionError, match="reorder.*batch_indices"):
        assert_implements(WrongReorder(), LayerCache)


def test_config_round_trip_keeps_a_registered_kind(half_window_kind, tmp_path):
    """A saved model with a registered kind loads back where the kind is registered."""
    model = GatedFWAForCausalLM(tiny_config(attention_kinds=[KIND, "gatedfwa"])).eval()
    model.save_pretrained(tmp_path)
    loaded = GatedFWAForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.layer_kinds == [KIND, "gatedfwa"] and loaded.model.layers[0].attn.window_size == 2
    ids = torch.randint(0, 61, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert isinstance(GatedFWAConfig.from_pretrained(tmp_path), GatedFWAConfig)
