"""Tell transformers (and PEFT) about gatedfwa once both are imported, in whichever order.

Registering needs transformers (and with it torch) imported, which `import gatedfwa` avoids so
that the command line starts fast. So: if transformers is already imported, register now;
otherwise register right after transformers' own import finishes, from a one-shot import hook
that removes itself. Registering means importing

    gatedfwa.models                                  model_type "gatedfwa" for AutoConfig,
                                                     AutoModel and AutoModelForCausalLM
    gatedfwa.integrations.transformers_attention     attn_implementation="gatedfwa"
    gatedfwa.integrations.transformers_checkpoints   older parameter names load in from_pretrained

each of which registers on import. PEFT is optional and is handled the same way: when (or if)
it is imported,

    gatedfwa.integrations.peft_targets               PEFT's default target_modules for "gatedfwa"
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__all__ = ["register_with_transformers", "register_with_peft", "register_when_transformers_is_imported"]

_REGISTERING_MODULES = (
    "gatedfwa.models",
    "gatedfwa.integrations.transformers_attention",
    "gatedfwa.integrations.transformers_checkpoints",
)
_PEFT_REGISTERING_MODULES = ("gatedfwa.integrations.peft_targets",)


def register_with_transformers() -> None:
    """Register the models and the attention implementation with transformers (idempotent)."""
    for name in _REGISTERING_MODULES:
        importlib.import_module(name)


def register_with_peft() -> None:
    """Register the default PEFT targets for model_type "gatedfwa" (idempotent; needs peft)."""
    for name in _PEFT_REGISTERING_MODULES:
        importlib.import_module(name)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when the package ``package`` is about to be imported, it asks the
    other finders for its spec and wraps the loader so that ``register`` runs after the module
    has executed (the package is complete in sys.modules by then)."""

    def __init__(self, package: str, register):
        self.package = package
        self.register = register

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.package:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding itself
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module
        register = self.register

        def exec_module(module):
            execute(module)
            register()

        spec.loader.exec_module = exec_module
        return spec


def _register_when_imported(package: str, register) -> None:
    """Run ``register`` now if ``package`` is imported, else right after it is."""
    if package in sys.modules:
        register()
    elif not any(isinstance(finder, _RegisterAfterImport) and finder.package == package for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport(package, register))


def register_when_transformers_is_imported() -> None:
    """Register with transformers now if it is imported, else as soon as it is; likewise with
    PEFT (which imports transformers itself, so transformers is registered first)."""
    _register_when_imported("transformers", register_with_transformers)
    _register_when_imported("peft", register_with_peft)
