"""Tell transformers about gatedfwa once both are imported, in whichever order.

Registering needs transformers (and with it torch) imported, which `import gatedfwa` avoids so
that the command line starts fast. So: if transformers is already imported, register now;
otherwise register right after transformers' own import finishes, from a one-shot import hook
that removes itself. Registering means importing

    gatedfwa.models                                  model_type "gatedfwa" for AutoConfig,
                                                     AutoModel and AutoModelForCausalLM
    gatedfwa.integrations.transformers_attention     attn_implementation="gatedfwa"
    gatedfwa.integrations.transformers_checkpoints   older parameter names load in from_pretrained

each of which registers on import.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__all__ = ["register_with_transformers", "register_when_transformers_is_imported"]

_REGISTERING_MODULES = (
    "gatedfwa.models",
    "gatedfwa.integrations.transformers_attention",
    "gatedfwa.integrations.transformers_checkpoints",
)


def register_with_transformers() -> None:
    """Register the models and the attention implementation with transformers (idempotent)."""
    for name in _REGISTERING_MODULES:
        importlib.import_module(name)


class _RegisterAfterTransformersImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when "transformers" is about to be imported, it asks the other
    finders for its spec and wraps the loader so that registration runs after the module has
    executed (transformers is complete in sys.modules by then)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding itself
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            register_with_transformers()

        spec.loader.exec_module = exec_module
        return spec


def register_when_transformers_is_imported() -> None:
    """Register now if transformers is imported, else as soon as it is."""
    if "transformers" in sys.modules:
        register_with_transformers()
    elif not any(isinstance(finder, _RegisterAfterTransformersImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTransformersImport())
