"""GatedFWA causal language model, transformers-compatible.

    input_ids [B, T]
      -> token embedding                                   [B, T, C]
      -> num_hidden_layers x Block:
             x = x + Attention(RMSNorm(x))    (kind per layer: gatedfwa / swa / full / forgetting /
                                               nsa / nsa-gatedfwa / a registered kind)
             x = x + SwiGLU-MLP(RMSNorm(x))
      -> RMSNorm -> lm_head                                logits [B, T, vocab]

Padding (attention_mask with zeros, e.g. left-padded prompts) is handled exactly: the real
tokens of every row are packed into one varlen row once, before the first block, and
unpacked after the last, so no padding token ever enters a softmax or a gate sum.
Each layer's attention module and decoding cache come from its kind's entry in the registry
(gatedfwa/attention_kinds.py). Decoding keeps per windowed layer only the last w keys and
values (gatedfwa/ops/decode/cache.py); an NSA layer keeps every key and value and its block
summaries besides (gatedfwa/ops/nsa/cache.py).

The transformers workflows (docs/models.md, "With transformers"): the loss honours Trainer's
num_items_in_batch (gradient accumulation), the blocks support gradient checkpointing,
every common attn_implementation name is accepted (the layers' own kernels run whatever is
named), output_hidden_states and return_dict are honoured, generate() infers only left
padding from pad tokens, and save_pretrained writes what trust_remote_code=True needs.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from gatedfwa.attention_kinds import attention_kind
from gatedfwa.distributed.sequence import (
    context_parallel_causal_lm_loss,
    packed_shard_position_ids,
    refuse_under_context_parallel,
    shard_start,
)
from gatedfwa.layers.attention import GatedFWAttention, default_position_ids
from gatedfwa.layers.norm import RMSNorm
from gatedfwa.layers.padding import flattened_layout, pack, pack_padded, unpack
from gatedfwa.layers.rotary import rotary_angles
from gatedfwa.models.configuration import GatedFWAConfig
from gatedfwa.ops import StaticWindowCache, WindowCache

try:
    from transformers import initialization as init
except ImportError:  # transformers < 5: plain torch initialisers
    from torch.nn import init

__all__ = ["GatedFWAPreTrainedModel", "GatedFWAModel", "GatedFWAForCausalLM", "causal_lm_loss",
           "left_padding_mask_from_pad_tokens"]

logger = logging.get_logger(__name__)

# transformers renamed the cache field of model outputs from past_key_values to cache (5.2x).
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _resolve_return_dict(return_dict: bool | None, config: GatedFWAConfig) -> bool:
    """return_dict as passed, else config.return_dict (True unless set to False)."""
    return return_dict if return_dict is not None else config.return_dict is not False


def _refuse_attention_weights(output_attentions: bool | None, config: GatedFWAConfig) -> None:
    if output_attentions or (output_attentions is None and getattr(config, "output_attentions", False)):
        raise ValueError(
            "output_attentions=True is not supported: GatedFWA's attention kernels never form the attention "
            "weights (they keep running softmax sums over each window), so there are none to return"
        )


def _selected_hidden_states(output_hidden_states: bool | int | list[int] | None, count: int) -> frozenset[int] | None:
    """The indices of the hidden states to return, out of ``count`` (embeddings, then one per
    block), or None for none. output_hidden_states is a flag or, as transformers also
    accepts, an index or list of indices (negative from the end); the others come back None."""
    if output_hidden_states is None or output_hidden_states is False:
        return None
    if output_hidden_states is True:
        return frozenset(range(count))
    indices = [output_hidden_states] if isinstance(output_hidden_states, int) else list(output_hidden_states)
    if not all(isinstance(i, int) and not isinstance(i, bool) and -count <= i < count for i in indices):
        raise ValueError(
            f"output_hidden_states must be a bool, or an index or list of indices in [-{count}, {count}) of the "
            f"{count} hidden states (embeddings, then one per block), got {output_hidden_states!r}"
        )
    return frozenset(i % count for i in indices)


class GatedFWAMLP(nn.Module):
    """SwiGLU: down(silu(x W_gate) * (x W_up)), no biases."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GatedFWABlock(GradientCheckpointingLayer):
    """Pre-norm transformer block: attention then MLP, each on a residual branch.

    forward(x, rotary, layout=None, cache=None): x [B, T, C] (or [1, N, C] packed by
    ``layout``), rotary the (cos, sin) angles of its positions, -> [B, T, C] (or [1, N, C]).

    Gradient checkpointing (model.gradient_checkpointing_enable(), transformers'
    GradientCheckpointingLayer): in training, a block keeps only its inputs and runs its
    forward again in the backward pass. x and rotary are positional so that the reentrant
    variant of torch.utils.checkpoint sees x as the input that needs a gradient; layout is
    read again unchanged, and a block never holds a cache while checkpointed
    (GatedFWAModel.forward refuses one), so the recomputation repeats the first pass exactly.
    """

    def __init__(self, config: GatedFWAConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.kind = config.layer_kinds[layer_idx]
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # The kind's layer factory (gatedfwa/attention_kinds.py; the built-in ones are in
        # gatedfwa/models/builtin_kinds.py).
        self.attn = attention_kind(self.kind).build_layer(config, layer_idx)
        if not isinstance(self.attn, nn.Module):
            raise TypeError(f"the layer factory of attention kind {self.kind!r} must return an nn.Module, "
                            f"got {type(self.attn).__name__}")
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedFWAMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, rotary, layout=None, cache=None, cu_seqlens=None):
        # cu_seqlens: packed sequences under context parallelism (the whole sequence's offsets).
        packed = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        x = x + self.attn(self.attn_norm(x), layout=layout, cache=cache, rotary=rotary, **packed)
        return x + self.mlp(self.mlp_norm(x))


def resolve_attn_implementation(requested: str | None, model_name: str) -> str:
    """The attn_implementation that a GatedFWA model records when ``requested`` is asked for.

    Every layer computes its attention with gatedfwa's own kernels (the kind of each layer
    comes from config.attention_kinds), whatever is named. So every name transformers knows
    ("eager", "sdpa", "flash_attention_2", "flex_attention", "paged|eager", registered ones
    such as "gatedfwa", ...) is accepted, and "eager" is recorded in config._attn_implementation:
    transformers' name for a model's own attention code, for which it takes no path meant
    for another backend (flash attention's mask handling in generate(), for one). Asking for
    a name other than "eager" or "gatedfwa" logs a warning, once per name.

    Raises ValueError for a name transformers does not know (a typo), listing the known ones.
    """
    if requested is None or requested in ("eager", "gatedfwa"):
        return "eager"
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = {"eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()}
    if not isinstance(requested, str):
        raise ValueError(f"attn_implementation must be a string, one of {sorted(known)}; got {requested!r}")
    # transformers accepts "paged|" before any name (deprecated except for paged|eager) and
    # flash_attention_N whether or not the flash-attn package is installed.
    name = requested.removeprefix("paged|")
    if name not in known and requested not in known and not re.fullmatch(r"flash_attention_\d+", name):
        raise ValueError(
            f"attn_implementation={requested!r} is not an attention implementation transformers knows; "
            f"{model_name} accepts any of {sorted(known)} (its layers run gatedfwa's own kernels whichever is named)"
        )
    logger.warning_once(
        f"{model_name} ignores attn_implementation={requested!r}: every layer computes its attention with "
        "gatedfwa's own kernels (config.attention_kinds chooses the kind), whichever implementation is named"
    )
    return "eager"


class GatedFWAPreTrainedModel(PreTrainedModel):
    config_class = GatedFWAConfig
    config: GatedFWAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GatedFWABlock"]
    _can_compile_fullgraph = True

    def _check_and_adjust_attn_implementation(self, attn_implementation: str | None, *args, **kwargs) -> str:
        # transformers' own check accepts only the backends a model's attention layers call
        # into; these layers call none of them (see resolve_attn_implementation).
        return resolve_attn_implementation(attn_implementation, type(self).__name__)

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # set_attn_implementation() may always change the name (it changes nothing else);
        # transformers' default guesses the answer from this module's source code.
        return True

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel"):
        """Does nothing: GatedFWAConfig.save_pretrained writes the auto_map of every saved
        model itself (see GatedFWAConfig.register_for_auto_class for why transformers' default
        would be wrong here)."""

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) weights; residual output projections (attention o_proj,
        MLP down_proj) scaled by 1 / sqrt(2 * num_hidden_layers) so the residual stream's
        variance does not grow with depth; norms at 1; gate biases at their gate's initial
        value (GatedFWAttention.initial_decay_gate_bias)."""
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        # transformers calls this on children before parents, and skips modules without
        # parameters of their own: every parameter is set from its own module's branch.
        if isinstance(module, GatedFWAttention):
            if module.use_gate:
                init.copy_(module.decay_gate_bias, module.initial_decay_gate_bias())
        elif isinstance(module, nn.Linear):
            residual = getattr(module, "_gatedfwa_residual", False)
            init.normal_(module.weight, mean=0.0, std=residual_std if residual else std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)


class GatedFWAModel(GatedFWAPreTrainedModel):
    """Embedding, blocks and final norm: input_ids -> hidden states [B, T, C]."""

    def __init__(self, config: GatedFWAConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GatedFWABlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # The sequence split across this process group (gatedfwa.models.enable_context_parallel).
        self.context_parallel_group = None
        for block in self.layers:
            # Marks for _init_weights: these take the depth-scaled std.
            block.attn.o_proj._gatedfwa_residual = True
            block.mlp.down_proj._gatedfwa_residual = True
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def new_cache(self) -> WindowCache:
        """An empty decoding cache for this model: per layer what its kind's cache factory
        makes (gatedfwa/attention_kinds.py): a ring buffer of its window for "gatedfwa" and
        "swa" (growing for the window-free kinds "full" and "forgetting"), an NSALayerCache
        for the NSA kinds (its window ring buffer, every key and value, block summaries).
        Raises ValueError for a model with a layer of a kind that has no cache."""
        # The containers make a window cache per window size given; here each layer's cache
        # comes from its kind instead.
        cache = WindowCache([])
        cache.layers = [attention_kind(kind).new_cache(self.config, i) for i, kind in enumerate(self.config.layer_kinds)]
        return cache

    def new_static_cache(self, max_length: int, prefill_chunk_size: int | None = None) -> StaticWindowCache:
        """An empty fixed-shape decoding cache whose position lives on the device, so that a
        decode step compiles with torch.compile(mode="reduce-overhead", fullgraph=True) and
        replays as one CUDA graph (gatedfwa/ops/decode/static_cache.py).

        Args:
            max_length: the longest stream (prompt plus generated tokens) the layers without
                window ("full", "forgetting") hold; windowed layers keep their window.
            prefill_chunk_size: prefill a longer prompt in chunks of this many tokens
                (memory O(window + chunk) per windowed layer); None = one parallel pass.

        Raises ValueError for a model with a layer of a kind that has no static cache (the
        NSA kinds).
        """
        kinds = [attention_kind(kind) for kind in self.config.layer_kinds]
        unsupported = list(dict.fromkeys(f"{kind.name!r} ({kind.description})" for kind in kinds
                                         if not kind.supports_static_cache))
        if unsupported:
            raise ValueError(f"layers of attention kind {', '.join(unsupported)} have no static cache; "
                             "use new_cache()")
        cache = StaticWindowCache([], max_length=max_length, prefill_chunk_size=prefill_chunk_size)
        cache.layers = [kind.new_static_cache(self.config, i, max_length) for i, kind in enumerate(kinds)]
        return cache

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: WindowCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """Hidden states [B, T, C] after the final norm (last_hidden_state), the cache when one
        is used, and with output_hidden_states the num_hidden_layers + 1 hidden states (see
        GatedFWAForCausalLM.forward for the arguments). A tuple of these when return_dict is
        False."""
        return_dict = _resolve_return_dict(return_dict, self.config)
        _refuse_attention_weights(output_attentions, self.config)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seqlen = x.shape[:2]
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be [batch, seqlen] with 1 for tokens and 0 for padding, "
                f"got shape {list(attention_mask.shape)}"
            )
        if cache is not None and not isinstance(cache, WindowCache):
            raise TypeError(
                f"cache must be a gatedfwa.WindowCache (from model.new_cache()), got {type(cache).__name__}"
            )
        if self.context_parallel_group is not None:
            refuse_under_context_parallel(attention_mask=attention_mask, cache=cache, use_cache=use_cache or None)
        if self.training and torch.is_grad_enabled() and any(block.gradient_checkpointing for block in self.layers):
            # The backward pass runs every block again; a cache would take the tokens twice.
            if cache is not None:
                raise ValueError(
                    "a decoding cache cannot be used while gradient checkpointing is on in training (the blocks run "
                    "twice): decode under model.eval() or torch.no_grad(), or call gradient_checkpointing_disable()"
                )
            if use_cache:
                logger.warning_once(
                    "use_cache=True is ignored while gradient checkpointing is on in training: no cache is built "
                    "(model.eval() or torch.no_grad() builds one)"
                )
                use_cache = False
        if use_cache and cache is None:
            cache = self.new_cache()
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layers, the model {len(self.layers)}")
        # Which hidden states to return: embeddings, then one per block (None = none).
        returned = _selected_hidden_states(output_hidden_states, len(self.layers) + 1)

        chunk = getattr(cache, "prefill_chunk_size", None)
        if cache is not None and not cache.holds_tokens and chunk is not None and seqlen > chunk:
            outputs = self._prefill_in_chunks(x, attention_mask, position_ids, cache, chunk, output_hidden_states)
            return outputs if return_dict else outputs.to_tuple()

        layout = None
        # Packed sequences split across a context-parallel group: the offsets of the whole
        # sequence go to every layer; the shard is not repacked.
        shard_cu = None
        if cache is not None and cache.holds_tokens:
            # Decoding: the new tokens follow the cached ones and are all real tokens.
            # generate() passes the mask of the whole stream (ones appended at each step).
            # Its new columns' values are checked only when the mask is on the CPU, where
            # reading them is free; on a GPU the read would make every step wait for the
            # device.
            if attention_mask is not None:
                if attention_mask.shape[0] != batch or attention_mask.shape[1] < seqlen or (
                    attention_mask.device.type == "cpu" and not torch.compiler.is_compiling()
                    and not bool(attention_mask[:, -seqlen:].bool().all())
                ):
                    raise ValueError(
                        "while decoding with a cache, attention_mask must be the stream's [batch, length] mask "
                        "whose new (last) columns are all tokens (1): padding belongs at the left of the prompt"
                    )
            if position_ids is None:
                position_ids = cache[0].token_counts[:, None] + torch.arange(seqlen, device=x.device)
        elif attention_mask is not None:
            layout, x, position_ids, _ = pack_padded(attention_mask, x, position_ids)
        elif self.context_parallel_group is not None and cu_seq_lens_q is not None:
            self._flattened_sequences(x, position_ids, cu_seq_lens_q, cu_seq_lens_k, seq_idx)  # the checks
            shard_cu = torch.as_tensor(cu_seq_lens_q, device=x.device)
            if position_ids is None:
                position_ids = packed_shard_position_ids(shard_cu, seqlen, self.context_parallel_group)
        elif (layout := self._flattened_sequences(x, position_ids, cu_seq_lens_q, cu_seq_lens_k, seq_idx)) is not None:
            x = pack(x, layout)
            position_ids = (default_position_ids(1, x.shape[1], layout.cu_seqlens, x.device) if position_ids is None
                            else pack(position_ids, layout))
        elif position_ids is None:
            position_ids = default_position_ids(batch, seqlen, None, x.device) + shard_start(seqlen, self.context_parallel_group)
        # The rotary angles are the same in every layer: computed once here.
        rotary = rotary_angles(position_ids, self.config.head_dim, self.config.rope_theta)
        # Hidden states in the blocks' layout (packed when there is padding); the last is
        # the final norm's output, as transformers' models return it.
        hidden_states = [] if returned is not None else None
        for i, block in enumerate(self.layers):
            if hidden_states is not None:
                hidden_states.append(x)
            x = block(x, rotary, layout=layout, cache=None if cache is None else cache[i], cu_seqlens=shard_cu)
        x = self.norm(x)
        if layout is not None:
            x = unpack(x, layout)
        if hidden_states is not None:
            if layout is not None:  # back to the caller's [B, T, C], zeros at the padding
                hidden_states = [unpack(h, layout) if j in returned else None for j, h in enumerate(hidden_states)]
            hidden_states.append(x)
            hidden_states = tuple(h if j in returned else None for j, h in enumerate(hidden_states))
        outputs = BaseModelOutputWithPast(last_hidden_state=x, hidden_states=hidden_states, **{_CACHE_FIELD: cache})
        return outputs if return_dict else outputs.to_tuple()

    def _flattened_sequences(self, x, position_ids, cu_seq_lens_q, cu_seq_lens_k, seq_idx):
        """The PackedLayout of rows that hold several sequences back to back (padding-free
        batches, e.g. transformers' DataCollatorWithFlattening), or None: read from
        cu_seq_lens_q/k, else seq_idx, else position_ids that restart (layers/padding.py
        flattened_layout). Each sequence then attends only to itself, as under flash-attention.
        position_ids and seq_idx are read only when given (one host synchronisation); under
        torch.compile only cu_seq_lens_q/k keep the graph whole."""
        if (cu_seq_lens_q is None) != (cu_seq_lens_k is None) or (
                cu_seq_lens_q is not None and not torch.compiler.is_compiling()
                and not torch.equal(torch.as_tensor(cu_seq_lens_q), torch.as_tensor(cu_seq_lens_k))):
            raise ValueError("cu_seq_lens_q and cu_seq_lens_k must be given together and be equal "
                             "(the model attends within each sequence, as many queries as keys)")
        if cu_seq_lens_q is None and seq_idx is None and position_ids is None:
            return None
        if self.context_parallel_group is not None:
            if seq_idx is not None:
                raise ValueError("seq_idx is not supported under context parallelism: give the packed sequences as "
                                 "cu_seq_lens_q/k, the offsets of the whole sequence across the group")
            return None  # positions are the shard's (of each packed sequence with cu_seq_lens_q/k)
        return flattened_layout(x.shape[0], x.shape[1], x.device, position_ids=position_ids,
                                cu_seqlens=cu_seq_lens_q, seq_idx=seq_idx)

    def _prefill_in_chunks(self, x, attention_mask, position_ids, cache, chunk: int,
                           output_hidden_states=None) -> BaseModelOutputWithPast:
        """A prompt x [B, T, C] into an empty cache, ``chunk`` tokens at a time: the first
        chunk by the parallel path, each later one against the cached window (the layers'
        chunked prefill). Attention memory is O(window + chunk) per windowed layer."""
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("chunked prefill (prefill_chunk_size) takes prompts without padding: "
                             "attention_mask must be all ones or None")
        pieces = []
        for start in range(0, x.shape[1], chunk):
            piece = slice(start, start + chunk)
            pieces.append(self(inputs_embeds=x[:, piece], cache=cache, output_hidden_states=output_hidden_states,
                               position_ids=None if position_ids is None else position_ids[:, piece],
                               return_dict=True))
        hidden_states = None
        if pieces[0].hidden_states is not None:
            # The chunks' hidden states, joined along the sequence (None where not asked for).
            hidden_states = tuple(
                None if parts[0] is None else torch.cat(parts, dim=1)
                for parts in zip(*(out.hidden_states for out in pieces))
            )
        return BaseModelOutputWithPast(last_hidden_state=torch.cat([out.last_hidden_state for out in pieces], dim=1),
                                       hidden_states=hidden_states, **{_CACHE_FIELD: cache})


class GatedFWAForCausalLM(GatedFWAPreTrainedModel, GenerationMixin):
    """GatedFWAModel plus the language-modelling head; works with generate()."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # transformers' Trainer then passes num_items_in_batch (the label count of the whole
    # accumulated batch) and leaves the scaling for gradient accumulation to the loss.
    accepts_loss_kwargs = True

    def __init__(self, config: GatedFWAConfig):
        super().__init__(config)
        self.model = GatedFWAModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def new_cache(self) -> WindowCache:
        """An empty decoding cache (see GatedFWAModel.new_cache)."""
        return self.model.new_cache()

    def new_static_cache(self, max_length: int, prefill_chunk_size: int | None = None) -> StaticWindowCache:
        """An empty fixed-shape cache for compiled decoding (see GatedFWAModel.new_static_cache)."""
        return self.model.new_static_cache(max_length, prefill_chunk_size)

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: WindowCache | None = None,
        past_key_values: WindowCache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """
        Args:
            input_ids: [B, T] token ids (or inputs_embeds [B, T, C]).
            attention_mask: [B, T], 1 = token, 0 = padding (left padding for batched prompts).
                When decoding with a filled cache, the mask of the whole stream (as
                generate() passes it) or None; the new tokens are all tokens (padding
                belongs to the prompt; checked for a mask on the CPU, not read on a GPU).
            position_ids: [B, T] rotary positions; default: the rank of each token among its
                row's real tokens (0 for the first). Without attention_mask and cache, positions
                that restart (do not increase) within a row start a new sequence there: rows
                holding several sequences back to back (transformers' DataCollatorWithFlattening)
                attend within each sequence. Reading them costs one host synchronisation.
            labels: [B, T] targets aligned with input_ids; shifted inside (position t predicts
                labels[t + 1]); -100 is ignored. Under context parallelism, this rank's shard of
                them; the loss is then this rank's part (see context_parallel_causal_lm_loss).
            cache: a gatedfwa.WindowCache (``past_key_values`` is the same argument
                under the name older transformers versions use). Empty: the input is a
                prompt, run in parallel, that fills it. Holding tokens: the input holds the
                next tokens, decoded against it (and appended to it).
            use_cache: create a cache when none is given and return it (generate() sets
                this); default False, so training never builds one. Ignored, with a
                warning, while gradient checkpointing is on in training.
            logits_to_keep: compute logits only for the last n positions (0 = all), or for
                the positions in a 1-D index tensor.
            num_items_in_batch: the number of scored labels (labels[:, 1:] != -100) of the
                whole batch that this call is a part of, as transformers' Trainer passes it
                under gradient accumulation; the loss is then this call's sum divided by it,
                so the parts' losses (and gradients) add up to the whole batch's mean.
            output_hidden_states: also return ``hidden_states``: num_hidden_layers + 1
                tensors [B, T, C], the embeddings and each block's output, the last one after
                the final norm (it equals the input of lm_head); padding positions hold 0.
                Default: config.output_hidden_states. An index or list of indices returns
                only those (the others are None).
            output_attentions: True raises ValueError (the kernels never form attention
                weights).
            return_dict: False returns a tuple of the output's fields that are not None, in
                order (loss, logits, cache, hidden_states); default: config.return_dict.
            cu_seq_lens_q, cu_seq_lens_k (keyword): [N + 1] offsets of N sequences packed in the
                flattened [B * T] tokens (equal; DataCollatorWithFlattening with
                return_flash_attn_kwargs=True), instead of reading position_ids; seq_idx
                (keyword): [B, T] the sequence of each token, likewise. max_length_q/k are
                accepted and not needed. Under context parallelism, cu_seq_lens_q/k are the
                offsets of the whole sequence of R * T tokens that input_ids [1, T] is this
                rank's shard of (seq_idx and position_ids that restart are not read there).
            Other keyword arguments go to the loss function (transformers' loss kwargs, e.g.
            shift_labels); it ignores the ones it does not know (e.g. token_type_ids).

        Returns:
            CausalLMOutputWithPast: logits [B, T', vocab] in the model's dtype; loss =
            next-token cross-entropy in nats over labels != -100, computed in float32 by
            transformers' causal-LM loss (self.loss_function): the mean, or the sum divided
            by num_items_in_batch; the cache (field ``cache``, or ``past_key_values`` on older
            transformers); hidden_states when asked for.
        """
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("pass the cache once: cache or past_key_values, not both")
        return_dict = _resolve_return_dict(return_dict, self.config)
        # Where packed sequences lie (padding-free batches); the lengths flash-attention
        # also takes (max_length_q/k) follow from them.
        packing = {name: kwargs.pop(name, None) for name in ("cu_seq_lens_q", "cu_seq_lens_k", "seq_idx")}
        kwargs.pop("max_length_q", None)
        kwargs.pop("max_length_k", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            cache=cache if cache is not None else past_key_values,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
            **packing,
        )
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            kept = hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
        else:
            kept = hidden[:, logits_to_keep]
        logits = self.lm_head(kept)
        loss = None
        if labels is not None:
            if logits.shape[1] != hidden.shape[1]:
                raise ValueError("labels need logits at every position: use logits_to_keep=0")
            if labels.shape != logits.shape[:2]:
                raise ValueError(
                    f"labels must have shape [batch, seqlen] = {list(logits.shape[:2])}, got {list(labels.shape)}")
            group = self.model.context_parallel_group
            if group is None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                          num_items_in_batch=num_items_in_batch, **kwargs)
            else:
                if num_items_in_batch is not None or "shift_labels" in kwargs:
                    raise ValueError(
                        "num_items_in_batch and shift_labels are not supported under context parallelism: the "
                        "loss is this rank's part of the mean over the group (context_parallel_causal_lm_loss)")
                loss = context_parallel_causal_lm_loss(logits, labels, group)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                        **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)})
        return output if return_dict else output.to_tuple()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a transformers DynamicCache: the first forward call
        # (use_cache=True) creates the model's own WindowCache and returns it.
        return False

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length, *args, **kwargs):
        # cache_implementation="static" builds our StaticWindowCache (windowed layers keep
        # their window, the others max_cache_length slots); generate() then compiles the
        # forward around it (the cache is_compileable), as it does for its own static caches.
        if generation_config.cache_implementation == "static" and model_kwargs.get("cache") is None:
            if generation_config.max_cache_len is not None:
                max_cache_length = max(max_cache_length, generation_config.max_cache_len)
            model_kwargs["cache"] = self.new_static_cache(max_cache_length)
            return
        return super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        cache = inputs.get("cache", kwargs.get("cache"))
        if isinstance(cache, StaticWindowCache) and cache.holds_tokens:
            # The stream's mask grows by a column per step; a compiled step would see a new
            # shape each time. Decoding never reads it (the new tokens are all real).
            inputs["attention_mask"] = None
        return inputs

    def _prepare_attention_mask_for_generation(self, inputs_tensor, generation_config, model_kwargs):
        # generate() calls this only when the caller passed no attention_mask. transformers
        # marks every pad token as padding, a pad id inside a prompt too (a NUL byte of a
        # byte-level prompt with pad_token_id=0); only leading pad tokens can be padding here.
        inferred = super()._prepare_attention_mask_for_generation(inputs_tensor, generation_config, model_kwargs)
        return left_padding_mask_from_pad_tokens(inferred)

    def _reorder_cache(self, cache: WindowCache, beam_idx: torch.Tensor) -> WindowCache:
        cache.reorder_cache(beam_idx)
        return cache


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor,
                   num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy (nats) of logits[:, t] [B, T, vocab] against labels[:, t + 1]
    [B, T], -100 ignored, computed in float32 by transformers' causal-LM loss (what
    GatedFWAForCausalLM.forward computes): the mean over the scored labels, or their sum
    divided by num_items_in_batch when given."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape [batch, seqlen] = {list(logits.shape[:2])}, got {list(labels.shape)}")
    return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1], num_items_in_batch=num_items_in_batch)


def left_padding_mask_from_pad_tokens(is_token: torch.Tensor) -> torch.Tensor:
    """The attention mask generate() uses for prompts passed without one.

    Args:
        is_token: [B, T], 0 where a prompt holds the pad token id, 1 elsewhere (what
            transformers infers from pad_token_id).

    Returns:
        [B, T] of the same dtype. Batched prompts are left-padded, so a row's padding is the
        run of pad tokens before its first other token; a pad token after that is a real
        token (a prompt may contain the pad id, e.g. byte 0 of a byte-level prompt with
        pad_token_id=0). A single prompt (B = 1) has no padding: all ones. Without a mask
        nothing tells a leading pad id that is text from padding; pass attention_mask then.
    """
    if is_token.shape[0] == 1:
        return torch.ones_like(is_token)
    return is_token.cummax(dim=1).values
