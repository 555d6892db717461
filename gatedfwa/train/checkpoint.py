"""Checkpoints: the model as ``save_pretrained`` writes it (safetensors + config.json), plus
what an exact resume needs.

Layout of ``RUN/checkpoints/step-0000600/`` (the number counts optimizer steps done):
    config.json, model.safetensors   the model (``GatedFWAForCausalLM.from_pretrained`` loads it)
    tokenizer.json, tokenizer_config.json
                                     the tokenizer (``AutoTokenizer.from_pretrained`` loads it;
                                     none for pre-tokenized data without a named tokenizer)
    train_config.json                the TrainConfig, tokenizer record, data description, step
    training_state.pt                optimizer state, step, tokens seen, RNG states, data position

The data position is the step itself (see gatedfwa/train/data.py), and the learning rate is
a function of the step, so model + optimizer + step + RNG reproduce an uninterrupted run.
A checkpoint is written to a temporary folder and renamed into place, so a crash while
saving never leaves a half-written ``step-*`` folder behind. A file damaged later (a copy
cut short, a full disk) is found when it is read: the loaders here raise a one-line
ConfigError naming the file and the newest earlier checkpoint to use instead. A folder that
holds another kind of model (a config.json whose model_type is not "gatedfwa") is named as such.

torch is imported by the functions that need it, so that the command line finds and checks
the checkpoint a command names before loading torch.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from gatedfwa.errors import ConfigError

__all__ = [
    "save_checkpoint", "resolve_checkpoint", "read_train_record", "check_model_files", "load_model",
    "load_checkpoint_tokenizer", "read_training_state", "apply_training_state", "CHECKPOINTS_DIR",
]

CHECKPOINTS_DIR = "checkpoints"
TRAIN_RECORD = "train_config.json"
TRAINING_STATE = "training_state.pt"
MODEL_FILE = "model.safetensors"
MODEL_INDEX = "model.safetensors.index.json"  # save_pretrained's list of shards, for large models
TOKENIZER_CONFIG = "tokenizer_config.json"  # written by a tokenizer's save_pretrained
FORMAT_VERSION = 1
MODEL_TYPE = "gatedfwa"  # GatedFWAConfig.model_type, written to every checkpoint's config.json


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


def _model_type(folder: Path) -> str | None:
    """The model_type in folder/config.json, or None when there is none to read (a
    damaged config.json is reported when the model is loaded)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config.get("model_type") if isinstance(config, dict) else None


def _check_model_type(folder: Path, option: str) -> None:
    """ConfigError when folder/config.json describes a model other than gatedfwa's."""
    model_type = _model_type(folder)
    if model_type is not None and model_type != MODEL_TYPE:
        raise ConfigError(
            f"{option}: {folder} holds a {model_type!r} model (model_type in its config.json), not a gatedfwa "
            f"checkpoint; gatedfwa checkpoints are written by `gatedfwa train` (RUN/{CHECKPOINTS_DIR}/step-N/)"
        )


def resolve_checkpoint(path: str | Path, option: str = "--ckpt") -> Path:
    """A checkpoint folder, or a run folder (its newest checkpoint); ConfigError for a
    missing path, a folder without a checkpoint, or one holding another kind of model."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{option}: no such checkpoint or run folder: {path}")
    if (p / "config.json").is_file():
        _check_model_type(p, option)
    if _is_checkpoint(p):
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        if (p / "config.json").is_file():  # a gatedfwa model saved without its training record
            raise ConfigError(
                f"{option}: {path} holds a model (config.json) but no {TRAIN_RECORD}, so it is not a checkpoint "
                f"of `gatedfwa train`; load such a folder with GatedFWAForCausalLM.from_pretrained"
            )
        raise ConfigError(
            f"{option}: {path} holds no checkpoint (expected a run folder with {CHECKPOINTS_DIR}/step-*/ "
            f"or a checkpoint folder with {TRAIN_RECORD} and config.json)"
        )
    _check_model_type(latest, option)
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
    import torch

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
                    keep: int, is_main: bool = True, sharded: bool = False, tokenizer=None) -> Path:
    """Writes RUN/checkpoints/step-N (on the main process) and removes all but the newest
    ``keep`` checkpoints. ``model`` is the unwrapped model; with ``sharded`` (FSDP) every
    process must call this (the state is gathered collectively). ``tokenizer``: the
    transformers tokenizer of the data, saved beside the model (None: none is saved)."""
    model_state, optimizer_state = _full_state_dicts(model, optimizer, sharded)
    final = run_dir / CHECKPOINTS_DIR / f"step-{step:07d}"
    if not is_main:
        return final
    import torch

    staging = run_dir / CHECKPOINTS_DIR / f".tmp-step-{step:07d}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar inside the training bar
    if model_state is None:
        model.save_pretrained(staging)
    else:
        model.save_pretrained(staging, state_dict=model_state)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
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


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _damaged(path: Path, option: str, detail: str) -> ConfigError:
    """The one-line error for a checkpoint file that cannot be read, pointing at the newest
    earlier checkpoint of the same run when there is one."""
    checkpoint = path.parent
    earlier = [p for p in _step_dirs(run_dir_of(checkpoint)) if p.name < checkpoint.name]
    advice = f"use an earlier checkpoint: {option} {earlier[-1]}" if earlier else "restore the file or train again"
    return ConfigError(f"{option}: {path} is truncated or corrupt ({detail}); {advice}")


def check_model_files(checkpoint: Path, option: str = "--ckpt") -> None:
    """ConfigError naming the file when the model weights of ``checkpoint`` are missing or
    cut short. Reads only the safetensors headers: safetensors refuses a file whose tensors
    do not fill it exactly, so a truncated file is caught here, before anything is written.
    (A file of the right length with flipped bytes inside a tensor cannot be told apart.)"""
    from safetensors import SafetensorError, safe_open

    index = checkpoint / MODEL_INDEX
    if (checkpoint / MODEL_FILE).is_file() or not index.is_file():
        files = [checkpoint / MODEL_FILE]
    else:
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise _damaged(index, option, _first_line(error)) from None
        files = [checkpoint / name for name in shards]
    for path in files:
        if not path.is_file():
            raise ConfigError(f"{option}: {checkpoint} has no {path.name} (the model weights); "
                              f"use a checkpoint folder written by gatedfwa train")
        try:
            with safe_open(path, framework="pt") as weights:
                weights.keys()
        except (SafetensorError, OSError) as error:
            raise _damaged(path, option, _first_line(error)) from None


def load_model(checkpoint: Path, option: str = "--ckpt", dtype=None):
    """The GatedFWAForCausalLM saved in ``checkpoint``, in ``dtype`` (a torch.dtype; None:
    float32) on the CPU; ConfigError naming the file when config.json or the weights cannot
    be read."""
    import torch
    from transformers.utils import logging as hf_logging

    from gatedfwa.models import GatedFWAForCausalLM

    check_model_files(checkpoint, option)
    hf_logging.disable_progress_bar()  # no "Loading weights" bar in the command's output
    try:
        return GatedFWAForCausalLM.from_pretrained(checkpoint, dtype=torch.float32 if dtype is None else dtype)
    except (OSError, ValueError, TypeError) as error:  # config.json unreadable or holding bad values
        raise ConfigError(f"{option}: cannot load the model in {checkpoint}: {_first_line(error)}") from None


def load_checkpoint_tokenizer(checkpoint: Path, record: dict, option: str = "--ckpt"):
    """The tokenizer ``checkpoint`` was trained with (gatedfwa/text/tokenizer.py): the one saved in
    its files when it has them, else (checkpoints written before tokenizers were saved, and
    pre-tokenized data without one) the one its training record names."""
    from gatedfwa.text.tokenizer import tokenizer_from_spec

    if not (checkpoint / TOKENIZER_CONFIG).is_file():
        return tokenizer_from_spec(record["tokenizer"])
    from transformers import AutoTokenizer

    try:
        pretrained = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - JSON, I/O and tokenizers errors alike mean damaged files
        raise ConfigError(f"{option}: cannot load the tokenizer in {checkpoint}: {type(error).__name__}: "
                          f"{_first_line(error)}") from None
    try:
        return tokenizer_from_spec(record["tokenizer"], pretrained)
    except ConfigError as error:  # files that do not match the record (a byte tokenizer that is not)
        raise ConfigError(f"{option}: the tokenizer in {checkpoint}: {error}") from None


def read_training_state(checkpoint: Path, option: str = "--resume") -> dict:
    """The contents of ``training_state.pt`` (optimizer state, step, tokens seen, RNG
    states), checked to be whole; read before a resumed run writes anything."""
    path = checkpoint / TRAINING_STATE
    if not path.is_file():
        raise ConfigError(f"{option}: {checkpoint} has no {TRAINING_STATE} (a model-only export cannot be resumed)")
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - zip, pickle and I/O errors alike mean the file is damaged
        raise _damaged(path, option, f"torch.load failed: {type(error).__name__}") from None
    if not isinstance(state, dict):
        raise _damaged(path, option, "not a training state")
    if state.get("format") != FORMAT_VERSION:
        raise ConfigError(f"{option}: {path} has format {state.get('format')!r}, this version reads {FORMAT_VERSION}")
    missing = sorted({"step", "tokens_seen", "optimizer", "rng"} - set(state))
    if missing:
        raise _damaged(path, option, f"no {', '.join(missing)} in it")
    return state


def apply_training_state(state: dict, model, optimizer, sharded: bool = False) -> None:
    """Loads the optimizer state and the RNG states of ``read_training_state`` into place."""
    import torch

    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
