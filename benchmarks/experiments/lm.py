"""Language models for the experiments: trained the way ``gatedfwa train`` trains them, with
more recorded along the way, and shared between experiments run in one process.

``train_lm(spec)`` follows ``gatedfwa.train.trainer.train`` step for step: the same corpus
(``load_corpus``), data order (``WindowSampler``, seeded by (seed, step)), held-out windows
(``heldout_windows``), initialisation (``torch.manual_seed(seed)`` then the model), AdamW
groups, schedule (``learning_rate``), bf16 autocast on GPUs and gradient clipping; the
training losses are the trainer's bit for bit (tests/experiments/test_quick.py checks it).
On top it records per-layer gradient norms (before clipping) and, at every evaluation, the
distribution of the learned gates. It writes no checkpoint: the model stays in memory.

A spec is a dict:

    {"train": {TrainConfig fields: data, seq_len, batch_size, micro_batch_size, max_steps,
               lr, warmup_steps, eval_interval, eval_windows, ...},
     "model": {GatedFWAConfig fields but attention_kinds and vocab_size},
     "kind": "gatedfwa", "seed": 0, "grad_log_interval": 10, "device": "auto",
     "compile": False}

Trained models are cached by their spec, so experiments that ask for the same model (e.g.
lm_equal_tokens, context_use and memory_gradient_flow) train it once per process.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

import kit  # noqa: F401  (puts the checkout on sys.path)

from gatedfwa.models import GatedFWAConfig, GatedFWAForCausalLM
from gatedfwa.train.config import TrainConfig
from gatedfwa.train.data import Corpus, WindowSampler, heldout_windows, load_corpus
from gatedfwa.train.trainer import learning_rate

GATE_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)

_CORPORA: dict[str, Corpus] = {}
_TRAINED: dict[str, "TrainedLM"] = {}


def corpus_for(train: dict) -> Corpus:
    """The corpus a spec's train settings name (loaded once per process)."""
    key = json.dumps([train.get("data"), train.get("tokenizer")])
    if key not in _CORPORA:
        _CORPORA[key] = load_corpus(train.get("data"), train.get("tokenizer"))
    return _CORPORA[key]


def train_config(spec: dict) -> TrainConfig:
    """The TrainConfig of a spec (validated by the library's own checks)."""
    config = TrainConfig(**{**spec["train"], "model": dict(spec["model"]), "attention": spec["kind"],
                            "seed": spec["seed"], "plot": False, "progress": False})
    config.validate()
    return config


def build_model(spec: dict, vocab_size: int) -> GatedFWAForCausalLM:
    """The model at initialisation: what the trainer builds for this spec."""
    config = train_config(spec)
    torch.manual_seed(config.seed)
    return GatedFWAForCausalLM(GatedFWAConfig(**config.model_fields(vocab_size)))


def autocast(device: torch.device):
    """bf16 autocast on GPUs, float32 on the CPU (as the trainer)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _optimizer(model, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the trainer's groups: decay on matrices, none on vectors."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=config.lr, betas=(config.beta1, config.beta2))


@dataclass
class TrainedLM:
    spec: dict
    model: GatedFWAForCausalLM  # eval mode, on the training device
    corpus: Corpus
    device: torch.device
    history: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# What is recorded during training
# --------------------------------------------------------------------------------------


def _layer_parameter_groups(model: GatedFWAForCausalLM) -> dict[str, list[list[torch.nn.Parameter]]]:
    """Per decoder layer, its attention and MLP parameters."""
    layers = model.model.layers
    return {
        "attention": [list(block.attn.parameters()) + list(block.attn_norm.parameters()) for block in layers],
        "mlp": [list(block.mlp.parameters()) + list(block.mlp_norm.parameters()) for block in layers],
    }


def gradient_norms(model: GatedFWAForCausalLM) -> dict:
    """L2 norms of the current gradients: per layer (attention, MLP), the embedding and all
    parameters. One host synchronisation."""
    def norm(params):
        grads = [p.grad.float().norm() for p in params if p.grad is not None]
        return torch.stack(grads).norm() if grads else torch.zeros((), device=next(model.parameters()).device)

    groups = _layer_parameter_groups(model)
    values = [norm(ps) for ps in groups["attention"]] + [norm(ps) for ps in groups["mlp"]]
    values += [norm([model.model.embed_tokens.weight]), norm(list(model.parameters()))]
    numbers = torch.stack(values).tolist()
    count = len(groups["attention"])
    return {"attention": numbers[:count], "mlp": numbers[count:2 * count], "embedding": numbers[-2], "total": numbers[-1]}


class AttentionInputs:
    """Forward hooks that keep the input of every attention layer ([B, T, C], after its
    norm) during one forward pass: ``with AttentionInputs(model) as seen: model(x)``."""

    def __init__(self, model: GatedFWAForCausalLM):
        self.layers = [block.attn for block in model.model.layers]
        self.inputs: list[torch.Tensor | None] = [None] * len(self.layers)
        self._handles = []

    def __enter__(self):
        for index, layer in enumerate(self.layers):
            def keep(module, args, kwargs, index=index):
                self.inputs[index] = (args[0] if args else kwargs["hidden_states"]).detach()
            self._handles.append(layer.register_forward_pre_hook(keep, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@torch.no_grad()
def gate_statistics(model: GatedFWAForCausalLM, rows: torch.Tensor, device: torch.device) -> list[dict | None]:
    """Per layer (None for a layer without gate): quantiles of the per-step retention
    exp(g) over tokens and heads of ``rows``, and each head's median retention."""
    model.eval()
    with AttentionInputs(model) as seen, autocast(device):
        model(rows.to(device))
    stats = []
    for layer, x in zip(seen.layers, seen.inputs):
        if not layer.use_gate:
            stats.append(None)
            continue
        retention = torch.exp(layer.log_gates(x).float())  # [B, T, HQ]
        flat = retention.flatten()
        if flat.numel() > 2**24:  # torch.quantile's input limit
            flat = flat[torch.randperm(flat.numel(), device=flat.device)[:2**24]]
        quantiles = torch.quantile(flat, torch.tensor(GATE_QUANTILES, device=flat.device)).tolist()
        per_head = retention.flatten(0, 1).median(dim=0).values.tolist()
        stats.append({"retention_quantiles": dict(zip([str(q) for q in GATE_QUANTILES], quantiles)),
                      "head_median_retention": per_head})
    return stats


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


@torch.no_grad()
def position_losses(model: GatedFWAForCausalLM, windows: torch.Tensor, micro_batch: int,
                    device: torch.device) -> np.ndarray:
    """Mean cross-entropy (nats) of predicting token t + 1 at every position t of the
    windows [n, L]: float64 [L - 1], averaged over the windows."""
    model.eval()
    total = torch.zeros(windows.shape[1] - 1, dtype=torch.float64, device=device)
    for start in range(0, len(windows), micro_batch):
        rows = windows[start:start + micro_batch].to(device)
        with autocast(device):
            logits = model(rows).logits
        losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), rows[:, 1:], reduction="none")
        total += losses.double().sum(dim=0)
    return (total / len(windows)).cpu().numpy()


def heldout_loss(model, windows: torch.Tensor, micro_batch: int, device: torch.device) -> float:
    """Mean held-out cross-entropy (nats per predicted token), as the trainer's evaluate."""
    return float(position_losses(model, windows, micro_batch, device).mean())


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def train_lm(spec: dict, log=None) -> TrainedLM:
    """Trains the model of ``spec`` (or returns the one this process already trained)."""
    key = json.dumps(spec, sort_keys=True)
    if key in _TRAINED:
        return _TRAINED[key]
    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    started = time.monotonic()
    config = train_config(spec)
    device = kit.pick_device(spec.get("device", "auto"))
    corpus = corpus_for(spec["train"])
    micro_batch, accumulation = config.micro_steps(1)
    sampler = WindowSampler(corpus.train, config.seq_len, config.batch_size, config.seed)
    heldout = heldout_windows(corpus.heldout, config.seq_len, config.eval_windows)

    model = build_model(spec, corpus.vocab_size).to(device)
    model.train()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    network = torch.compile(model) if spec.get("compile") else model
    optimizer = _optimizer(model, config)
    grad_every = int(spec.get("grad_log_interval", 10))
    tokens_per_step = config.batch_size * config.seq_len
    history = {
        "parameters": sum(p.numel() for p in model.parameters()), "unit": corpus.unit,
        "data": corpus.description, "tokens_per_step": tokens_per_step,
        "train_loss": [], "step_seconds": [], "eval": [], "grad_norms": [], "gates": [],
    }

    def run_eval(step: int) -> None:
        loss = heldout_loss(model, heldout, micro_batch, device)
        history["eval"].append({"step": step, "tokens": step * tokens_per_step, "heldout_loss": loss,
                                "heldout_bits": loss / math.log(2)})
        history["gates"].append({"step": step, "layers": gate_statistics(model, heldout[:micro_batch], device)})
        model.train()

    if config.eval_interval:
        run_eval(0)
    for step in range(config.max_steps):
        tick = time.perf_counter()
        lr = learning_rate(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = 0.0
        for micro in range(accumulation):
            rows = sampler.rows(step, micro, micro_batch).to(device)
            with autocast(device):
                loss = network(rows, labels=rows).loss
            (loss / accumulation).backward()
            step_loss += float(loss.detach()) / accumulation
        if (step + 1) % grad_every == 0 or step == 0:
            history["grad_norms"].append({"step": step + 1, **gradient_norms(model)})
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history["train_loss"].append(step_loss)
        history["step_seconds"].append(time.perf_counter() - tick)
        done = step + 1
        if (config.eval_interval and done % config.eval_interval == 0) or done == config.max_steps:
            if not history["eval"] or history["eval"][-1]["step"] != done:
                run_eval(done)
    model.eval()
    seconds = sorted(history["step_seconds"][1:] or history["step_seconds"])
    history["median_tokens_per_s"] = tokens_per_step / seconds[len(seconds) // 2]
    history["wall_s"] = time.monotonic() - started
    final = history["eval"][-1]
    say(f"    trained {spec['kind']} seed {spec['seed']}: {history['parameters'] / 1e6:.2f}M parameters, "
        f"{config.max_steps} steps, held-out {final['heldout_bits']:.3f} bits/{corpus.unit}, "
        f"{history['median_tokens_per_s']:,.0f} tokens/s, {history['wall_s']:.1f} s")
    trained = TrainedLM(copy.deepcopy(spec), model, corpus, device, history)
    _TRAINED[key] = trained
    return trained


def lm_spec(base: dict, kind: str, seed: int, device: str) -> dict:
    """A full spec from an experiment's ``lm`` settings ({"train", "model",
    "grad_log_interval", "compile"}) for one arm."""
    return {"train": dict(base["train"]), "model": dict(base["model"]), "kind": kind, "seed": seed,
            "grad_log_interval": base.get("grad_log_interval", 10), "device": device,
            "compile": bool(base.get("compile", False))}


def forget(spec: dict | None = None) -> None:
    """Drop cached models (all, or the one of ``spec``) to free memory."""
    if spec is None:
        _TRAINED.clear()
    else:
        _TRAINED.pop(json.dumps(spec, sort_keys=True), None)
