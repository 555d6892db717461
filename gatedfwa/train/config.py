"""The training run's configuration: one flat dataclass, built from a preset, an optional
config file (JSON or TOML with the same keys) and command-line overrides, in that order.

Fields that define what is trained (the model, the data, the batch, the optimizer and its
schedule) must be equal when a run is resumed; fields that only say how long or how often
(``max_steps``, intervals, ``compile``, ``device``, ...) may change on resume.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from gatedfwa.attention_kinds import ATTENTION_KINDS
from gatedfwa.errors import ConfigError

__all__ = ["TrainConfig", "load_config_file", "apply_overrides", "resume_mismatches"]

# May differ between a checkpoint and the run resuming from it.
RESUMABLE_CHANGES = frozenset({
    "max_steps", "eval_interval", "eval_windows", "save_interval", "keep_checkpoints",
    "micro_batch_size", "device", "threads", "compile", "fsdp", "context_parallel", "plot", "progress",
})

# A causal language model predicts token t + 1 from tokens up to t: a window needs two tokens
# to hold one prediction (the loss of a 1-token window is 0 / 0).
MIN_SEQ_LEN = 2


def _model_field_names() -> list[str]:
    """GatedFWAConfig's fields; imported here, not at the top, because it loads transformers."""
    from gatedfwa.models.configuration import config_fields

    return config_fields()


@dataclass
class TrainConfig:
    model: dict = field(default_factory=dict)  # GatedFWAConfig fields (vocab_size comes from the data)
    attention: str | None = None  # overrides model.attention_kinds for every layer when set
    data: list[str] | None = None  # text files/folders or one .bin; None = the standard library
    tokenizer: str | None = None  # None/"byte" = bytes; else a local Hugging Face tokenizer
    hf_dataset: str | None = None
    hf_split: str = "train"
    hf_text_field: str = "text"
    seq_len: int = 256  # tokens per training window (the context)
    batch_size: int = 16  # windows per optimizer step, over all processes
    micro_batch_size: int | None = None  # windows per forward pass and process; None = all
    max_steps: int = 600
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 40
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 100  # steps between held-out evaluations (and one at the end)
    eval_windows: int = 64  # held-out windows of seq_len tokens per evaluation
    save_interval: int = 200  # steps between checkpoints (and one at the end); 0 = end only
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"  # auto = cuda if available, else cpu
    threads: int | None = None  # CPU threads per process (torch intra-op); None = auto (gatedfwa/train/threads.py)
    compile: bool = False
    fsdp: bool = False
    context_parallel: int = 1  # processes each window is split across (sequence shards)
    plot: bool = True  # gatedfwa train draws loss.png in the run folder after train() returns
    progress: bool = True

    @classmethod
    def from_dict(cls, values: dict, source: str) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}; valid settings: {', '.join(sorted(known))}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def model_fields(self, vocab_size: int) -> dict:
        """GatedFWAConfig keyword arguments for this run."""
        fields = dict(self.model)
        if self.attention is not None:
            fields["attention_kinds"] = self.attention
        fields["vocab_size"] = vocab_size
        return fields

    def layer_kinds(self) -> list[str]:
        kinds = self.attention if self.attention is not None else self.model.get("attention_kinds", "gatedfwa")
        if isinstance(kinds, str):
            return [kinds] * int(self.model.get("num_hidden_layers", 1))
        return list(kinds)

    def validate(self, model_field_names: bool = True) -> None:
        """Checks that need no data or model; raises ConfigError naming the setting.
        ``model_field_names=False`` skips the one check that imports transformers (model
        settings that are not GatedFWAConfig fields): the command line runs the rest first,
        before torch loads, so that a bad number fails at once."""
        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")

        for name in ("seq_len", "batch_size", "max_steps", "eval_windows", "keep_checkpoints"):
            positive_int(name)
        if self.seq_len < MIN_SEQ_LEN:
            raise ConfigError(
                f"seq_len must be at least {MIN_SEQ_LEN}, got {self.seq_len}: a causal language model predicts "
                f"each token from the ones before it, so a window needs {MIN_SEQ_LEN} tokens to hold one prediction"
            )
        if self.threads is not None:
            positive_int("threads")
        for name in ("eval_interval", "save_interval", "warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        if self.micro_batch_size is not None:
            positive_int("micro_batch_size")
        positive_int("context_parallel")
        if self.seq_len % self.context_parallel != 0:
            raise ConfigError(
                f"seq_len ({self.seq_len}) must be a multiple of context_parallel ({self.context_parallel}): "
                f"every rank holds an equal shard of each window"
            )
        if self.context_parallel > 1 and self.compile:
            raise ConfigError("--compile is not supported with --context-parallel (the halo exchange runs eagerly)")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if not isinstance(self.model, dict):
            raise ConfigError(f"model must be a table of model settings, got {self.model!r}")
        if "vocab_size" in self.model:
            raise ConfigError("model.vocab_size is set by the tokenizer of the data; remove it")
        unknown = sorted(set(self.model) - set(_model_field_names())) if model_field_names else []
        if unknown:
            valid = [name for name in _model_field_names() if name != "vocab_size"]
            raise ConfigError(
                f"model: unknown setting(s) {', '.join(unknown)}; valid model settings (GatedFWAConfig fields): "
                f"{', '.join(valid)}"
            )
        layers = self.model.get("num_hidden_layers")
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise ConfigError(f"model.num_hidden_layers must be a positive integer, got {layers!r}")
        kinds = self.attention if self.attention is not None else self.model.get("attention_kinds", "gatedfwa")
        if isinstance(kinds, (list, tuple)) and self.attention is None and len(kinds) != layers:
            raise ConfigError(
                f"model.attention_kinds lists {len(kinds)} kinds but model.num_hidden_layers is {layers}: give one per layer"
            )
        if not isinstance(kinds, (str, list, tuple)):
            raise ConfigError(f"attention kinds must be a name or a list of names, got {kinds!r}")
        for kind in self.layer_kinds():
            if kind not in ATTENTION_KINDS:
                source = "--attention" if self.attention is not None else "model.attention_kinds"
                raise ConfigError(f"{source}: unknown attention kind {kind!r}; choose one of: {', '.join(ATTENTION_KINDS)}")
        window = self.model.get("window_size")
        if any(ATTENTION_KINDS[kind].uses_window for kind in self.layer_kinds()):
            if isinstance(window, bool) or not isinstance(window, int) or window < 1:
                raise ConfigError(f"model.window_size must be a positive integer for windowed attention, got {window!r}")
            if window > self.seq_len:
                raise ConfigError(
                    f"model.window_size ({window}) is larger than the context seq_len ({self.seq_len}): "
                    f"a window can see at most the context; lower --window or raise --seq-len"
                )

    def micro_steps(self, world_size: int) -> tuple[int, int]:
        """(micro_batch_size, accumulation steps) for world_size processes; the global batch
        must split evenly."""
        micro = self.micro_batch_size or max(1, self.batch_size // world_size)
        per_step = micro * world_size
        if self.batch_size % per_step:
            raise ConfigError(
                f"batch_size {self.batch_size} must be a multiple of micro_batch_size {micro} x "
                f"{world_size} process(es) = {per_step}"
            )
        return micro, self.batch_size // per_step


def load_config_file(path: str) -> dict:
    """A JSON (``.json``) or TOML (``.toml``) file of TrainConfig settings."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config: no such file: {path}")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix == ".toml":
            try:
                import tomllib  # Python >= 3.11
            except ImportError:  # Python 3.10: the same parser as the package tomli (a dependency there)
                import tomli as tomllib

            values = tomllib.loads(text)
        else:
            values = json.loads(text)
    except ImportError:
        raise ConfigError("--config: TOML files need Python >= 3.11 or the package tomli; use JSON") from None
    except ValueError as error:
        raise ConfigError(f"--config: {path} is not valid {'TOML' if file.suffix == '.toml' else 'JSON'}: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config: {path} must hold a table of settings")
    return values


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if key == "model" and isinstance(value, dict) and isinstance(out.get("model"), dict):
            out["model"] = {**out["model"], **value}
        else:
            out[key] = value
    return out


def apply_overrides(base: dict, *updates: dict) -> dict:
    """Later updates win; a ``model`` table is merged key by key."""
    for update in updates:
        base = _merge(base, update)
    return base


def parse_set_option(text: str) -> dict:
    """``key=value`` or ``model.key=value`` -> a settings dict; the value is read as JSON
    when it parses (numbers, true/false, null, lists), as a string otherwise."""
    if "=" not in text:
        raise ConfigError(f"--set expects KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    if key.startswith("model."):
        return {"model": {key[len("model."):]: value}}
    return {key: value}


def resume_mismatches(saved: TrainConfig, current: TrainConfig) -> list[str]:
    """Human-readable differences that forbid resuming ``saved`` as ``current``."""
    a, b = saved.to_dict(), current.to_dict()
    # Compare the model each would build (--attention folded into attention_kinds).
    a["model"], b["model"] = saved.model_fields(0), current.model_fields(0)
    out = []
    for key in a:
        if key in RESUMABLE_CHANGES or key == "attention":
            continue
        if key == "model":
            for name in sorted(set(a["model"]) | set(b["model"])):
                if a["model"].get(name) != b["model"].get(name):
                    out.append(f"model.{name}: {a['model'].get(name)!r} in the checkpoint, {b['model'].get(name)!r} now")
        elif a[key] != b[key]:
            out.append(f"{key}: {a[key]!r} in the checkpoint, {b[key]!r} now")
    return out
