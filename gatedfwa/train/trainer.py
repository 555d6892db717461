"""The training loop behind ``gatedfwa train``.

One optimizer step:
    for each of the ``accumulation`` micro-steps:
        rows = this process's block of the step's windows        [micro_batch, seq_len]
        loss = model(rows, labels=rows).loss / accumulation       (mean cross-entropy, nats)
        loss.backward()                                           (DDP averages over processes)
    clip the gradient norm, AdamW step at lr(step), zero the gradients

Every ``eval_interval`` steps (and at the end) the held-out windows are scored; every
``save_interval`` steps (and at the end) a checkpoint is written. All randomness after the
model's initialisation comes from the step number (data) or is absent (no dropout), which is
what makes ``--resume`` exact and N processes equal to one.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gatedfwa.distributed import shard_sequence
from gatedfwa.errors import ConfigError, Interrupted
from gatedfwa.text.tokenizer import tokenizer_from_spec
from gatedfwa.train.checkpoint import (
    apply_training_state, check_model_files, load_model, read_train_record, read_training_state, run_dir_of,
    save_checkpoint,
)
from gatedfwa.train.config import TrainConfig
from gatedfwa.train.data import WindowSampler, heldout_windows, load_corpus
from gatedfwa.train.distributed import DistributedContext, init_context_parallel, init_distributed, wrap_model
from gatedfwa.train.memory import check_training_memory, estimate_training_memory
from gatedfwa.train.metrics import METRICS_FILE, MetricsLog, nats_to_bits
from gatedfwa.train.run_folder import RunFolder, check_run_folder
from gatedfwa.train.threads import choose_threads

__all__ = ["train", "TrainResult", "learning_rate"]


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    metrics: Path
    step: int
    heldout_loss: float  # nats per token
    heldout_bits: float
    unit: str
    wall_s: float
    parameters: int
    already_finished: bool = False  # resumed at max_steps: nothing was trained or written


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at
    ``max_steps``. ``step`` counts steps already done (0 for the first)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _threads(count: int) -> str:
    return "1 CPU thread" if count == 1 else f"{count} CPU threads"


def _autocast(device: torch.device):
    """bf16 autocast on GPUs (weights and optimizer stay float32); float32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _build_model(config: TrainConfig, vocab_size: int, resume: Path | None, special_token_ids: dict):
    from gatedfwa.models import GatedFWAConfig, GatedFWAForCausalLM

    fields = config.model_fields(vocab_size)
    try:
        # pad/bos/eos ids: the tokenizer's (gatedfwa/text/tokenizer.py), as AutoTokenizer and pipeline expect
        model_config = GatedFWAConfig(**fields, **special_token_ids)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model settings: {error}") from None
    if resume is not None:
        model = load_model(resume, "--resume", torch.float32)
        saved = model.config.to_dict()
        wanted = model_config.to_dict()
        differ = [k for k in fields if saved.get(k) != wanted.get(k)]
        if differ:
            raise ConfigError(
                f"--resume: the model in {resume} differs from this run's model in "
                + ", ".join(f"{k} ({saved.get(k)!r} there, {wanted.get(k)!r} here)" for k in differ)
            )
        model.config.update(special_token_ids)  # older checkpoints (no tokenizer files) have none
        model.generation_config.update(**special_token_ids)
        return model
    torch.manual_seed(config.seed)
    return GatedFWAForCausalLM(model_config)


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (and embeddings), none on norms, biases and gains."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: torch.Tensor, micro_batch: int, ctx: DistributedContext) -> float:
    """Mean held-out cross-entropy in nats per predicted token over all ``windows``
    [n, seq_len]; data-parallel replicas split the windows and sum their totals. (With context
    parallelism every rank of a group counts the group's windows and holds a loss whose mean
    over the group is theirs: the group's totals and counts are both multiplied by its size.)"""
    was_training = model.training
    model.eval()
    mine = windows[ctx.data_rank::ctx.data_size]
    total, count = 0.0, 0
    for start in range(0, len(mine), micro_batch):
        rows = mine[start:start + micro_batch].to(ctx.device)
        input_ids, labels = _shard(rows, ctx)
        with _autocast(ctx.device):
            loss = model(input_ids, labels=labels).loss
        predicted = rows.shape[0] * (rows.shape[1] - 1)
        total += float(loss) * predicted
        count += predicted
    model.train(was_training)
    total, count = ctx.sum([total, count])
    return total / count


def _shard(rows: torch.Tensor, ctx: DistributedContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) for this process: the rows, or with context parallelism its shard
    of them (the labels' shift across shards happens in the loss)."""
    if ctx.context_parallel_group is not None:
        rows = shard_sequence(rows, ctx.context_parallel_group)
    return rows, rows


def _finished_run(config: TrainConfig, resume: Path, done: int, started: float) -> TrainResult:
    """The result of resuming a run that already has its max_steps steps: nothing is trained
    or written. ConfigError when max_steps is below the checkpoint's step."""
    if done > config.max_steps:
        raise ConfigError(
            f"--max-steps {config.max_steps} is below the step of the checkpoint to resume ({resume} is step {done}): "
            f"--max-steps counts all the steps of the run, not more steps; for {config.max_steps} more, "
            f"give --max-steps {done + config.max_steps}"
        )
    record = read_train_record(resume)
    return TrainResult(
        run_dir=run_dir_of(resume), checkpoint=resume, metrics=run_dir_of(resume) / METRICS_FILE, step=done,
        heldout_loss=float("nan"), heldout_bits=float("nan"), unit=str(record.get("unit", "token")),
        wall_s=time.time() - started, parameters=int(record.get("parameters", 0)), already_finished=True,
    )


def train(config: TrainConfig, out: Path, resume: Path | None = None, overwrite: bool = False,
          log=None) -> TrainResult:
    """Runs (or resumes) training; returns where everything went. ``resume`` is a
    checkpoint folder (already resolved). ``log(str)`` prints a line (main process only)."""
    started = time.time()
    config.validate()
    ctx = init_distributed(config.device)
    threads_before = torch.get_num_threads()
    try:
        init_context_parallel(ctx, config.context_parallel)
        torch.set_num_threads(choose_threads(config.threads, ctx.device))
        with _tf32_matmuls(ctx.device):
            return _train(config, Path(out), resume, overwrite, ctx, started, log)
    finally:
        torch.set_num_threads(threads_before)  # the thread count is the process's: leave it as found
        ctx.close()


@contextlib.contextmanager
def _tf32_matmuls(device: torch.device):
    """TF32 for float32 matmuls and convolutions on GPUs while training (the weights' float32
    work outside autocast), restored afterwards: the flags are the process's, and a caller
    who trains in a notebook or a test and then checks float32 results must get full float32
    products again."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _train(config, out, resume, overwrite, ctx, started, log) -> TrainResult:
    progress = None  # the tqdm bar, once training starts

    def say(line: str) -> None:
        if not ctx.is_main:
            return
        if log is not None:
            log(line)
        elif progress is not None:
            progress.write(line, file=sys.stderr)  # above the bar, not through it
        else:
            print(line, file=sys.stderr, flush=True)

    # Whatever can refuse the run is checked before the run folder is touched: the settings,
    # the checkpoint to resume, --out, the data, the tokenizer, the model and its memory.
    micro_batch, accumulation = config.micro_steps(ctx.data_size)
    resume_state = None
    if resume is not None:  # damaged checkpoint files are refused before anything is written
        resume_state = read_training_state(resume)
        check_model_files(resume, "--resume")
        if int(resume_state["step"]) >= config.max_steps:
            return _finished_run(config, resume, int(resume_state["step"]), started)
    continuing = resume is not None and out.resolve() == run_dir_of(resume).resolve()
    check_run_folder(out, continuing, overwrite)

    corpus = load_corpus(config.data, config.tokenizer, config.hf_dataset, config.hf_split, config.hf_text_field)
    say(f"data: {corpus.description}; {len(corpus.train):,} training and {len(corpus.heldout):,} held-out {corpus.unit}s")
    sampler = WindowSampler(corpus.train, config.seq_len, config.batch_size, config.seed)
    heldout = heldout_windows(corpus.heldout, config.seq_len, config.eval_windows)

    tokenizer = tokenizer_from_spec(corpus.tokenizer_spec)  # saved with every checkpoint
    model = _build_model(config, corpus.vocab_size, resume, tokenizer.special_token_ids())
    parameters = sum(p.numel() for p in model.parameters())
    needed = estimate_training_memory(model.config, parameters, micro_batch, config.seq_len // config.context_parallel,
                                      ctx.device, sharded_over=ctx.world_size if config.fsdp else 1)
    check_training_memory(needed, ctx.device, micro_batch)
    model = model.to(ctx.device)
    model.train()
    if ctx.context_parallel_group is not None:
        from gatedfwa.models import enable_context_parallel

        try:
            enable_context_parallel(model, ctx.context_parallel_group)
        except ValueError as error:
            raise ConfigError(f"--context-parallel: {error}") from None
    kinds = config.layer_kinds()
    say(
        f"model: {parameters / 1e6:.2f}M parameters, {len(kinds)} layers ({', '.join(sorted(set(kinds)))}), "
        f"window {config.model.get('window_size')}, context {config.seq_len}; "
        f"{ctx.world_size} process(es) on {ctx.device}, {_threads(torch.get_num_threads())}"
        + (" each" if ctx.world_size > 1 else "")
        + (f" ({ctx.data_size} data parallel x {ctx.context_parallel_size} context parallel)" if ctx.mesh else "")
        + f", batch {config.batch_size} x {config.seq_len} tokens "
        f"(micro-batch {micro_batch}, {accumulation} accumulation step(s))"
    )

    network = wrap_model(model, ctx, config.fsdp)
    optimizer = _optimizer(model, config)
    step, tokens_seen = 0, 0
    if resume_state is not None:
        apply_training_state(resume_state, model, optimizer, sharded=config.fsdp and ctx.active)
        step, tokens_seen = int(resume_state["step"]), int(resume_state["tokens_seen"])
        resume_state = None  # the optimizer has taken what it needs; free the rest
        say(f"resumed from {resume} at step {step}")
    if config.compile:
        network = torch.compile(network)

    record = {
        "train": config.to_dict(), "tokenizer": corpus.tokenizer_spec, "unit": corpus.unit,
        "data": corpus.description, "world_size": ctx.world_size, "parameters": parameters,
    }
    # Ready: from here on the run folder is written. Until the run's first checkpoint, an
    # error or Ctrl-C puts the folder back as it was (the old run of an --overwrite included).
    folder = RunFolder(out, continuing)
    if ctx.is_main:
        folder.open()
    ctx.barrier()
    metrics = None
    tokens_per_step = config.batch_size * config.seq_len
    heldout_loss = float("nan")
    evaluated_at = saved_at = None
    checkpoint = resume

    def save() -> Path:
        nonlocal saved_at
        saved_at = step
        path = save_checkpoint(out, step, model, optimizer, record, tokens_seen, config.keep_checkpoints,
                               is_main=ctx.is_main, sharded=config.fsdp and ctx.active, tokenizer=tokenizer.pretrained)
        folder.commit()  # the new run has a checkpoint: an old run set aside can go
        return path

    def run_eval() -> None:
        nonlocal heldout_loss, evaluated_at
        heldout_loss = evaluate(network if config.fsdp and ctx.active else model, heldout, micro_batch, ctx)
        evaluated_at = step
        if metrics is not None:
            metrics.write({"step": step, "tokens": tokens_seen, "heldout_loss": heldout_loss,
                           "heldout_bits": nats_to_bits(heldout_loss), "unit": corpus.unit})
        say(f"step {step}/{config.max_steps}: held-out loss {nats_to_bits(heldout_loss):.3f} bits per {corpus.unit}")

    if ctx.is_main and config.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=config.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
    in_update = False
    try:
        if ctx.is_main:
            previous = run_dir_of(resume) / METRICS_FILE if resume is not None else None
            metrics = MetricsLog(out, resume_step=step if resume is not None else None, previous=previous)
        if step == 0 and config.eval_interval:
            run_eval()
        while step < config.max_steps:
            tick = time.perf_counter()
            lr = learning_rate(config, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = 0.0
            for micro in range(accumulation):
                rows = sampler.rows(step, micro, micro_batch, ctx.data_rank, ctx.data_size).to(ctx.device)
                last = micro == accumulation - 1
                sync = contextlib.nullcontext() if last or not hasattr(network, "no_sync") else network.no_sync()
                with sync:
                    input_ids, labels = _shard(rows, ctx)
                    with _autocast(ctx.device):
                        loss = network(input_ids, labels=labels).loss
                    (loss / accumulation).backward()
                step_loss += float(loss.detach()) / accumulation
            in_update = True
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            in_update = False
            step_loss = ctx.mean(step_loss)
            seconds = time.perf_counter() - tick
            if metrics is not None:
                metrics.write({"step": step, "tokens": tokens_seen, "train_loss": step_loss, "lr": lr,
                               "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / seconds,
                               "elapsed_s": time.time() - started})
            if progress is not None:
                shown = f"{nats_to_bits(step_loss):.3f} bits/{corpus.unit}"
                progress.set_postfix_str(f"loss {shown}, {tokens_per_step / seconds:,.0f} tok/s", refresh=False)
                progress.update(1)
            if config.eval_interval and step % config.eval_interval == 0:
                run_eval()
            if config.save_interval and step % config.save_interval == 0:
                checkpoint = save()
        if evaluated_at != step:
            run_eval()
        if saved_at != step:
            checkpoint = save()
    except KeyboardInterrupt:
        if progress is not None:
            progress.close()
        if folder.replacing:  # Ctrl-C soon after --overwrite: keep the run that was there
            raise Interrupted(f"interrupted at step {step}, before the new run's first checkpoint: the run that "
                              f"was in {out} is back in place and the new one was not kept") from None
        if ctx.world_size == 1 and not in_update and step > 0 and saved_at != step:
            checkpoint = save()
            raise Interrupted(f"interrupted at step {step}; checkpoint saved to {checkpoint}; "
                              f"continue with: gatedfwa train --resume {out}") from None
        if checkpoint is None:
            raise Interrupted(f"interrupted at step {step}, before the first checkpoint: nothing was kept") from None
        raise Interrupted(f"interrupted at step {step}; last checkpoint: {checkpoint}") from None
    finally:
        if progress is not None:
            progress.close()
        if metrics is not None:
            metrics.close()
        if ctx.is_main and not folder.committed:  # stopped before this run's first checkpoint
            folder.roll_back()
    ctx.barrier()
    return TrainResult(
        run_dir=out, checkpoint=checkpoint, metrics=out / "metrics.jsonl", step=step,
        heldout_loss=heldout_loss, heldout_bits=nats_to_bits(heldout_loss), unit=corpus.unit,
        wall_s=time.time() - started, parameters=parameters,
    )
