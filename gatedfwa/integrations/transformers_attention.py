"""attn_implementation="gatedfwa": the gatedfwa op inside `transformers` models.

Importing this module (``import gatedfwa`` does) registers two functions under the name
"gatedfwa" with transformers:

* :func:`gatedfwa_attention_forward` in AttentionInterface: what every attention layer of
  the model calls in place of sdpa or flash-attention;
* :func:`~gatedfwa.integrations.transformers_masks.gatedfwa_mask` in AttentionMaskInterface:
  what the model calls to build its masks (one per kind of layer).

Then

    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="gatedfwa")

runs the sliding-window and full-attention layers of Mistral, Qwen2/Qwen3, Gemma 2/3 and
the other decoder models with such layers through ``gatedfwa.gated_window_attention``
(ungated: g=None), training and prefill alike, padded and packed batches included.

Decoding steps (fewer queries than keys, with a cache) run PyTorch SDPA with the mask sdpa
itself would use, so they are exactly what attn_implementation="sdpa" computes. What the op
cannot compute (attention sinks, logit soft-capping, attention dropout, non-causal masks)
raises NotImplementedError naming the feature: what the model's config declares (soft-capping,
attention dropout) as soon as the model is built with, or switched to, "gatedfwa"; the rest
at the first forward. docs/transformers.md has the details.
"""

from __future__ import annotations

import functools

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface
from transformers.utils import logging

from gatedfwa import gated_window_attention
from gatedfwa.integrations.transformers_masks import WindowMaskLayout, gatedfwa_mask
from gatedfwa.layers.padding import PackedLayout, pack, unpack

__all__ = ["ATTN_IMPLEMENTATION", "check_config_supported", "gatedfwa_attention_forward", "register"]

ATTN_IMPLEMENTATION = "gatedfwa"

logger = logging.get_logger(__name__)


def _unsupported(feature: str, hint: str) -> NotImplementedError:
    return NotImplementedError(
        f"attn_implementation='{ATTN_IMPLEMENTATION}' does not support {feature}; {hint}"
    )


def _softcap_unsupported(softcap) -> NotImplementedError:
    return _unsupported(
        f"attention logit soft-capping (softcap={softcap}, as in Gemma 2)",
        "set config.attn_logit_softcapping=None or use attn_implementation='eager'.",
    )


def _dropout_unsupported(dropout) -> NotImplementedError:
    return _unsupported(
        f"attention dropout (dropout={dropout})",
        "set config.attention_dropout=0.0 or use attn_implementation='sdpa'.",
    )


def _reject_unsupported(module, query, value, dropout, softcap, s_aux, is_causal, kwargs) -> None:
    """Raise for every feature that would change the result and that the op does not compute."""
    if s_aux is not None or kwargs.get("sinks") is not None:
        raise _unsupported("attention sinks (s_aux, as in GPT-OSS)",
                           "use attn_implementation='eager' or 'flash_attention_2'.")
    if softcap is not None:
        raise _softcap_unsupported(softcap)
    if dropout is not None and dropout > 0:
        raise _dropout_unsupported(dropout)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal:
        raise _unsupported("non-causal (bidirectional) attention", "use attn_implementation='sdpa'.")
    if kwargs.get("position_bias") is not None:
        raise _unsupported("an additive position bias (position_bias)", "use attn_implementation='sdpa'.")
    if query.shape[-1] != value.shape[-1]:
        raise _unsupported(
            f"values with another head size than queries and keys (q/k {query.shape[-1]}, v {value.shape[-1]})",
            "use attn_implementation='sdpa'.",
        )


def _check_window_agrees(layout: WindowMaskLayout, sliding_window: int | None) -> None:
    """The layer's sliding_window argument (what flash-attention would use) must describe the
    same attention as the mask (what sdpa uses)."""
    if sliding_window is None:
        return
    if layout.effective_window(sliding_window) != layout.effective_window(layout.window_size):
        raise ValueError(
            f"attn_implementation='{ATTN_IMPLEMENTATION}': the layer asks for sliding_window={sliding_window} "
            f"but its attention mask has window {layout.window_size} (None = full causal) over sequences of up "
            f"to {layout.max_seqlen} tokens; the two disagree, so neither can be chosen safely."
        )


def _check_cu_seq_lens(layout: WindowMaskLayout, kwargs: dict) -> None:
    """Flash-attention style packing arguments (cu_seq_lens_q/k, e.g. from
    DataCollatorWithFlattening) must give the sequences the mask gives (sdpa reads packing
    from position_ids): otherwise flash-attention and sdpa would compute different things."""
    expected = None
    for name in ("cu_seq_lens_q", "cu_seq_lens_k"):
        given = kwargs.get(name)
        if given is None:
            continue
        if expected is None:
            if layout.cu_seqlens is not None:
                expected = layout.cu_seqlens.tolist()
            else:
                expected = [b * layout.seqlen for b in range(layout.batch_size + 1)]
        if given.reshape(-1).tolist() != expected:
            raise ValueError(
                f"attn_implementation='{ATTN_IMPLEMENTATION}': {name}={given.tolist()} disagrees with the "
                f"sequences of the attention mask (offsets {expected}); pass position_ids that restart at 0 "
                "at every packed sequence, as DataCollatorWithFlattening does."
            )


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: WindowMaskLayout, scale):
    """q [B, T, HQ, D], k/v [B, T, H, D] -> o [B, T, HQ, D] through the op, packing the real
    tokens into one row when the layout has several sequences per row or padding."""
    window = layout.window_size
    if layout.cu_seqlens is None:
        return gated_window_attention(q, k, v, window_size=window, scale=scale)
    batch, seqlen = layout.batch_size, layout.seqlen
    cu_seqlens = layout.cu_seqlens.to(q.device)  # layers may sit on other devices (device_map)
    if layout.token_index is None:  # every token real: the rows laid end to end
        def flat(x):
            return x.reshape(1, batch * seqlen, *x.shape[2:])

        o = gated_window_attention(flat(q), flat(k), flat(v), window_size=window, scale=scale,
                                   cu_seqlens=cu_seqlens)
        return o.view(batch, seqlen, *o.shape[2:])
    if layout.token_index.numel() == 0:  # nothing but padding
        return q.new_zeros(q.shape)
    packed = PackedLayout(indices=layout.token_index.to(q.device), cu_seqlens=cu_seqlens, batch=batch, seqlen=seqlen)
    o = gated_window_attention(pack(q, packed), pack(k, packed), pack(v, packed), window_size=window,
                               scale=scale, cu_seqlens=cu_seqlens)
    return unpack(o, packed)


def gatedfwa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: WindowMaskLayout | torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention function registered as "gatedfwa" in transformers' AttentionInterface.

    Args (as transformers' attention layers pass them):
        module: the attention layer (for is_causal).
        query: [B, HQ, Tq, D]; key, value: [B, H, Tk, D], H dividing HQ (not repeated).
        attention_mask: what :func:`gatedfwa_mask` built for this kind of layer: a
            WindowMaskLayout when the queries are the whole sequence, a boolean
            [B, 1, Tq, Tk] mask otherwise; None when the model built no mask (then
            causal attention over each row, window ``sliding_window``, as flash-attention
            does); any other mask runs PyTorch SDPA with it.
        dropout, softcap, s_aux, is_causal: must be 0 / None / None / causal (else raises).
        scaling: logit scale (default D ** -0.5).
        sliding_window: the layer's window, checked against the mask's.

    Returns:
        (o [B, Tq, HQ, D], None): no attention weights are materialised.
    """
    _reject_unsupported(module, query, value, dropout, softcap, s_aux, is_causal, kwargs)
    if kwargs.get("output_attentions", False):
        logger.warning_once(f"attn_implementation='{ATTN_IMPLEMENTATION}' does not return attention weights.")
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]

    if attention_mask is None and q_len == kv_len:
        attention_mask = WindowMaskLayout(batch_size=batch, seqlen=q_len, window_size=sliding_window, max_seqlen=q_len)
    if not isinstance(attention_mask, WindowMaskLayout):
        # Decoding steps and prefill against a filled cache (q_len < kv_len), or a mask that
        # was built outside gatedfwa_mask: exactly what attn_implementation="sdpa" computes.
        if q_len == kv_len:
            logger.warning_once(
                f"attn_implementation='{ATTN_IMPLEMENTATION}' got an attention mask it did not build "
                "(a custom 4D mask?); running PyTorch SDPA with it."
            )
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling,
                                      is_causal=True, **kwargs)

    if (attention_mask.batch_size, attention_mask.seqlen) != (batch, q_len) or kv_len != q_len:
        raise ValueError(
            f"attn_implementation='{ATTN_IMPLEMENTATION}': the attention mask was built for batch "
            f"{attention_mask.batch_size} x {attention_mask.seqlen} tokens, but the layer got queries "
            f"[{batch}, {q_len}] and {kv_len} keys."
        )
    _check_window_agrees(attention_mask, sliding_window)
    _check_cu_seq_lens(attention_mask, kwargs)
    out = _attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask, scaling)
    return out, None


def check_config_supported(config) -> None:
    """Raise NotImplementedError, naming the feature and the way out, when a model ``config``
    asks for what attn_implementation="gatedfwa" cannot compute and the config alone tells:
    attention logit soft-capping (``attn_logit_softcapping``, on by default in Gemma 2) and
    attention dropout (``attention_dropout`` > 0; applied in training only, but refused at
    once rather than at the first training step). What only a forward call shows (sinks,
    non-causal layers, a dropout under another config name) raises there."""
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None:
        raise _softcap_unsupported(softcap)
    dropout = getattr(config, "attention_dropout", None)
    if dropout is not None and dropout > 0:
        raise _dropout_unsupported(dropout)


def _check_configs_when_chosen() -> None:
    """Make transformers run check_config_supported whenever a model is built with, or
    switched to (set_attn_implementation), attn_implementation="gatedfwa".

    transformers has no hook through which a registered attention function could validate the
    model it is chosen for: it checks an implementation in
    PreTrainedModel._check_and_adjust_attn_implementation, which both __init__ and
    set_attn_implementation call, and which a model class overrides (calling super()) to
    refuse implementations its config cannot use. That one method is wrapped here: the
    original runs unchanged and its result is returned; only when the result is "gatedfwa" is
    the model's config checked. Raising there leaves a switched model on its previous
    implementation. Without this, such a model would raise only at its first forward call (the
    check in gatedfwa_attention_forward, which stays for configs changed after the build)."""
    original = PreTrainedModel._check_and_adjust_attn_implementation
    if getattr(original, "_gatedfwa_checks_config", False):  # already wrapped
        return

    @functools.wraps(original)
    def check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
        implementation = original(self, attn_implementation, *args, **kwargs)
        if implementation == ATTN_IMPLEMENTATION:
            check_config_supported(self.config)
        return implementation

    check_and_adjust_attn_implementation._gatedfwa_checks_config = True
    PreTrainedModel._check_and_adjust_attn_implementation = check_and_adjust_attn_implementation


def register() -> None:
    """Register attn_implementation="gatedfwa" (attention and mask functions) with transformers,
    and the config check at build time. Idempotent; importing this module calls it."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, gatedfwa_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, gatedfwa_mask)
    _check_configs_when_chosen()


register()
