"""Named starting points for ``gatedfwa train --preset NAME``.

Each preset is a partial :class:`gatedfwa.train.config.TrainConfig` (a dict of its fields; the
``model`` entry holds GatedFWAConfig fields). ``vocab_size`` is never set here: it comes from
the tokenizer of the data.

* ``cpu``: the default. Sized so that on 2 CPU cores the run (data loading, training and
  held-out evaluation) ends within 10 minutes and its held-out loss on the standard-library
  corpus falls below 3.0 bits per byte.
* ``tiny``: a few-second smoke run (tests, checking an installation).
* ``gpu-20m`` and ``gpu-125m``: about 20M and 125M parameters (with the 256-byte
  vocabulary), bf16 autocast on one or more GPUs (``torchrun``).
"""

from __future__ import annotations

import copy

from gatedfwa.errors import ConfigError

__all__ = ["PRESETS", "DEFAULT_PRESET", "get_preset"]

DEFAULT_PRESET = "cpu"

PRESETS: dict[str, dict] = {
    "cpu": {
        "model": {
            "hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 4,
            "num_attention_heads": 3, "num_key_value_heads": 3, "head_dim": 64,
            "window_size": 64, "rope_theta": 10000.0, "attention_kinds": "gatedfwa",
        },
        "seq_len": 256, "batch_size": 16, "max_steps": 300, "lr": 3e-3, "warmup_steps": 30,
        "eval_interval": 50, "eval_windows": 64, "save_interval": 100,
    },
    "tiny": {
        "model": {
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
            "window_size": 16, "rope_theta": 10000.0, "attention_kinds": "gatedfwa",
        },
        "seq_len": 64, "batch_size": 8, "max_steps": 20, "lr": 3e-3, "warmup_steps": 5,
        "eval_interval": 10, "eval_windows": 16, "save_interval": 10,
    },
    "gpu-20m": {
        "model": {
            "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 6,
            "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 64,
            "window_size": 512, "rope_theta": 10000.0, "attention_kinds": "gatedfwa",
        },
        "seq_len": 2048, "batch_size": 64, "micro_batch_size": 32, "max_steps": 5000, "lr": 1.5e-3,
        "warmup_steps": 200, "eval_interval": 250, "eval_windows": 256, "save_interval": 1000,
    },
    "gpu-125m": {
        "model": {
            "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 18,
            "num_attention_heads": 12, "num_key_value_heads": 12, "head_dim": 64,
            "window_size": 1024, "rope_theta": 10000.0, "attention_kinds": "gatedfwa",
        },
        "seq_len": 4096, "batch_size": 64, "micro_batch_size": 8, "max_steps": 10000, "lr": 6e-4,
        "warmup_steps": 500, "eval_interval": 500, "eval_windows": 512, "save_interval": 1000,
    },
}


def get_preset(name: str) -> dict:
    """A deep copy of the named preset (callers may modify it)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
