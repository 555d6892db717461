"""PEFT's default target modules for model_type "gatedfwa".

PEFT picks the layers an adapter wraps from ``config.target_modules``; when that is None it
looks the model's model_type up in a table of defaults and raises for a model_type it does
not know. Importing this module (``import gatedfwa`` does, once peft is imported; see
gatedfwa/transformers_registration.py) adds "gatedfwa" to that table, so that

    get_peft_model(model, LoraConfig(task_type="CAUSAL_LM"))

works on a GatedFWAForCausalLM as it does on a Llama model.

The default is ``["q_proj", "v_proj"]``: what PEFT uses for Llama, Mistral, Qwen2, Gemma and
the other decoders whose attention has the same projections (the choice of the LoRA paper).
A recipe written for those models then adapts the same layers here, and the comparison of
a fine-tuned GatedFWA model with a fine-tuned sliding-window baseline (kind "swa", which has
no decay gate) is like for like. The decay gate (``decay_gate_proj``, the gate's inputs per head x HQ outputs: a LoRA
of rank 8 already matches its full rank for HQ <= 4) and the MLP are left to an explicit
choice: name them in ``target_modules``, or pass ``target_modules="all-linear"`` for every
linear layer but the output head.
"""

from __future__ import annotations

from peft.utils import constants as peft_constants

__all__ = ["DEFAULT_LORA_TARGET_MODULES", "register"]

# GatedFWAConfig.model_type, written out: this module is imported from an import hook, where
# gatedfwa.models may be only partly initialised.
MODEL_TYPE = "gatedfwa"

DEFAULT_LORA_TARGET_MODULES = ["q_proj", "v_proj"]

# PEFT keeps one table per adapter method; most start as copies of LoRA's. "gatedfwa" joins
# every table whose Llama entry is LoRA's, so LoHa, LoKr, VeRA, ... default alike; the
# methods with other rules (IA3 also needs the feed-forward layers, LN tuning norms, ...)
# are left to an explicit target_modules.
_LLAMA = "llama"


def register() -> None:
    """Add the default to PEFT's tables (idempotent; importing this module calls it)."""
    lora_table = peft_constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    for name, table in vars(peft_constants).items():
        if not (name.startswith("TRANSFORMERS_MODELS_TO_") and name.endswith("_TARGET_MODULES_MAPPING")):
            continue
        if table is lora_table or (isinstance(table, dict) and table.get(_LLAMA) == lora_table[_LLAMA]):
            table.setdefault(MODEL_TYPE, list(DEFAULT_LORA_TARGET_MODULES))


register()
