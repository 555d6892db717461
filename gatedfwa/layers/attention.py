"""GatedFWAttention: the attention layer of a GatedFWA transformer block.

    x [B, T, C]
      -> q = x W_q [B, T, HQ, D],  k = x W_k, v = x W_v [B, T, H, D]
      -> token shift of k and v (optional): mix in the previous token's projection
      -> RMSNorm of q and k per head (optional)
      -> rotary position embedding of q and k
      -> gated window attention: the gate reads x (by default a = x W_g + b_g,
         beta = 1 + ELU(x W_beta), g = logsigmoid(beta a) / beta; ``gate`` picks another
         registered gate), the window keeps the last w keys
      -> sigmoid output gate (optional): o * sigmoid(x W_og)
      -> o W_o [B, T, C]

With the gate off this is plain sliding-window attention (the baseline); with
window_size=None it is full causal attention (gate off) or forgetting attention (gate on).

Gate bias initialisation. At initialisation x W_g and x W_beta are small, so beta ~ 1 and
the per-step retention is exp(g) ~ sigmoid(b_g) (for the "forgetting" gate exactly so). b_g
is set per query head by the gate's GateSpec.bias_init; for both shipped gates the
retentions sigmoid(b_g) are spread from ``gate_init_range[0]`` to ``gate_init_range[1]``
(default 0.99 .. 0.999), geometrically in the decay 1 - sigmoid(b_g) (gate_bias_init): the
heads start with memory horizons of about 100 to 1000 tokens, i.e. little decay inside the
window, and the model learns to forget faster where that helps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from gatedfwa.distributed import context_parallel_gated_window_attention
from gatedfwa.distributed.sequence import (
    packed_shard_position_ids,
    previous_tokens_across_shards,
    refuse_under_context_parallel,
    shard_start,
)
from gatedfwa.layers.norm import RMSNorm
from gatedfwa.layers.padding import PackedLayout, pack_padded, unpack
from gatedfwa.layers.rotary import apply_rotary, rotary_angles
from gatedfwa.ops import (
    MAX_DECODE_LENGTH,
    StaticWindowLayerCache,
    WindowLayerCache,
    decode_gated_window_attention,
    decode_static_step,
    gated_window_attention,
    log_gates_from_projection,
)
from gatedfwa.ops.decode.chunked import prefill_chunk
from gatedfwa.ops.gate.bias_init import gate_bias_init
from gatedfwa.ops.gate import registry
from gatedfwa.ops.gate.spec import GateSpec
from gatedfwa.ops.window_attention.fused_gate import gate_attention_from_projection

__all__ = ["GatedFWAttention", "gate_bias_init"]


def _sequence_starts(seqlen: int, cu_seqlens: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """[T] bool: True where a token has no predecessor in its sequence."""
    if cu_seqlens is None:
        starts = torch.zeros(seqlen, dtype=torch.bool, device=device)
        starts[0] = True
        return starts
    # One spare slot absorbs the starts of empty sequences at the very end.
    starts = torch.zeros(seqlen + 1, dtype=torch.bool, device=device)
    starts[cu_seqlens[:-1].long()] = True
    return starts[:seqlen]


def previous_token(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """The previous token's value at every position: x [B, T, ...] -> [B, T, ...], zero where
    a sequence starts (t = 0, or a cu_seqlens boundary). Decoding takes the previous token
    of its first new token from the cache instead (see GatedFWAttention._forward_decode)."""
    if x.shape[1] == 0:
        return x
    shifted = torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), dim=1)
    starts = _sequence_starts(x.shape[1], cu_seqlens, x.device)
    return shifted.masked_fill(starts.view(1, -1, *([1] * (x.dim() - 2))), 0.0)


def _fusable(*modules: nn.Module) -> bool:
    """True when calling each module computes exactly F.linear(x, module.weight), so that its
    weight may be read directly: a plain torch.nn.Linear (its exact class: a subclass, e.g. a
    LoRA-wrapped or quantised linear, may compute something else) without bias, whose forward
    is the class's own (accelerate's device-map and offload hooks replace the instance's
    forward), and with no hooks that calling it would run. The hook test is the one
    nn.Module.__call__ makes before going straight to forward: the module's own forward and
    backward hooks, and the global ones (torch.nn.modules.module.register_module_*_hook)."""
    if (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
            or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks):
        return False
    return all(
        type(module) is nn.Linear
        and module.bias is None
        and "forward" not in module.__dict__
        and not (module._forward_hooks or module._forward_pre_hooks
                 or module._backward_hooks or module._backward_pre_hooks)
        for module in modules
    )


class GatedFWAttention(nn.Module):
    """Gated sliding-window attention layer (GatedFWA, arXiv 2512.07782).

    Args:
        hidden_size: C, the model width.
        num_heads: HQ, query heads.
        num_kv_heads: H, key/value heads (GQA when H < HQ); HQ % H == 0. Default HQ.
        head_dim: D. Default C // HQ. Must be even (rotary pairs channels).
        window_size: keys each query sees, itself included; None = no window (full causal).
        use_gate: the GatedFWA gate (False: plain softmax attention over the window).
        rope_theta: base of the rotary frequencies.
        qk_norm: RMSNorm of each query and key head before the rotary embedding.
        output_gate: multiply the attention output by sigmoid(x W_og) (per channel).
        token_shift: replace k_t by (1 - m_t) k_t + m_t k_{t-1} and likewise v, with
            per-kv-head mixes m_t = sigmoid(x_t W_shift) learned from the input.
        norm_eps: epsilon of the QK RMSNorm.
        gate_init_range: retentions sigmoid(b_g) the gate bias starts at (see module docstring).
        layer_idx: index of this layer in its model (its slot in a decoding cache).
        gate: the gate parameterisation, a name in gatedfwa.ops.gate.registry.GATES:
            "sharpened" (default; g = logsigmoid(beta a) / beta, beta = 1 + ELU(x W_beta)) or
            "forgetting" (g = logsigmoid(a)). Read only with use_gate.

    Parameters: q_proj, k_proj, v_proj, o_proj (no biases); with the gate, the decay gate's
    decay_gate_proj.weight [n HQ, C], n the gate's inputs per head (the layout
    gated_fwa_attention takes: for the default gate n = 2, rows W_g, the a_t rows, then
    W_beta, the beta rows; for "forgetting" n = 1, W_g) and decay_gate_bias [HQ] (b_g); q_norm, k_norm;
    output_gate_proj [HQ D, C]; shift_proj [2 H, C] (k mixes, then v mixes). The decay gate
    is named apart from the MLP's gate_proj, so that PEFT's target_modules can pick either.
    Checkpoints written before that name (attn.gate_proj, attn.gate_bias) still load through
    from_pretrained (gatedfwa/integrations/transformers_checkpoints.py).

    Every projection runs by calling its module, so wrappers (PEFT's LoRA, quantised linears,
    forward hooks) apply in training, prefill and decoding alike; see _project_with_gate for
    the one fused GEMM plain modules get.

    Extending: the attention itself is three public hooks, attend (no cache), attend_with_gates
    (a prefill) and attend_cached (decoding), plus new_cache. A new mechanism overrides them in
    a subclass and registers a kind (gatedfwa.attention_kinds.register_attention_kind;
    docs/models.md); NSAttention (gatedfwa/layers/nsa_attention.py) is built that way.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        window_size: int | None = None,
        use_gate: bool = True,
        rope_theta: float = 10000.0,
        qk_norm: bool = False,
        output_gate: bool = False,
        token_shift: bool = False,
        norm_eps: float = 1e-6,
        gate_init_range: tuple[float, float] = (0.99, 0.999),
        layer_idx: int | None = None,
        gate: str = registry.DEFAULT_GATE,
    ):
        super().__init__()
        spec = registry.gate_spec(gate)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})"
            )
        if head_dim is None:
            if hidden_size % num_heads != 0:
                raise ValueError(
                    f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}) "
                    f"when head_dim is not given"
                )
            head_dim = hidden_size // num_heads
        if head_dim < 2 or head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even and >= 2 (rotary embeddings pair channels), got {head_dim}")
        if window_size is not None and (isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1):
            raise ValueError(f"window_size must be an int >= 1 or None, got {window_size!r}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.window_size = window_size
        self.use_gate = use_gate
        # The name, not the GateSpec: the module stays plain data for copies and pickling.
        self.gate = spec.name
        self.rope_theta = float(rope_theta)
        self.token_shift = token_shift
        self.gate_init_range = tuple(gate_init_range)
        self.layer_idx = layer_idx
        self.scale = head_dim**-0.5
        # The sequence split across this process group (gatedfwa.models.enable_context_parallel).
        self.context_parallel_group = None

        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        if use_gate:
            self.decay_gate_proj = nn.Linear(hidden_size, spec.inputs_per_head * num_heads, bias=False)
            self.decay_gate_bias = nn.Parameter(self.initial_decay_gate_bias())
        self.q_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.output_gate_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False) if output_gate else None
        self.shift_proj = nn.Linear(hidden_size, 2 * num_kv_heads, bias=False) if token_shift else None

    @property
    def gate_spec(self) -> GateSpec:
        """The GateSpec of this layer's gate (gatedfwa/ops/gate/spec.py)."""
        return registry.gate_spec(self.gate)

    @property
    def gate_width(self) -> int:
        """Columns of the gate projection: the gate's inputs per head times HQ."""
        return self.gate_spec.inputs_per_head * self.num_heads

    def initial_decay_gate_bias(self) -> torch.Tensor:
        """decay_gate_bias's documented initial value [HQ] float32: the gate's bias_init at
        gate_init_range (gate_bias_init for both shipped gates)."""
        return self.gate_spec.bias_init(self.num_heads, self.gate_init_range)

    # ----------------------------------------------------------------------------------
    # Pieces shared by the parallel and the decoding paths
    # ----------------------------------------------------------------------------------

    def _project(self, x: torch.Tensor):
        """x [B, T, C] -> q [B, T, HQ, D], raw k and v [B, T, H, D] (before shift/norm/rotary)."""
        batch, seqlen, _ = x.shape
        q = self.q_proj(x).view(batch, seqlen, self.num_heads, self.head_dim)
        return (q, *self._project_kv(x))

    def _project_kv(self, x: torch.Tensor):
        """x [B, T, C] -> raw k and v [B, T, H, D]."""
        batch, seqlen, _ = x.shape
        k = self.k_proj(x).view(batch, seqlen, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seqlen, self.num_kv_heads, self.head_dim)
        return k, v

    def _project_with_gate(self, x: torch.Tensor):
        """x [B, T, C] -> (q [B, T, HQ, D], raw k, v [B, T, H, D], gate_pre [B, T, n HQ] or None).

        With the gate, W_q and the decay gate's weight (for the default gate [W_g; W_beta]) run
        as one GEMM (HQ D + n HQ output columns) when that is exactly what calling the two
        modules would compute (_fusable): a separate projection to n HQ columns is a skinny GEMM that reads all of
        x again, and its backward adds one more [B, T, C] gradient into x's. q and gate_pre
        are column slices of the one output; q is copied by the rotary embedding anyway, and
        the parameters keep their own names (q_proj, decay_gate_proj).

        Otherwise each module is called. The fused GEMM reads the raw weights, so it would
        silently skip whatever wraps a module: a LoRA adapter (no effect, no gradient), a
        quantised or sharded linear, a forward hook. Decoding calls the modules (_project,
        log_gates), so this fallback is also what keeps prefill and decoding equal."""
        if not self.use_gate:
            return (*self._project(x), None)
        batch, seqlen, _ = x.shape
        if not _fusable(self.q_proj, self.decay_gate_proj):
            q, k, v = self._project(x)
            return q, k, v, self.decay_gate_proj(x)
        q_columns = self.num_heads * self.head_dim
        q_and_gate = F.linear(x, torch.cat((self.q_proj.weight, self.decay_gate_proj.weight)))
        # split, not two slices: its backward writes both gradients into one buffer (a slice's
        # backward would allocate a zero-filled full-width gradient for each).
        q, gate_pre = q_and_gate.split((q_columns, self.gate_width), dim=-1)
        return (q.view(batch, seqlen, self.num_heads, self.head_dim), *self._project_kv(x), gate_pre)

    def _shift(self, x, k, v, k_prev, v_prev):
        """Token shift: mix each raw k, v [B, T, H, D] with the previous token's."""
        mix = torch.sigmoid(self.shift_proj(x)).to(k.dtype)[..., None]  # [B, T, 2H, 1]
        k_mix, v_mix = mix[:, :, : self.num_kv_heads], mix[:, :, self.num_kv_heads :]
        k = k + k_mix * (k_prev - k)
        v = v + v_mix * (v_prev - v)
        return k, v

    def _position_encode(self, q, k, position_ids, rotary=None):
        """QK RMSNorm (optional) then rotary embedding at position_ids [B, T] (or with the
        precomputed (cos, sin) of rotary_angles, when given)."""
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rotary_angles(position_ids, self.head_dim, self.rope_theta) if rotary is None else rotary
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def _finish(self, x, o):
        """o [B, T, HQ, D] -> output [B, T, C]: output gate (optional), then W_o."""
        batch, seqlen = o.shape[:2]
        o = o.reshape(batch, seqlen, self.num_heads * self.head_dim)
        if self.output_gate_proj is not None:
            o = o * torch.sigmoid(self.output_gate_proj(x)).to(o.dtype)
        return self.o_proj(o)

    def log_gates(self, x: torch.Tensor) -> torch.Tensor:
        """The gate alone: x [B, T, C] -> g [B, T, HQ] float32 (<= 0). Used by decoding."""
        return log_gates_from_projection(self.decay_gate_proj(x), self.decay_gate_bias, self.gate)

    # ----------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cache: WindowLayerCache | None = None,
        layout: PackedLayout | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Attention output for x.

        Args:
            hidden_states: x [B, T, C].
            position_ids: [B, T] rotary positions. Default: 0..T-1; with cu_seqlens counted
                from each sequence's start; with attention_mask the rank of each token among
                its row's real tokens; with a filled cache, continuing from the cache.
            attention_mask: [B, T], 1 = token, 0 = padding (any place; left padding when a
                cache is filled). Padding is removed before attention (packed varlen), so
                real tokens see exactly what they would see without it; padding rows of the
                output are 0.
            cu_seqlens: int32 [N + 1] when x packs N sequences along T (B == 1; no cache).
                Under context parallelism, the offsets of the whole sequence of R * T tokens
                that x is this rank's shard of (docs/distributed.md).
            cache: this layer's gatedfwa.WindowLayerCache. Empty: x is a prompt; the
                parallel path runs and fills the cache (prefill). Holding tokens: x holds
                the next tokens (all real): up to MAX_DECODE_LENGTH of them go through the
                decode op, a longer chunk through the parallel op against the cached window
                (chunked prefill). A StaticWindowLayerCache takes the same calls.
            layout: x is already packed ([1, N, C]) from a padded batch with this layout
                (the model packs once for all layers); used instead of attention_mask.
            rotary: (cos, sin) = rotary_angles(position_ids, head_dim, rope_theta), laid out
                like x, when the caller computes them once for several layers; then
                position_ids is not read.

        Returns:
            [B, T, C] in x's dtype.

        The arguments choose one path, once: decoding against a filled cache
        (_forward_decode), a padded batch (_forward_padded: packs, runs the packed path,
        unpacks), packed sequences (_forward_packed) or rows that are one sequence each
        (_forward_dense).
        """
        if self.context_parallel_group is not None:
            # cu_seqlens: the whole sequence's packed sequences (docs/distributed.md).
            refuse_under_context_parallel(attention_mask=attention_mask, layout=layout, cache=cache)
        # holds_tokens, not seen_tokens: a static cache answers from a host flag (its position
        # lives on the device).
        if cache is not None and cache.holds_tokens:
            if attention_mask is not None or cu_seqlens is not None or layout is not None:
                raise ValueError(
                    "decoding against a filled cache takes new tokens without padding: "
                    "attention_mask, cu_seqlens and layout must be None"
                )
            return self._forward_decode(hidden_states, position_ids, cache, rotary)
        if attention_mask is not None:
            if cu_seqlens is not None or layout is not None:
                raise ValueError("pass only one of attention_mask, cu_seqlens and layout")
            return self._forward_padded(hidden_states, attention_mask, position_ids, cache, rotary)
        if layout is not None:
            if cu_seqlens is not None:
                raise ValueError("pass only one of cu_seqlens and layout")
            return self._forward_packed(hidden_states, position_ids, layout.cu_seqlens, cache, layout, rotary)
        if cu_seqlens is not None:
            if cache is not None:
                raise ValueError("a cache is filled from a padded batch (attention_mask), not from cu_seqlens")
            return self._forward_packed(hidden_states, position_ids, cu_seqlens, None, None, rotary)
        return self._forward_dense(hidden_states, position_ids, cache, rotary)

    def _forward_padded(self, x, attention_mask, position_ids, cache, rotary) -> torch.Tensor:
        """A padded batch x [B, T, C] (attention_mask [B, T]): its real tokens packed into
        one row [1, N, C] with their positions (and rotary angles), run as packed sequences,
        put back in place: [B, T, C], zeros at the padding. A mask of ones packs nothing."""
        layout, packed, positions, packed_rotary = pack_padded(attention_mask, x, position_ids, rotary or ())
        if layout is None:
            return self._forward_dense(packed, positions, cache, packed_rotary or None)
        out = self._forward_packed(packed, positions, layout.cu_seqlens, cache, layout, packed_rotary or None)
        return unpack(out, layout)

    def _forward_packed(self, x, position_ids, cu_seqlens, cache, layout, rotary) -> torch.Tensor:
        """Sequences packed back to back, x [1, N, C] with cu_seqlens [S + 1] (from ``layout``
        when x is a padded batch packed, which a cache is filled from) -> [1, N, C]. Default
        positions count from each sequence's start."""
        if position_ids is None and rotary is None:
            if self.context_parallel_group is None:
                position_ids = default_position_ids(x.shape[0], x.shape[1], cu_seqlens, x.device)
            else:
                position_ids = packed_shard_position_ids(cu_seqlens, x.shape[1], self.context_parallel_group)
        return self._forward_parallel(x, position_ids, rotary, cu_seqlens, cache, layout)

    def _forward_dense(self, x, position_ids, cache, rotary) -> torch.Tensor:
        """Rows that are one sequence each, x [B, T, C] -> [B, T, C] (under context
        parallelism: this rank's shard of each, positions from the shard's start)."""
        if position_ids is None and rotary is None:
            batch, seqlen = x.shape[:2]
            position_ids = default_position_ids(batch, seqlen, None, x.device) + shard_start(seqlen, self.context_parallel_group)
        return self._forward_parallel(x, position_ids, rotary, None, cache, None)

    def _forward_parallel(self, x, position_ids, rotary, cu_seqlens, cache, layout) -> torch.Tensor:
        """Every token of x [B, T, C] at once (sequences along T split by cu_seqlens, or one
        per row): projections, token shift, norms and rotary, the attention op, the output
        projection -> [B, T, C]. With an empty cache, it is filled as well (prefill)."""
        q, k_raw, v_raw, gate_pre = self._project_with_gate(x)
        k, v = k_raw, v_raw
        if self.token_shift:
            if self.context_parallel_group is None:
                k_prev, v_prev = previous_token(k, cu_seqlens), previous_token(v, cu_seqlens)
            else:
                k_prev, v_prev = previous_tokens_across_shards([k, v], self.context_parallel_group, cu_seqlens)
            k, v = self._shift(x, k, v, k_prev, v_prev)
        q, k = self._position_encode(q, k, position_ids, rotary)
        if cache is None:
            o = self.attend(q, k, v, x, cu_seqlens, gate_pre)
        else:
            o, g = self.attend_with_gates(q, k, v, x, cu_seqlens, gate_pre)
            self._prefill(cache, layout, k, v, g, k_raw, v_raw)
        return self._finish(x, o)

    # The three attention hooks. A new attention mechanism subclasses this layer and overrides
    # them (NSAttention does): projections, token shift, QK norm, rotary, padding and packing,
    # the cache's prefill and the output projection stay shared. q [B, T, HQ, D] and k, v
    # [B, T, H, D] arrive after shift, norm and rotary; x [B, T, C] is the layer's input (for
    # gates of the layer's own); cu_seqlens splits packed sequences along T (B == 1).

    def attend(self, q, k, v, x, cu_seqlens, gate_pre=None):
        """Attention hook, training and inference without a cache: o [B, T, HQ, D]. Here gated
        (or plain) window attention of the whole sequence; gate_pre [B, T, n HQ] is x's decay
        gate projection from _project_with_gate (None without the gate)."""
        if self.context_parallel_group is not None:  # the gate first, then the op across ranks
            g = self._gates_from_projection(gate_pre)
            return context_parallel_gated_window_attention(
                q, k, v, g, window_size=self.window_size, group=self.context_parallel_group, scale=self.scale,
                cu_seqlens=cu_seqlens,
            )
        if self.use_gate:
            return gate_attention_from_projection(
                q, k, v, gate_pre, self.decay_gate_bias, window_size=self.window_size, scale=self.scale,
                cu_seqlens=cu_seqlens, gate=self.gate,
            )
        return gated_window_attention(q, k, v, None, window_size=self.window_size, scale=self.scale, cu_seqlens=cu_seqlens)

    def attend_with_gates(self, q, k, v, x, cu_seqlens, gate_pre=None):
        """Attention hook of a prefill (a prompt into an empty cache): as attend, also returning
        the log gates g [B, T, HQ] (None without the gate) that the cache keeps: (o [B, T, HQ,
        D], g). The gate is computed once, outside the fused op."""
        g = self._gates_from_projection(gate_pre)
        o = gated_window_attention(q, k, v, g, window_size=self.window_size, scale=self.scale, cu_seqlens=cu_seqlens)
        return o, g

    def _gates_from_projection(self, gate_pre):
        """gate_pre [B, T, n HQ] -> g [B, T, HQ] float32, or None without the gate."""
        return None if gate_pre is None else log_gates_from_projection(gate_pre, self.decay_gate_bias, self.gate)

    def _prefill(self, cache, layout, k, v, g, k_raw, v_raw) -> None:
        """Write a prompt's keys, values and gates into an empty cache, in the padded layout
        it keeps ([B, T, ...], left padding). The token shift state is the last position's
        raw projections (zero for a row without tokens: nothing precedes its next token)."""
        mask = None
        if layout is not None:
            k, v, k_raw, v_raw = (unpack(t, layout) for t in (k, v, k_raw, v_raw))
            g = None if g is None else unpack(g, layout)
            mask = torch.zeros(layout.batch * layout.seqlen, dtype=torch.bool, device=k.device)
            mask[layout.indices] = True
            mask = mask.view(layout.batch, layout.seqlen)
        cache.prefill(k, v, g, attention_mask=mask, num_q_heads=self.num_heads)
        if self.token_shift:
            cache.set_extra_state("shift_k", k_raw[:, -1])
            cache.set_extra_state("shift_v", v_raw[:, -1])

    def _forward_decode(self, x, position_ids, cache, rotary=None) -> torch.Tensor:
        """New tokens x [B, L, C] against a filled cache: up to MAX_DECODE_LENGTH tokens go
        through the decode op, a longer chunk (chunked prefill) through the parallel op on
        [cached window || chunk] keys. With a StaticWindowLayerCache nothing here reads a
        host value that changes from step to step (a compiled step replays as a CUDA graph)."""
        if rotary is None:
            if position_ids is None:
                # Each row continues from the number of real tokens it holds.
                position_ids = cache.token_counts[:, None] + torch.arange(x.shape[1], device=x.device)
            rotary = rotary_angles(position_ids, self.head_dim, self.rope_theta)
        q, k, v = self._project(x)
        if self.token_shift:
            # Every new token is real and follows the cached ones: token 0's predecessor is
            # the cached last token, token i's is new token i - 1 (no sequence starts here,
            # so no mask as in previous_token).
            k_raw, v_raw = k, v
            k_prev = torch.cat((cache.extra_state["shift_k"][:, None], k[:, :-1]), dim=1)
            v_prev = torch.cat((cache.extra_state["shift_v"][:, None], v[:, :-1]), dim=1)
            k, v = self._shift(x, k, v, k_prev, v_prev)
            cache.set_extra_state("shift_k", k_raw[:, -1])
            cache.set_extra_state("shift_v", v_raw[:, -1])
        q, k = self._position_encode(q, k, None, rotary)
        return self._finish(x, self.attend_cached(q, k, v, x, cache))

    def attend_cached(self, q, k, v, x, cache) -> torch.Tensor:
        """Attention hook of decoding: new tokens (q [B, L, HQ, D], k/v [B, L, H, D], after
        shift, norm and rotary) against the cache (the kind's cache_factory's), which takes
        them in: o [B, L, HQ, D]."""
        g = self.log_gates(x) if self.use_gate else None
        static = isinstance(cache, StaticWindowLayerCache)
        # A static ring takes at most W tokens per step (it writes them at distinct slots).
        if q.shape[1] > MAX_DECODE_LENGTH or (static and q.shape[1] > cache.capacity):
            return prefill_chunk(q, k, v, g, cache, self.scale)
        if static:
            return decode_static_step(q, k, v, g, cache, scale=self.scale)
        return decode_gated_window_attention(q, k, v, g, cache, scale=self.scale)

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"window_size={self.window_size}, gate={self.gate if self.use_gate else None}, "
            f"token_shift={self.token_shift}"
        )


def default_position_ids(batch: int, seqlen: int, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    """[B, T] positions 0..T-1, or with cu_seqlens ([1, T]) counted from each sequence's start."""
    positions = torch.arange(seqlen, device=device)
    if cu_seqlens is None:
        return positions[None].expand(batch, seqlen)
    starts = cu_seqlens[:-1].long()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    start_of_token = torch.repeat_interleave(starts, lengths, output_size=seqlen)
    return (positions - start_of_token)[None]
