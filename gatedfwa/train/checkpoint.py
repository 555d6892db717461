"""Checkpoints: the model as ``save_pretrained`` writes it (safetensors + config.json), plus
what an exact resume needs.

Layout of ``RUN/checkpoints/step-0000600/`` (the number counts optimizer steps done):
    config.json, model.safetensors   the model (``GatedFWAForCausalLM.from_pretrained`` loads it)
    train_config.json                the TrainConfig, tokenizer record, data description, step
    training_state.pt                optimizer state, step, tokens seen, RNG states, data position

The data position is the step itself (see gatedfwa/train/data.py), and the learning rate is
a function of the step, so model + optimizer + step + RNG reproduce an uninterrupted run.
A checkpoint is written to a temporary folder and renamed into place, so a crash while
saving never leaves a half-written ``step-*`` folder behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from gatedfwa.train.errors import ConfigError

__all__ = ["save_checkpoint", "resolve_checkpoint", "read_train_record", "load_training_state", "CHECKPOINTS_DIR"]

CHECKPOINTS_DIR = "checkpoints"
TRAIN_RECORD = "train_config.json"
TRAINING_STATE = "training_state.pt"
FORMAT_VERSION = 1


def _is_checkpoint(path: Path) -> bool:
    return (path / TRAIN_RECORD).is_file() and (path / "config.json").is_file()


def _step_dirs(run_dir: Path) -> list[Path]:
    folder = run_dir / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    dirs = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit() and _is_checkpoint(p)]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = _step_dirs(run_dir)
    return dirs[-1] if dirs else None


def resolve_checkpoint(path: str | Path, option: str = "--ckpt") -> Path:
    """A checkpoint folder, or a run folder (its newest checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{option}: no such checkpoint or run folder: {path}")
    if _is_checkpoint(p):
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise ConfigError(
            f"{option}: {path} holds no checkpoint (expected a run folder with {CHECKPOINTS_DIR}/step-*/ "
            f"or a checkpoint folder with {TRAIN_RECORD} and config.json)"
        )
    return latest


def run_dir_of(checkpoint: Path) -> Path:
    """RUN for RUN/checkpoints/step-N."""
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS_DIR else checkpoint


def read_train_record(checkpoint: Path) -> dict:
    try:
        record = json.loads((checkpoint / TRAIN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read {checkpoint / TRAIN_RECORD}: {error}") from None
    if not isinstance(record, dict) or "train" not in record or "tokenizer" not in record:
        raise ConfigError(f"{checkpoint / TRAIN_RECORD} is not a gatedfwa training record")
    return record


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _full_state_dicts(model, optimizer, sharded: bool):
    """(model state, optimizer state) as full (unsharded) dicts; collective under FSDP."""
    if not sharded:
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def save_checkpoint(run_dir: Path, step: int, model, optimizer, record: dict, tokens_seen: int,
                    keep: int, is_main: bool = True, sharded: bool = False) -> Path:
    """Writes RUN/checkpoints/step-N (on the main process) and removes all but the newest
    ``keep`` checkpoints. ``model`` is the unwrapped model; with ``sharded`` (FSDP) every
    process must call this (the state is gathered collectively)."""
    model_state, optimizer_state = _full_state_dicts(model, optimizer, sharded)
    final = run_dir / CHECKPOINTS_DIR / f"step-{step:07d}"
    if not is_main:
        return final
    staging = run_dir / CHECKPOINTS_DIR / f".tmp-step-{step:07d}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar inside the training bar
    if model_state is None:
        model.save_pretrained(staging)
    else:
        model.save_pretrained(staging, state_dict=model_state)
    torch.save(
        {
            "format": FORMAT_VERSION,
            "step": step,
            "tokens_seen": tokens_seen,
            "optimizer": optimizer_state,
            "rng": _rng_state(),
            "data": {"sampler": "WindowSampler", "next_step": step},
        },
        staging / TRAINING_STATE,
    )
    (staging / TRAIN_RECORD).write_text(json.dumps({**record, "step": step}, indent=2) + "\n", encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    for old in _step_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_state(checkpoint: Path, model, optimizer, sharded: bool = False) -> dict:
    """Loads the optimizer state and RNG states into place; returns the state dict (step,
    tokens_seen, data position)."""
    path = checkpoint / TRAINING_STATE
    if not path.is_file():
        raise ConfigError(f"--resume: {checkpoint} has no {TRAINING_STATE} (a model-only export cannot be resumed)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT_VERSION:
        raise ConfigError(f"--resume: {path} has format {state.get('format')!r}, this version reads {FORMAT_VERSION}")
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state
