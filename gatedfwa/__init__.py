"""gatedfwa: gated sliding-window attention (GatedFWA, arXiv 2512.07782) for PyTorch."""

from gatedfwa.ops import (
    MAX_DECODE_LENGTH,
    WindowCache,
    WindowLayerCache,
    compute_log_gates,
    decode_gated_window_attention,
    flash_gated_window_attention,
    gated_fwa_attention,
    gated_window_attention,
    log_gates_from_projection,
    nsa_attention,
)

__version__ = "0.1.0"

# Importing the models registers model_type "gatedfwa" with transformers' AutoConfig,
# AutoModel and AutoModelForCausalLM (so AutoModelForCausalLM.from_pretrained loads saved models).
from gatedfwa.models import GatedFWAConfig, GatedFWAForCausalLM, GatedFWAModel  # noqa: E402

__all__ = [
    "gated_window_attention",
    "flash_gated_window_attention",
    "gated_fwa_attention",
    "compute_log_gates",
    "log_gates_from_projection",
    "nsa_attention",
    "decode_gated_window_attention",
    "WindowCache",
    "WindowLayerCache",
    "MAX_DECODE_LENGTH",
    "GatedFWAConfig",
    "GatedFWAForCausalLM",
    "GatedFWAModel",
]
