"""``gatedfwa``: train, generate and plot from the command line.

    gatedfwa train --preset cpu --out runs/cpu          train the CPU default
    gatedfwa generate --ckpt runs/cpu --prompt "def "   stream a sample from a checkpoint
    gatedfwa plot runs/cpu runs/swa                     compare loss curves (runs/cpu/compare.png)

Bad input (missing paths, unknown names, mismatched or damaged checkpoints, ...) ends with a
one-line message and exit status 2; Ctrl-C ends with exit status 130 (training saves a
checkpoint first, generation keeps the text printed so far).
Several processes: ``torchrun --nproc-per-node N -m gatedfwa.cli.main train ...``.

This module imports only light modules at the top, so ``gatedfwa --help`` answers at once;
torch, transformers and the model are imported by the command that runs, after the checks
that need none of them (gatedfwa/cli/arguments.py), so that bad arguments fail at once too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gatedfwa.attention_kinds import ATTENTION_KINDS
from gatedfwa.cli.arguments import check_generate_arguments, check_train_config
from gatedfwa.cli.generation_options import CACHE_CHOICES
from gatedfwa.environment import check_environment, rank
from gatedfwa.errors import ConfigError, Interrupted
from gatedfwa.train.presets import DEFAULT_PRESET, PRESETS

__all__ = ["main", "build_parser"]

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
KINDS_HELP = ", ".join(f"{name} ({kind.description})" for name, kind in ATTENTION_KINDS.items())


def _preset_lines() -> str:
    lines = []
    for name, preset in PRESETS.items():
        m = preset["model"]
        lines.append(
            f"  {name:<9} {m['num_hidden_layers']} layers x {m['hidden_size']} wide, {m['num_attention_heads']} heads, "
            f"window {m['window_size']}, context {preset['seq_len']}, batch {preset['batch_size']}, "
            f"{preset['max_steps']} steps, lr {preset['lr']}"
        )
    return "\n".join(lines)


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a language model (default: the CPU preset on the Python standard library)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Train a GatedFWA (or baseline) causal language model.\n\n"
            "Settings come from a preset, then a --config file, then --set KEY=VALUE and the options below\n"
            "(later wins). Without --data the corpus is this Python's standard library sources (no download),\n"
            "read as bytes; one file in 20 is held out. The run folder gets metrics.jsonl, loss.png and\n"
            "checkpoints/step-N/ (model.safetensors + config.json + training state).\n\n"
            f"Presets:\n{_preset_lines()}\n\n"
            "Several processes (DDP, gloo on CPU / NCCL on GPU): torchrun --nproc-per-node N -m gatedfwa.cli.main train ...\n"
            "The global --batch-size stays the same, so N processes follow the loss curve of one."
        ),
    )
    p.add_argument("--preset", choices=None, metavar="NAME",
                   help=f"starting settings: {', '.join(PRESETS)} (default {DEFAULT_PRESET}; when resuming, the checkpoint's settings)")
    p.add_argument("--config", metavar="FILE", help="JSON or TOML file of settings (TrainConfig keys; a 'model' table of GatedFWAConfig fields) applied on top of the preset")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="one setting, e.g. --set warmup_steps=10 or --set model.num_hidden_layers=2 (repeatable; VALUE read as JSON when it parses)")
    p.add_argument("--out", metavar="DIR", help="run folder (default runs/PRESET; when resuming, the resumed run's folder)")
    p.add_argument("--resume", metavar="PATH", help="continue a run exactly from its newest checkpoint (run folder) or from a checkpoint folder")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds a run: the old run is deleted once the new one has written "
                        "its first checkpoint, and kept if the new one fails or is interrupted before")
    p.add_argument("--max-steps", type=int, metavar="N",
                   help="optimizer steps to train in total, not more steps (may be raised when resuming; a run that "
                        "has them already is left as it is)")
    p.add_argument("--attention", metavar="KIND", help=f"attention kind of every layer: {KINDS_HELP}")
    p.add_argument("--window", type=int, metavar="N", help="attention window in tokens, the query included (model.window_size); at most --seq-len")
    p.add_argument("--seq-len", type=int, metavar="N", help="context: tokens per training window")
    p.add_argument("--batch-size", type=int, metavar="N", help="windows per optimizer step, summed over all processes")
    p.add_argument("--micro-batch-size", type=int, metavar="N", help="windows per forward pass in each process; the rest is gradient accumulation")
    p.add_argument("--lr", type=float, metavar="LR", help="peak learning rate (linear warm-up, cosine decay to 10%%)")
    p.add_argument("--seed", type=int, metavar="N", help="seed of the initialisation and of the data order")
    p.add_argument("--data", nargs="+", metavar="PATH", help="text files and/or folders (read recursively), or one pre-tokenized uint16 .bin file")
    p.add_argument("--tokenizer", metavar="NAME", help="a Hugging Face tokenizer from the local cache or a folder (default: bytes, vocabulary 256)")
    p.add_argument("--hf-dataset", metavar="NAME", help="a Hugging Face dataset from the local cache (needs the 'datasets' package; nothing is downloaded)")
    p.add_argument("--hf-split", metavar="SPLIT", help="split of --hf-dataset (default train)")
    p.add_argument("--hf-text-field", metavar="FIELD", help="text column of --hf-dataset (default text)")
    p.add_argument("--eval-interval", type=int, metavar="N", help="steps between held-out evaluations (0 = only at the end)")
    p.add_argument("--eval-windows", type=int, metavar="N", help="held-out windows scored per evaluation")
    p.add_argument("--save-interval", type=int, metavar="N", help="steps between checkpoints (0 = only at the end)")
    p.add_argument("--keep-checkpoints", type=int, metavar="N", help="how many of the newest checkpoints to keep (default 2)")
    p.add_argument("--device", metavar="DEV", help="auto (default: cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads per process (default: 1 when training on a CPU of at most 2 cores: there 2 "
                        "threads train 1.9x faster while the machine is idle but up to 9x slower once another "
                        "program keeps a core busy; else PyTorch's choice, OMP_NUM_THREADS when set); "
                        "the startup line says how many")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model (opt-in)")
    p.add_argument("--fsdp", action="store_true", default=None, help="with several processes, shard parameters and optimizer state (FSDP2) instead of DDP")
    p.add_argument("--context-parallel", type=int, metavar="N",
                   help="split each window across N processes (context parallelism, windowed kinds only); the processes form N-sized groups, data parallel between groups")
    p.add_argument("--no-plot", dest="plot", action="store_false", default=None, help="do not write loss.png at the end")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar (held-out results are still printed)")
    p.set_defaults(handler=_run_train)


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="stream text from a checkpoint, with tokens/s and cache memory",
        description=(
            "Continue a prompt with a trained model. Text streams to stdout as it is generated (decoding with "
            "the model's bounded window cache); tokens/s and the cache's memory are reported on stderr."
        ),
    )
    p.add_argument("--ckpt", required=True, metavar="PATH", help="a run folder (its newest checkpoint) or a checkpoint folder")
    p.add_argument("--prompt", default="def ", help="text to continue (default %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="tokens to generate (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="sampling temperature; 0 = greedy (default %(default)s)")
    p.add_argument("--top-k", type=int, default=50, metavar="K", help="sample among the K most likely tokens (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="sampling seed (default %(default)s)")
    p.add_argument("--device", default="auto", metavar="DEV", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--cache", default="auto", choices=CACHE_CHOICES,
                   help="static: fixed-shape cache, each step compiled into one CUDA graph on a GPU; dynamic: "
                        "the growing cache, uncompiled; auto (default): static on a GPU, dynamic on the CPU")
    p.set_defaults(handler=_run_generate)


def _add_plot(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="one PNG of the loss curves of one or more runs",
        description=(
            "Plot training (smoothed) and held-out loss in bits per byte/token against training tokens, one colour per run. "
            "Without --out the PNG goes into the first RUN_DIR: loss.png for one run, compare.png for several; "
            "nothing is written to the working directory unasked."
        ),
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (each with a metrics.jsonl)")
    p.add_argument("--out", metavar="FILE",
                   help="PNG file to write, in an existing folder (default: RUN_DIR/loss.png for one run; "
                        "for several, compare.png inside the first run folder)")
    p.add_argument("--smooth", type=int, default=10, metavar="N", help="moving average over N >= 1 steps for the training loss (default %(default)s)")
    p.set_defaults(handler=_run_plot)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gatedfwa",
        description="GatedFWA (gated sliding-window attention) language models: train, generate, plot.",
        epilog="Run 'gatedfwa COMMAND --help' for the options of each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(sub)
    _add_generate(sub)
    _add_plot(sub)
    return parser


# Options copied into TrainConfig fields when given (None = not given).
_TRAIN_OPTIONS = {
    "max_steps": "max_steps", "attention": "attention", "seq_len": "seq_len", "batch_size": "batch_size",
    "micro_batch_size": "micro_batch_size", "lr": "lr", "seed": "seed", "data": "data", "tokenizer": "tokenizer",
    "hf_dataset": "hf_dataset", "hf_split": "hf_split", "hf_text_field": "hf_text_field",
    "eval_interval": "eval_interval", "eval_windows": "eval_windows", "save_interval": "save_interval",
    "keep_checkpoints": "keep_checkpoints", "device": "device", "threads": "threads", "compile": "compile", "fsdp": "fsdp",
    "context_parallel": "context_parallel",
    "plot": "plot", "progress": "progress",
}


def _train_config(args):
    """(TrainConfig, checkpoint to resume or None, out folder) from the parsed options."""
    from gatedfwa.train.checkpoint import read_train_record, resolve_checkpoint, run_dir_of
    from gatedfwa.train.config import TrainConfig, apply_overrides, load_config_file, parse_set_option, resume_mismatches
    from gatedfwa.train.presets import get_preset

    resume = resolve_checkpoint(args.resume, "--resume") if args.resume else None
    saved = TrainConfig.from_dict(read_train_record(resume)["train"], f"{resume}") if resume else None
    if saved is not None and args.preset is None:
        base = saved.to_dict()
    else:
        base = get_preset(args.preset or DEFAULT_PRESET)
    updates = [load_config_file(args.config)] if args.config else []
    updates += [parse_set_option(s) for s in args.settings]
    options = {field: getattr(args, name) for name, field in _TRAIN_OPTIONS.items() if getattr(args, name) is not None}
    if args.window is not None:
        options["model"] = {"window_size": args.window}
    config = TrainConfig.from_dict(apply_overrides(base, *updates, options), "settings")
    if saved is not None:
        differences = resume_mismatches(saved, config)
        if differences:
            raise ConfigError(
                f"--resume: {resume} was trained with another config; these settings differ:\n  "
                + "\n  ".join(differences)
            )
    if args.out:
        out = Path(args.out)
    elif resume is not None:
        out = run_dir_of(resume)
    else:
        out = Path("runs") / (args.preset or DEFAULT_PRESET)
    return config, resume, out


def _run_train(args) -> int:
    config, resume, out = _train_config(args)
    check_train_config(config)  # bad settings fail here, before torch loads
    from gatedfwa.train.trainer import train

    result = train(config, out, resume=resume, overwrite=args.overwrite)
    if rank() != 0:  # under torchrun only the first process reports
        return 0
    if result.already_finished:
        print(f"nothing to do: the run is finished ({result.checkpoint} is step {result.step}, its --max-steps); "
              f"to train further, raise --max-steps: gatedfwa train --resume {args.resume} --max-steps {2 * result.step}")
        return 0
    plot = None
    if config.plot:
        from gatedfwa.cli.plot import PlotUnavailable, plot_runs

        try:
            plot = plot_runs([result.run_dir], result.run_dir / "loss.png")
        except PlotUnavailable as missing:  # the run is saved; only the picture is missing
            plot = f"skipped ({missing})"
    minutes, seconds = divmod(int(round(result.wall_s)), 60)
    print(f"done: {result.step} steps, {result.parameters / 1e6:.2f}M parameters, "
          f"held-out loss {result.heldout_bits:.3f} bits per {result.unit}, {minutes}m{seconds:02d}s")
    print(f"checkpoint: {result.checkpoint}")
    print(f"metrics:    {result.metrics}")
    if plot is not None:
        print(f"plot:       {plot}")
    print(f"sample:     gatedfwa generate --ckpt {result.run_dir} --prompt \"def \"")
    return 0


def _run_generate(args) -> int:
    check_generate_arguments(args)  # bad options and checkpoints fail here, before torch loads
    from gatedfwa.cli.generate import describe, generate_text

    report = generate_text(args.ckpt, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, seed=args.seed, device=args.device, cache=args.cache)
    print(describe(report), file=sys.stderr)
    return 0


def _run_plot(args) -> int:
    from gatedfwa.cli.plot import plot_runs  # checks every argument before matplotlib loads

    path = plot_runs(args.runs, None if args.out is None else Path(args.out), smooth=args.smooth)
    print(f"plot: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gatedfwa`` script; returns 0 or raises SystemExit with the
    status (2: bad input, 130: interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command != "plot":
            check_environment()  # before anything else, and before torch loads
        return args.handler(args)
    except ConfigError as error:
        print(f"gatedfwa {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    except Interrupted as error:
        print(f"gatedfwa {args.command}: {error}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except KeyboardInterrupt:  # Ctrl-C outside the parts that report what they kept (e.g. while loading)
        print(f"gatedfwa {args.command}: interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None


if __name__ == "__main__":
    sys.exit(main())
