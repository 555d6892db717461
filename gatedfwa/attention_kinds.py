"""The attention kinds a GatedFWA model layer can be: one registry, one entry per kind.

An entry (:class:`AttentionKind`) says everything the rest of the package asks about a kind:

* its name and a one-line description (the command line's help lists them);
* ``uses_gate`` / ``uses_window``: whether its layers add the GatedFWA decay to the logits
  and attend to the last ``window_size`` keys only. GatedFWAConfig reads them
  (``layer_uses_gate``, ``layer_window``; a windowed kind needs ``window_size``);
* ``layer_factory``: ``(config, layer_idx) -> nn.Module``, the attention layer of a block
  (called as ``layer(x, layout=..., cache=..., rotary=...)``, like
  gatedfwa/layers/attention.py GatedFWAttention);
* ``cache_factory``: ``(config, layer_idx) -> cache``, the layer's entry in a model's
  decoding cache (``model.new_cache()``), or None when the kind cannot decode with a cache;
* ``static_cache_factory``: ``(config, layer_idx, max_length) -> cache``, its entry in the
  fixed-shape cache of compiled decoding (``model.new_static_cache()``), or None;
* ``supports_context_parallel``: whether its layers run on a sequence split across ranks
  (``gatedfwa.models.enable_context_parallel``).

A cache satisfies gatedfwa/models/cache_protocol.py ``LayerCache``: what the model and
generation call on it. Between a layer and its own cache anything else may pass.

A factory is a callable or a ``"package.module:attribute"`` path, imported the first time it
is used: this module imports nothing heavy, so ``gatedfwa train --help`` lists the kinds
without loading torch; the built-in kinds name their factories in
gatedfwa/models/builtin_kinds.py this way. docs/models.md ("Adding an attention kind")
shows a registration.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

__all__ = ["ATTENTION_KINDS", "AttentionKind", "attention_kind", "register_attention_kind",
           "unregister_attention_kind"]

# (config, layer_idx) -> the layer (an nn.Module) / its decoding cache.
LayerFactory = Callable[[Any, int], Any]
CacheFactory = Callable[[Any, int], Any]
# (config, layer_idx, max_length) -> its fixed-shape decoding cache.
StaticCacheFactory = Callable[[Any, int, int], Any]


@dataclass(frozen=True)
class AttentionKind:
    """One attention kind (see the module docstring for each field)."""

    name: str
    description: str
    uses_gate: bool
    uses_window: bool
    layer_factory: LayerFactory | str
    cache_factory: CacheFactory | str | None = None
    static_cache_factory: StaticCacheFactory | str | None = None
    supports_context_parallel: bool = False

    @property
    def supports_cache(self) -> bool:
        """Whether its layers decode with a cache (``model.new_cache()``, generate())."""
        return self.cache_factory is not None

    @property
    def supports_static_cache(self) -> bool:
        """Whether its layers decode with the fixed-shape cache (``model.new_static_cache()``)."""
        return self.static_cache_factory is not None

    def build_layer(self, config, layer_idx: int):
        """The attention layer of block ``layer_idx`` of a model with ``config``."""
        return _resolve(self, "layer_factory")(config, layer_idx)

    def new_cache(self, config, layer_idx: int):
        """An empty decoding cache of layer ``layer_idx``. Raises ValueError when the kind
        has none."""
        if self.cache_factory is None:
            raise ValueError(f"attention kind {self.name!r} ({self.description}) has no decoding cache: "
                             "its layers cannot decode token by token (use_cache, generate())")
        return _resolve(self, "cache_factory")(config, layer_idx)

    def new_static_cache(self, config, layer_idx: int, max_length: int):
        """An empty fixed-shape decoding cache of layer ``layer_idx`` holding up to
        ``max_length`` tokens where it has no window. Raises ValueError when the kind has none."""
        if self.static_cache_factory is None:
            raise ValueError(f"attention kind {self.name!r} ({self.description}) has no static cache; "
                             "decode with model.new_cache() instead")
        return _resolve(self, "static_cache_factory")(config, layer_idx, max_length)


def _resolve(kind: AttentionKind, field: str) -> Callable:
    """The callable in ``kind.<field>``, importing it when the field is a path."""
    factory = getattr(kind, field)
    if callable(factory):
        return factory
    module_name, _, attribute = factory.partition(":")
    try:
        resolved = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ImportError(f"attention kind {kind.name!r}: its {field} {factory!r} cannot be imported ({error})") from error
    if not callable(resolved):
        raise TypeError(f"attention kind {kind.name!r}: its {field} {factory!r} is a {type(resolved).__name__}, "
                        "not a callable")
    return resolved


_BUILTIN = "gatedfwa.models.builtin_kinds"

_KINDS: dict[str, AttentionKind] = {}

# name -> AttentionKind, in registration order: the built-in kinds, then registered ones.
# A read-only view that follows register_attention_kind and unregister_attention_kind.
ATTENTION_KINDS: Mapping[str, AttentionKind] = MappingProxyType(_KINDS)


def attention_kind(name: str) -> AttentionKind:
    """The registered kind called ``name``. Raises ValueError naming the registered kinds."""
    kind = _KINDS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise ValueError(f"unknown attention kind {name!r}; registered kinds: {', '.join(_KINDS)} "
                         "(a new one is added with gatedfwa.attention_kinds.register_attention_kind)")
    return kind


def _check_factory(name: str, field: str, factory, optional: bool) -> None:
    if factory is None and optional:
        return
    if callable(factory):
        return
    if isinstance(factory, str):
        module_name, colon, attribute = factory.partition(":")
        if colon and module_name and attribute.isidentifier():
            return
    expected = "a callable or a 'package.module:attribute' path" + (" or None" if optional else "")
    raise TypeError(f"{field} of attention kind {name!r} must be {expected}, got {factory!r}")


def register_attention_kind(
    name: str,
    *,
    description: str,
    uses_gate: bool,
    uses_window: bool,
    layer_factory: LayerFactory | str,
    cache_factory: CacheFactory | str | None = None,
    static_cache_factory: StaticCacheFactory | str | None = None,
    supports_context_parallel: bool = False,
) -> AttentionKind:
    """Add an attention kind: from then on GatedFWAConfig(attention_kinds=...) accepts
    ``name`` and GatedFWAForCausalLM builds its layers and caches with these factories.

    Args:
        name: the kind's name, as attention_kinds gives it (a non-empty string not
            registered yet; unregister_attention_kind frees a name).
        description: one line, shown by ``gatedfwa train --help``.
        uses_gate: its layers use the GatedFWA gate (config.layer_uses_gate).
        uses_window: its layers attend within ``window_size`` keys (config.layer_window;
            GatedFWAConfig then requires window_size).
        layer_factory: (config, layer_idx) -> nn.Module, or a "package.module:attribute" path.
        cache_factory: (config, layer_idx) -> a gatedfwa/models/cache_protocol.py LayerCache,
            or a path; None: the kind does not decode with a cache.
        static_cache_factory: (config, layer_idx, max_length) -> a fixed-shape LayerCache,
            or a path; None: no compiled decoding.
        supports_context_parallel: its layers accept ``context_parallel_group`` (a process
            group, set by enable_context_parallel) and then run on this rank's shard.

    Returns:
        The registered AttentionKind. Raises ValueError for a taken name, TypeError for a
        field of the wrong type.
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"name must be a non-empty string without surrounding spaces, got {name!r}")
    if name in _KINDS:
        raise ValueError(f"attention kind {name!r} is already registered; unregister_attention_kind({name!r}) "
                         "frees the name")
    if not isinstance(description, str) or not description:
        raise TypeError(f"description of attention kind {name!r} must be a non-empty string, got {description!r}")
    for field, value in (("uses_gate", uses_gate), ("uses_window", uses_window),
                         ("supports_context_parallel", supports_context_parallel)):
        if not isinstance(value, bool):
            raise TypeError(f"{field} of attention kind {name!r} must be a bool, got {value!r}")
    _check_factory(name, "layer_factory", layer_factory, optional=False)
    _check_factory(name, "cache_factory", cache_factory, optional=True)
    _check_factory(name, "static_cache_factory", static_cache_factory, optional=True)
    kind = AttentionKind(name, description, uses_gate, uses_window, layer_factory, cache_factory,
                         static_cache_factory, supports_context_parallel)
    _KINDS[name] = kind
    return kind


def unregister_attention_kind(name: str) -> AttentionKind:
    """Remove a kind added by register_attention_kind; returns it. Models already built keep
    their layers; configs naming the kind no longer validate. Raises ValueError for an
    unknown name or a built-in kind."""
    kind = attention_kind(name)
    if name in _BUILTIN_NAMES:
        raise ValueError(f"attention kind {name!r} is built in and cannot be unregistered")
    del _KINDS[name]
    return kind


_WINDOW = dict(layer_factory=f"{_BUILTIN}:window_attention_layer", cache_factory=f"{_BUILTIN}:window_cache",
               static_cache_factory=f"{_BUILTIN}:static_window_cache")
_NSA = dict(layer_factory=f"{_BUILTIN}:nsa_attention_layer", cache_factory=f"{_BUILTIN}:nsa_cache")

# Context parallelism needs a layer whose attention is the window op alone: its halo is the
# last window_size - 1 tokens of the ranks before. Window-free kinds would need the whole
# prefix; NSA selects blocks anywhere in it.
register_attention_kind("gatedfwa", description="gated sliding window", uses_gate=True, uses_window=True,
                        supports_context_parallel=True, **_WINDOW)
register_attention_kind("swa", description="sliding window, no gate", uses_gate=False, uses_window=True,
                        supports_context_parallel=True, **_WINDOW)
register_attention_kind("full", description="full causal softmax", uses_gate=False, uses_window=False, **_WINDOW)
register_attention_kind("forgetting", description="gate, no window", uses_gate=True, uses_window=False, **_WINDOW)
register_attention_kind("nsa", description="NSA, plain sliding branch", uses_gate=False, uses_window=True, **_NSA)
register_attention_kind("nsa-gatedfwa", description="NSA, gated sliding branch", uses_gate=True, uses_window=True,
                        **_NSA)

_BUILTIN_NAMES = frozenset(_KINDS)
