"""The module file a saved GatedFWA model carries for ``trust_remote_code=True``.

transformers finds a model_type it does not ship in one of two ways: the classes were
registered in this process (``import gatedfwa`` does that), or config.json has an
``auto_map`` naming a module file inside the checkpoint folder, which
``from_pretrained(..., trust_remote_code=True)`` imports. Every GatedFWA checkpoint carries
both: GatedFWAConfig.save_pretrained (which model.save_pretrained calls) writes
REMOTE_CODE_FILE beside config.json and puts AUTO_MAP into it.

The file defines nothing: it imports the classes from the installed gatedfwa package, so a
model loaded through it is the package's own GatedFWAForCausalLM, and the checkpoint never
holds a stale copy of the modelling code. Where gatedfwa is not installed, transformers'
import check names the missing package (``pip install gatedfwa``).
"""

from __future__ import annotations

import os

__all__ = ["REMOTE_CODE_FILE", "AUTO_MAP", "write_remote_code"]

REMOTE_CODE_FILE = "modeling_gatedfwa.py"

_MODULE = REMOTE_CODE_FILE.removesuffix(".py")

# auto class -> "module.Class", as transformers reads config.json's auto_map.
AUTO_MAP = {
    "AutoConfig": f"{_MODULE}.GatedFWAConfig",
    "AutoModel": f"{_MODULE}.GatedFWAModel",
    "AutoModelForCausalLM": f"{_MODULE}.GatedFWAForCausalLM",
}

REMOTE_CODE_SOURCE = '''\
"""GatedFWA model classes for transformers' trust_remote_code=True.

config.json names this file in "auto_map", so that AutoConfig, AutoModel and
AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True) load this checkpoint
without `import gatedfwa` first. The classes come from the installed gatedfwa package
(pip install gatedfwa); nothing is defined here.
"""

from gatedfwa.models import GatedFWAConfig, GatedFWAForCausalLM, GatedFWAModel

__all__ = ["GatedFWAConfig", "GatedFWAModel", "GatedFWAForCausalLM"]
'''


def write_remote_code(save_directory: str | os.PathLike) -> str:
    """Writes REMOTE_CODE_FILE into save_directory (created if missing); returns its path."""
    os.makedirs(save_directory, exist_ok=True)
    path = os.path.join(save_directory, REMOTE_CODE_FILE)
    with open(path, "w", encoding="utf-8") as file:
        file.write(REMOTE_CODE_SOURCE)
    return path
