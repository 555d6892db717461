"""gatedfwa: gated sliding-window attention (GatedFWA, arXiv 2512.07782) for PyTorch."""

from gatedfwa.ops.api import flash_gated_window_attention, gated_window_attention

__version__ = "0.1.0"

__all__ = ["gated_window_attention", "flash_gated_window_attention"]

from gatedfwa.ops.gate import compute_log_gates, gated_fwa_attention, log_gates_from_projection  # noqa: E402

__all__ += ["compute_log_gates", "gated_fwa_attention", "log_gates_from_projection"]

# Importing the models registers model_type "gatedfwa" with transformers' AutoConfig,
# AutoModel and AutoModelForCausalLM (so AutoModelForCausalLM.from_pretrained loads saved models).
from gatedfwa.models import GatedFWAConfig, GatedFWAForCausalLM, GatedFWAModel  # noqa: E402

__all__ += ["GatedFWAConfig", "GatedFWAForCausalLM", "GatedFWAModel"]

from gatedfwa.cache import WindowCache, WindowLayerCache  # noqa: E402
from gatedfwa.ops.decode import decode_gated_window_attention  # noqa: E402

__all__ += ["WindowCache", "WindowLayerCache", "decode_gated_window_attention"]

from gatedfwa.integrations import transformers_attention  # noqa: E402,F401  registers attn_implementation="gatedfwa"
