"""The layer and cache factories of the built-in attention kinds.

gatedfwa/attention_kinds.py registers the kinds and names these functions by their import
path, so that listing the kinds loads no torch. Every function takes a GatedFWAConfig and
the index of the layer it builds for; what a layer of a kind is (window, gate) comes from
the config (``layer_window``, ``layer_uses_gate``), which reads the kind's registry entry.

    "gatedfwa", "swa", "full", "forgetting"  GatedFWAttention    WindowLayerCache / StaticWindowLayerCache
    "nsa", "nsa-gatedfwa"                    NSAttention         NSALayerCache (no static cache)
"""

from __future__ import annotations

from gatedfwa.layers.attention import GatedFWAttention
from gatedfwa.layers.nsa_attention import NSAttention
from gatedfwa.models.configuration import GatedFWAConfig
from gatedfwa.ops import StaticWindowLayerCache, WindowLayerCache
from gatedfwa.ops.nsa import NSALayerCache

__all__ = ["attention_layer_options", "window_attention_layer", "nsa_attention_layer", "window_cache",
           "static_window_cache", "nsa_cache"]


def attention_layer_options(config: GatedFWAConfig, layer_idx: int) -> dict:
    """The keyword arguments of GatedFWAttention for layer ``layer_idx`` of a model with
    ``config``: its width and heads, config.layer_window(layer_idx) as window_size,
    config.layer_uses_gate(layer_idx) as use_gate, config.gate as gate, and the layer options. A kind of one's
    own may build its layer from these, changing what it changes."""
    return dict(
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        window_size=config.layer_window(layer_idx),
        use_gate=config.layer_uses_gate(layer_idx),
        rope_theta=config.rope_theta,
        qk_norm=config.qk_norm,
        output_gate=config.output_gate,
        token_shift=config.token_shift,
        norm_eps=config.rms_norm_eps,
        gate_init_range=tuple(config.gate_init_range),
        gate=config.gate,
        layer_idx=layer_idx,
    )


def window_attention_layer(config: GatedFWAConfig, layer_idx: int) -> GatedFWAttention:
    """"gatedfwa", "swa", "full", "forgetting": window and gate from the kind."""
    return GatedFWAttention(**attention_layer_options(config, layer_idx))


def nsa_attention_layer(config: GatedFWAConfig, layer_idx: int) -> NSAttention:
    """"nsa", "nsa-gatedfwa": the sliding branch's window and gate from the kind, blocks from
    nsa_block_size and nsa_block_counts."""
    return NSAttention(**attention_layer_options(config, layer_idx), block_size=config.nsa_block_size,
                       block_counts=config.nsa_block_counts)


def window_cache(config: GatedFWAConfig, layer_idx: int) -> WindowLayerCache:
    """A ring buffer of the layer's window (growing for a layer without window)."""
    return WindowLayerCache(config.layer_window(layer_idx))


def static_window_cache(config: GatedFWAConfig, layer_idx: int, max_length: int) -> StaticWindowLayerCache:
    """A fixed ring buffer of the layer's window, or of max_length slots without window."""
    return StaticWindowLayerCache(config.layer_window(layer_idx), max_length)


def nsa_cache(config: GatedFWAConfig, layer_idx: int) -> NSALayerCache:
    """The sliding branch's ring buffer, every key and value, and the block summaries."""
    return NSALayerCache(config.layer_window(layer_idx), config.nsa_block_size)
