"""Tiny random-weight configs of transformers model families with sliding-window layers,
for comparing attn_implementation="gatedfwa" with "sdpa".

Weights are drawn wider than the defaults (initializer_range) so that attention is far from
uniform and a wrong window or a leak across sequences shows in the outputs.
"""

from __future__ import annotations

import copy

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GptOssConfig,
    MistralConfig,
    Qwen2Config,
)

WINDOW = 5


def _common(size: str) -> dict:
    if size == "cpu":
        return dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.15,
                    sliding_window=WINDOW)
    # GPU: head_dim and window large enough that the kernels run several tiles per sequence.
    return dict(vocab_size=257, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=64, initializer_range=0.05,
                sliding_window=100)


def family_config(family: str, size: str = "cpu"):
    """A config of ``family`` whose two layers are, in order:
    mistral: sliding, sliding; qwen2: full, sliding (use_sliding_window, max_window_layers=1);
    gemma2 (soft-capping off): sliding, full; gemma3: sliding, full."""
    common = _common(size)
    if family == "mistral":
        return MistralConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common, use_sliding_window=True, max_window_layers=1)
    if family == "gemma2":
        return Gemma2Config(**common, attn_logit_softcapping=None, final_logit_softcapping=None,
                            query_pre_attn_scalar=common["head_dim"])
    if family == "gemma3":
        return Gemma3TextConfig(**common, layer_types=["sliding_attention", "full_attention"],
                                query_pre_attn_scalar=common["head_dim"])
    if family == "gemma2-softcap":
        return Gemma2Config(**common, attn_logit_softcapping=50.0)
    if family == "gpt-oss":
        return GptOssConfig(**common, num_local_experts=4, num_experts_per_tok=2,
                            layer_types=["sliding_attention", "full_attention"])
    raise ValueError(f"unknown family {family!r}")


FAMILIES = ("mistral", "qwen2", "gemma2", "gemma3")


def reference_implementation(family: str) -> str:
    """The transformers implementation to compare with: "sdpa", or "eager" for Gemma 2,
    which does not offer sdpa (its default soft-capping needs the scores)."""
    return "eager" if family.startswith("gemma2") else "sdpa"


def build(config, attn_implementation: str, state: dict | None = None, dtype=torch.float32, device="cpu"):
    """A model of ``config`` (deep-copied: transformers writes the attention implementation
    into the config it is given) with the weights ``state`` if given."""
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=attn_implementation)
    if state is not None:
        model.load_state_dict(state)
    return model.to(device=device, dtype=dtype)
