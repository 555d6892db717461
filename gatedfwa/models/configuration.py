"""GatedFWAConfig: the hyperparameters of a GatedFWA causal language model."""

from __future__ import annotations

import difflib
import functools
import inspect
import os

from transformers import PretrainedConfig

from gatedfwa.attention_kinds import ATTENTION_KINDS, attention_kind
from gatedfwa.ops.gate.registry import DEFAULT_GATE, GATES
from gatedfwa.models.remote_code import AUTO_MAP, write_remote_code

__all__ = ["GatedFWAConfig", "ATTENTION_KINDS", "config_fields"]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class GatedFWAConfig(PretrainedConfig):
    """Configuration of :class:`gatedfwa.models.GatedFWAForCausalLM`.

    Args:
        vocab_size: tokens in the vocabulary.
        hidden_size: model width C.
        intermediate_size: hidden width of the SwiGLU MLP; default 8/3 C rounded up to a
            multiple of 64.
        num_hidden_layers: transformer blocks.
        num_attention_heads: query heads HQ.
        num_key_value_heads: key/value heads H (GQA when H < HQ); default HQ.
        head_dim: D; default C // HQ.
        window_size: keys each query sees, itself included, for the windowed kinds (for the
            NSA kinds: the keys of their sliding branch).
        rope_theta: base of the rotary frequencies.
        attention_kinds: one kind for every layer, or a list with one kind per layer, from
            ATTENTION_KINDS (gatedfwa/attention_kinds.py: "gatedfwa", "swa", "full",
            "forgetting", "nsa", "nsa-gatedfwa", and any kind registered with
            register_attention_kind). E.g. a hybrid with every 4th layer full:
            ["gatedfwa", "gatedfwa", "gatedfwa", "full"] * 3.
        qk_norm: RMSNorm on each query and key head.
        output_gate: sigmoid output gate in the attention layers.
        token_shift: learned mix of the previous token's key and value (attention layers).
        gate: the gate of the gated kinds, a name in gatedfwa.ops.gate.registry.GATES:
            "sharpened" (default; g = logsigmoid(beta a) / beta, beta = 1 + ELU(x W_beta),
            decay_gate_proj [2 HQ, C]) or "forgetting" (g = logsigmoid(a), decay_gate_proj
            [HQ, C]); docs/gate.md. Configs saved without it load as "sharpened".
        gate_init_range: retentions sigmoid(b_g) that the gate biases start at, spread over
            the heads (see gatedfwa.layers.attention).
        nsa_block_size: tokens per block of the NSA kinds, for both the block summaries
            (compressed branch) and the selection (docs/nsa.md).
        nsa_block_counts: blocks each query of an NSA layer selects (block 0 and its own
            block among them). The NSA layers also learn their branch gates
            g_cmp, g_slc, g_swa = sigmoid(x W_branch) per query head ([B, T, HQ] each,
            W_branch [3 HQ, C]; gatedfwa/layers/nsa_attention.py).
        max_position_embeddings: the longest sequence the model is meant for (informational:
            rotary embeddings have no table and the windowed kinds no length limit).
        tie_word_embeddings: share the input embedding with the output projection.
        rms_norm_eps: epsilon of every RMSNorm.
        initializer_range: standard deviation of the initial weights (the residual output
            projections use initializer_range / sqrt(2 * num_hidden_layers)).
    """

    model_type = "gatedfwa"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 768,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        window_size: int | None = 512,
        rope_theta: float = 10000.0,
        attention_kinds: str | list[str] = "gatedfwa",
        qk_norm: bool = False,
        output_gate: bool = False,
        token_shift: bool = False,
        gate: str = DEFAULT_GATE,
        gate_init_range: tuple[float, float] | list[float] = (0.99, 0.999),
        nsa_block_size: int = 64,
        nsa_block_counts: int = 16,
        max_position_embeddings: int = 65536,
        tie_word_embeddings: bool = True,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        **kwargs,
    ):
        _reject_misspelt_fields(kwargs)
        if num_key_value_heads is None:
            num_key_value_heads = num_attention_heads
        if head_dim is None and _is_int(hidden_size) and _is_int(num_attention_heads) and num_attention_heads > 0:
            if hidden_size % num_attention_heads != 0:
                raise ValueError(
                    f"hidden_size ({hidden_size}) must be divisible by num_attention_heads "
                    f"({num_attention_heads}), or give head_dim"
                )
            head_dim = hidden_size // num_attention_heads
        if intermediate_size is None and _is_int(hidden_size):
            intermediate_size = -(-(8 * hidden_size // 3) // 64) * 64
        if isinstance(attention_kinds, tuple):
            attention_kinds = list(attention_kinds)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.window_size = window_size
        self.rope_theta = rope_theta
        self.attention_kinds = attention_kinds
        self.qk_norm = qk_norm
        self.output_gate = output_gate
        self.token_shift = token_shift
        self.gate = gate
        self.gate_init_range = list(gate_init_range)
        self.nsa_block_size = nsa_block_size
        self.nsa_block_counts = nsa_block_counts
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self._check()
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def layer_kinds(self) -> list[str]:
        """The attention kind of every layer (attention_kinds expanded)."""
        if isinstance(self.attention_kinds, str):
            return [self.attention_kinds] * self.num_hidden_layers
        return list(self.attention_kinds)

    def layer_window(self, layer_idx: int) -> int | None:
        """The window of layer ``layer_idx``: window_size for a kind that uses the window
        ("gatedfwa", "swa", the NSA kinds' sliding branch), None otherwise."""
        return self.window_size if attention_kind(self.layer_kinds[layer_idx]).uses_window else None

    def layer_uses_gate(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx``'s kind uses the GatedFWA gate."""
        return attention_kind(self.layer_kinds[layer_idx]).uses_gate

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs):
        """Writes config.json, as transformers does, and beside it the module file that its
        ``auto_map`` names (gatedfwa/models/remote_code.py), so that
        ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads the
        folder in a process that never imported gatedfwa. model.save_pretrained calls this,
        so every saved model (the CLI's checkpoints included) carries both. Other auto_map
        entries already in the config are kept."""
        self.auto_map = {**(getattr(self, "auto_map", None) or {}), **AUTO_MAP}
        write_remote_code(save_directory)
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig"):
        """Does nothing: save_pretrained always writes this config's auto_map itself.

        transformers calls this on a class it loaded through trust_remote_code; the default
        would make every later save copy gatedfwa/models/configuration.py into the folder
        and point auto_map at that copy (a second, stale definition of the class)."""

    def _check(self) -> None:
        """Raise ValueError/TypeError naming the field when a value cannot work."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "nsa_block_size",
                     "nsa_block_counts"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even (rotary embeddings pair channels), got {self.head_dim}")
        kinds = self.attention_kinds
        if isinstance(kinds, str):
            kinds = [kinds]
        elif isinstance(kinds, list):
            if len(kinds) != self.num_hidden_layers:
                raise ValueError(
                    f"attention_kinds has {len(kinds)} entries but num_hidden_layers is "
                    f"{self.num_hidden_layers}: give one kind per layer, or one string for all"
                )
        else:
            raise TypeError(f"attention_kinds must be a string or a list of strings, got {type(kinds).__name__}")
        for kind in kinds:
            if kind not in ATTENTION_KINDS:
                raise ValueError(
                    f"unknown attention kind {kind!r} in attention_kinds; choose from {list(ATTENTION_KINDS)} "
                    "(or register it first: gatedfwa.attention_kinds.register_attention_kind)")
        windowed = [kind for kind in kinds if ATTENTION_KINDS[kind].uses_window]
        if self.window_size is None:
            if windowed:
                raise ValueError(f"window_size must be set (an int >= 1) for the {windowed[0]!r} kind")
        elif not _is_int(self.window_size) or self.window_size < 1:
            raise ValueError(f"window_size must be an int >= 1 (it counts the query itself), got {self.window_size!r}")
        if not isinstance(self.gate, str) or self.gate not in GATES:
            raise ValueError(f"unknown gate {self.gate!r}; choose from {list(GATES)}")
        low_high = self.gate_init_range
        if len(low_high) != 2 or not all(0.0 < float(p) < 1.0 for p in low_high):
            raise ValueError(f"gate_init_range must be two retentions strictly between 0 and 1, got {low_high!r}")
        if not float(self.rope_theta) > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta!r}")


@functools.cache
def config_fields() -> tuple[str, ...]:
    """The names of GatedFWAConfig's own settings (its keyword arguments, in order)."""
    parameters = inspect.signature(GatedFWAConfig.__init__).parameters.values()
    return tuple(p.name for p in parameters if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD)


@functools.cache
def _base_config_keys() -> frozenset[str]:
    """What transformers' PretrainedConfig itself stores (config.json carries these too)."""
    return frozenset(PretrainedConfig().to_dict())


def _reject_misspelt_fields(kwargs: dict) -> None:
    """TypeError for a keyword argument that is a near miss of one of GatedFWAConfig's own
    fields (``hiden_size``). Other unknown keywords pass on to transformers' PretrainedConfig,
    which stores them as attributes: config.json files carry keys of transformers' own (and
    differ between its versions), so only near misses of our names are refused."""
    for name in kwargs:
        if name in _base_config_keys():
            continue
        close = difflib.get_close_matches(name, config_fields(), n=1, cutoff=0.8)
        if close:
            raise TypeError(
                f"GatedFWAConfig got an unknown argument {name!r}; did you mean {close[0]!r}? "
                f"valid fields: {', '.join(config_fields())}"
            )
