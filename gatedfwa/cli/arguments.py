"""The checks a command runs before it loads torch and transformers, so that bad arguments
(a number out of range, a path that does not exist, an unknown preset or attention kind)
fail in a fraction of a second instead of after the heavy imports.

The rules themselves live with what they guard and are only called from here:
TrainConfig.validate (gatedfwa/train/config.py), the generation options
(gatedfwa/cli/generation_options.py) and the checkpoint lookup (gatedfwa/train/checkpoint.py),
all importable without torch. ``gatedfwa plot`` checks its arguments inside
gatedfwa/cli/plot.py, before matplotlib loads; main() checks the environment variables
(gatedfwa/environment.py: GATEDFWA_BACKEND, torchrun's numbers) before train and generate.
"""

from __future__ import annotations

from pathlib import Path

from gatedfwa.cli.generation_options import check_generation_options
from gatedfwa.environment import world_size
from gatedfwa.errors import ConfigError
from gatedfwa.train.checkpoint import read_train_record, resolve_checkpoint

__all__ = ["check_train_config", "check_generate_arguments"]


def check_train_config(config) -> None:
    """The checks of a TrainConfig that need neither torch nor the data: its settings (all
    but the model field names, which need transformers), the batch split of a single process,
    and that every --data path exists. train() runs the full checks again."""
    config.validate(model_field_names=False)
    if world_size() == 1:  # several processes: the trainer knows the split
        config.micro_steps(1)
    for raw in config.data or []:
        if not Path(raw).exists():  # the same message as gatedfwa/train/data.py gives
            raise ConfigError(f"--data: no such file or folder: {raw}")


def check_generate_arguments(args) -> None:
    """The options of ``gatedfwa generate`` and its --ckpt (it must be a gatedfwa checkpoint
    with a readable training record)."""
    check_generation_options(args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.cache)
    read_train_record(resolve_checkpoint(args.ckpt, "--ckpt"))
