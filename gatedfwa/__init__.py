"""gatedfwa: gated sliding-window attention (GatedFWA, arXiv 2512.07782) for PyTorch.

The public names below load on first use (PEP 562), so that `import gatedfwa` and the
`gatedfwa` command start without importing torch. transformers learns about gatedfwa as soon
as both are imported, in either order (gatedfwa/transformers_registration.py): model_type
"gatedfwa" for the Auto classes, and attn_implementation="gatedfwa".
"""

from __future__ import annotations

import importlib

from gatedfwa.transformers_registration import register_when_transformers_is_imported

__version__ = "0.1.0"

_EXPORTS = {
    "gated_window_attention": "gatedfwa.ops",
    "flash_gated_window_attention": "gatedfwa.ops",
    "gated_fwa_attention": "gatedfwa.ops",
    "compute_log_gates": "gatedfwa.ops",
    "log_gates_from_projection": "gatedfwa.ops",
    "nsa_attention": "gatedfwa.ops",
    "decode_gated_window_attention": "gatedfwa.ops",
    "use_backend": "gatedfwa.ops",
    "WindowCache": "gatedfwa.ops",
    "WindowLayerCache": "gatedfwa.ops",
    "StaticWindowCache": "gatedfwa.ops",
    "StaticWindowLayerCache": "gatedfwa.ops",
    "decode_static_step": "gatedfwa.ops",
    "MAX_DECODE_LENGTH": "gatedfwa.ops",
    "context_parallel_gated_window_attention": "gatedfwa.distributed",
    "enable_context_parallel": "gatedfwa.models",
    "GatedFWAConfig": "gatedfwa.models",
    "GatedFWAForCausalLM": "gatedfwa.models",
    "GatedFWAModel": "gatedfwa.models",
    "register_attention_kind": "gatedfwa.attention_kinds",
    "unregister_attention_kind": "gatedfwa.attention_kinds",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gatedfwa' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


register_when_transformers_is_imported()
