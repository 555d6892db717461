"""transformers-compatible GatedFWA language models (and the baselines, by config)."""

from gatedfwa.models.configuration import ATTENTION_KINDS, GatedFWAConfig
from gatedfwa.models.context_parallel import enable_context_parallel
from gatedfwa.models.modeling import GatedFWAForCausalLM, GatedFWAModel, GatedFWAPreTrainedModel

__all__ = ["ATTENTION_KINDS", "GatedFWAConfig", "GatedFWAModel", "GatedFWAForCausalLM", "GatedFWAPreTrainedModel",
           "enable_context_parallel"]


def _register_with_auto_classes() -> None:
    """Make AutoConfig / AutoModel / AutoModelForCausalLM know model_type "gatedfwa"."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(GatedFWAConfig.model_type, GatedFWAConfig, exist_ok=True)
    AutoModel.register(GatedFWAConfig, GatedFWAModel, exist_ok=True)
    AutoModelForCausalLM.register(GatedFWAConfig, GatedFWAForCausalLM, exist_ok=True)


_register_with_auto_classes()
