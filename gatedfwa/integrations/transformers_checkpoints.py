"""Older GatedFWA checkpoints through `from_pretrained`: parameter names that changed.

The attention layer's decay gate (W_g and W_beta rows, and b_g; gatedfwa/layers/attention.py)
was once called ``attn.gate_proj`` / ``attn.gate_bias``, the same module name as the MLP's
``mlp.gate_proj``, so that PEFT's ``target_modules=["gate_proj"]`` hit both. It is now
``attn.decay_gate_proj`` / ``attn.decay_gate_bias``. Importing this module (``import
gatedfwa`` does, once transformers is imported) registers, with transformers' own
checkpoint conversion mapping for model_type "gatedfwa", renamings of the old keys:

    model.layers.N.attn.gate_proj.weight  ->  model.layers.N.attn.decay_gate_proj.weight
    model.layers.N.attn.gate_bias         ->  model.layers.N.attn.decay_gate_bias

Only keys under ``attn.`` are renamed; ``mlp.gate_proj`` keeps its name.

transformers reverts a registered conversion when it saves (``save_pretrained`` writes the
"original" layout by default), which would write the old names again from a model built
today. These renamings are for loading only: their reverse renames nothing, so a checkpoint
is always written with the current names.
"""

from __future__ import annotations

from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming

__all__ = ["LEGACY_KEY_RENAMES", "register"]

# GatedFWAConfig.model_type, written out: this module is imported right after transformers' own
# import, which may run from inside gatedfwa/models/configuration.py (not yet initialised then).
MODEL_TYPE = "gatedfwa"

# (regular expression of the old key part, its current name). A key matches where the pattern
# is found anywhere in it; the trailing "." and the word end (transformers adds (?!\w) after a
# pattern ending in a letter) keep e.g. "attn.gate_bias" from matching a longer name.
LEGACY_KEY_RENAMES = (
    (r"attn\.gate_proj\.", "attn.decay_gate_proj."),
    (r"attn\.gate_bias", "attn.decay_gate_bias"),
)


class _LoadOnlyRenaming(WeightRenaming):
    """A WeightRenaming applied when loading and not undone when saving: its reverse maps
    the current name to itself."""

    __slots__ = ()  # WeightTransform is slotted; a subclass must be too

    def reverse_transform(self) -> WeightRenaming:
        current = self.target_patterns[0]
        return WeightRenaming(source_patterns=current, target_patterns=current)


def register() -> None:
    """Register the renamings for model_type "gatedfwa" (idempotent; importing this module
    calls it)."""
    register_checkpoint_conversion_mapping(
        MODEL_TYPE,
        [_LoadOnlyRenaming(source_patterns=old, target_patterns=new) for old, new in LEGACY_KEY_RENAMES],
        overwrite=True,
    )


register()
