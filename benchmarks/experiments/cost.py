"""Experiment 6: cost.

Claim: GatedFWA's gate costs little: training throughput close to sliding-window attention
(well above full attention at long context), and decoding with a fixed-size cache.

Measured on the gpu-125m preset's model (18 layers, C = 768, 12 heads of 64, SwiGLU 2048,
window 1024, byte vocabulary, context 4096, micro-batch 8, bf16 autocast, random data):

* training tokens/s per kind: whole optimizer steps (forward, backward, clipping, AdamW),
  eager, and compiled per decoder block (``block.compile()``: one compilation serves all
  blocks of a kind); median and quartiles over the timed steps, for each repeat (a fresh
  model per repeat);
* the gate's share of a step: forward + backward of one layer's fused gated attention
  (gate projection, gate and attention) minus that of the same attention without gate,
  times the number of layers, over the eager gatedfwa step time; and the step-time
  difference gatedfwa - swa over the swa step;
* decoding: tokens/s of greedy generation after a prompt (one decode-op step per token,
  the model's window cache), and the cache's memory, per kind and prompt length.

    python benchmarks/experiments/cost.py --quick --out /tmp/exp   # CPU, seconds (no meaningful timings)

Writes cost.json and cost.png.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import torch

import kit
import lm

from gatedfwa import gated_fwa_attention, gated_window_attention
from gatedfwa.models import GatedFWAConfig, GatedFWAForCausalLM

NAME = "cost"
CLAIM = ("GatedFWA's gate adds little to a training step over sliding-window attention, which is cheaper than "
         "full attention at long context, and it decodes with a fixed-size cache.")


PARTS = ("train", "gate_op", "decode")  # run all, or some with --set parts='["decode"]'
ARM_KEYS = ("part", "kind", "mode", "prompt", "seed")  # what names an arm (merge.py)


def config(quick: bool) -> dict:
    if quick:
        return {"kinds": ["gatedfwa", "swa", "full", "forgetting"], "seeds": [0, 1],
                "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                          "num_key_value_heads": 2, "head_dim": 16, "window_size": 16, "vocab_size": 256},
                "seq_len": 64, "micro_batch": 2, "warmup_steps": 1, "timed_steps": 2,
                "compiled_kinds": ["gatedfwa"], "compile_backend": "eager",
                "op_repeats": 2, "decode_kinds": ["gatedfwa", "full"], "decode_prompts": [32], "decode_batch": 1,
                "decode_tokens": 4, "parts": list(PARTS)}
    return {"kinds": ["gatedfwa", "swa", "full", "forgetting"], "seeds": [0, 1],
            "model": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 12,
                      "num_key_value_heads": 12, "head_dim": 64, "window_size": 1024, "vocab_size": 256},
            "seq_len": 4096, "micro_batch": 8, "warmup_steps": 3, "timed_steps": 10,
            "compiled_kinds": ["gatedfwa", "swa"], "compile_backend": "inductor",
            "op_repeats": 20, "decode_kinds": ["gatedfwa", "swa", "full"], "decode_prompts": [4096, 16384],
            "decode_batch": 1, "decode_tokens": 256, "parts": list(PARTS), "budget_s": 240}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(config: dict, kind: str, seed: int, device: torch.device) -> GatedFWAForCausalLM:
    torch.manual_seed(seed)
    return GatedFWAForCausalLM(GatedFWAConfig(**config["model"], attention_kinds=kind)).to(device)


def step_times(config: dict, kind: str, seed: int, compiled: bool, device: torch.device) -> dict:
    """Seconds per optimizer step (after warm-up; the first call's compile time apart)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build(config, kind, seed, device)
    if compiled:
        for block in model.model.layers:
            block.compile(backend=config["compile_backend"])
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, config["model"]["vocab_size"], (config["micro_batch"], config["seq_len"]), generator=generator)
    rows = rows.to(device)

    def step():
        with lm.autocast(device):
            loss = model(rows, labels=rows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    started = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - started
    for _ in range(config["warmup_steps"] - 1):
        step()
    times = []
    for _ in range(config["timed_steps"]):
        synchronize(device)
        tick = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - tick)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    del model, optimizer
    median = statistics.median(times)
    quartiles = np.percentile(times, [25, 75]).tolist()
    tokens = config["micro_batch"] * config["seq_len"]
    return {"median_step_s": median, "step_s_quartiles": quartiles, "tokens_per_s": tokens / median,
            "first_step_s": first, "peak_memory_bytes": peak}


def gate_op_seconds(config: dict, device: torch.device) -> dict:
    """Forward + backward of one layer's attention with and without the gate (median s)."""
    m = config["model"]
    batch, seqlen, heads, dim = config["micro_batch"], config["seq_len"], m["num_attention_heads"], m["head_dim"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)  # noqa: E731
    q, k, v = make(batch, seqlen, heads, dim), make(batch, seqlen, heads, dim), make(batch, seqlen, heads, dim)
    x = make(batch, seqlen, m["hidden_size"])
    weight = (torch.randn(2 * heads, m["hidden_size"], device=device, dtype=dtype) * 0.02).requires_grad_()
    bias = torch.full((heads,), 5.0, device=device, requires_grad=True)
    grad = torch.randn(batch, seqlen, heads, dim, device=device, dtype=dtype)
    window = m["window_size"]
    variants = {
        "gated": lambda: gated_fwa_attention(q, k, v, x, weight, bias, window_size=window),
        "ungated": lambda: gated_window_attention(q, k, v, None, window_size=window),
    }
    out = {}
    for name, fn in variants.items():
        times = []
        for repeat in range(config["op_repeats"] + 2):
            synchronize(device)
            tick = time.perf_counter()
            fn().backward(grad)
            synchronize(device)
            if repeat >= 2:  # the first calls compile kernels
                times.append(time.perf_counter() - tick)
        out[f"{name}_s"] = statistics.median(times)
    return out


@torch.no_grad()
def decode_speed(config: dict, kind: str, prompt: int, seed: int, device: torch.device) -> dict:
    """Greedy decoding of decode_tokens after a random prompt: tokens/s and cache bytes."""
    model = build(config, kind, seed, device)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config["model"]["vocab_size"], (config["decode_batch"], prompt), generator=generator).to(device)
    out = model(ids, use_cache=True, logits_to_keep=1)
    cache = out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values
    next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
    prompt_cache = cache.memory_bytes()
    synchronize(device)
    tick = time.perf_counter()
    for _ in range(config["decode_tokens"]):
        out = model(next_ids, cache=cache, logits_to_keep=1)
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
    synchronize(device)
    seconds = time.perf_counter() - tick
    result = {"tokens_per_s": config["decode_batch"] * config["decode_tokens"] / seconds,
              "ms_per_step": 1000 * seconds / config["decode_tokens"],
              "cache_bytes_after_prompt": prompt_cache, "cache_bytes_at_end": cache.memory_bytes()}
    del model, cache
    return result


def run(config: dict, record: kit.Record, deadline: kit.Deadline) -> None:
    device = kit.pick_device(config["device"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    unknown = sorted(set(config["parts"]) - set(PARTS))
    if unknown:
        raise ValueError(f"parts: unknown {unknown}; expected a list of {list(PARTS)}")
    arms = [{"part": "train", "kind": kind, "mode": "eager", "seed": seed} for seed in config["seeds"] for kind in config["kinds"]]
    arms += [{"part": "train", "kind": kind, "mode": "compiled", "seed": seed}
             for seed in config["seeds"] for kind in config["kinds"] if kind in config["compiled_kinds"]]
    arms += [{"part": "gate_op", "seed": seed} for seed in config["seeds"]]
    arms += [{"part": "decode", "kind": kind, "prompt": prompt, "seed": seed}
             for seed in config["seeds"] for prompt in config["decode_prompts"] for kind in config["decode_kinds"]]

    def one(arm):
        if arm["part"] == "train":
            return step_times(config, arm["kind"], arm["seed"], arm["mode"] == "compiled", device)
        if arm["part"] == "gate_op":
            torch.manual_seed(arm["seed"])
            return gate_op_seconds(config, device)
        return decode_speed(config, arm["kind"], arm["prompt"], arm["seed"], device)

    arms = [arm for arm in arms if arm["part"] in config["parts"]]
    kit.run_arms(arms, one, record, deadline, label=lambda a: " ".join(str(v) for v in a.values()))
    summarise(config, record)


def summarise(config: dict, record: kit.Record) -> None:
    """record.results from record.arms: training tokens/s, the gate's share and decoding."""
    train = {f"{kind} {mode}": kit.spread(a["tokens_per_s"] for a in arms)
             for (kind, mode), arms in kit.group_by([a for a in record.arms if a["part"] == "train"], "kind", "mode").items()}
    record.results["training_tokens_per_s"] = train
    layers = config["model"]["num_hidden_layers"]
    ops = [a for a in record.arms if a["part"] == "gate_op"]
    eager_gated = [a for a in record.arms if a["part"] == "train" and a["kind"] == "gatedfwa" and a["mode"] == "eager"]
    eager_swa = [a for a in record.arms if a["part"] == "train" and a["kind"] == "swa" and a["mode"] == "eager"]
    if ops and eager_gated:
        step = statistics.fmean(a["median_step_s"] for a in eager_gated)
        record.results["gate_share_of_step"] = kit.spread(layers * (a["gated_s"] - a["ungated_s"]) / step for a in ops)
    if eager_gated and eager_swa:
        record.results["gatedfwa_over_swa_step"] = kit.spread(
            g["median_step_s"] / s["median_step_s"] - 1 for g, s in zip(eager_gated, eager_swa))
    record.results["decoding"] = {
        f"{kind} prompt {prompt}": {"tokens_per_s": kit.spread(a["tokens_per_s"] for a in arms),
                                    "cache_bytes_at_end": arms[0]["cache_bytes_at_end"]}
        for (kind, prompt), arms in kit.group_by([a for a in record.arms if a["part"] == "decode"], "kind", "prompt").items()
    }
    record.save()


def plot(record: kit.Record, png_path) -> None:
    plt = kit.pyplot()
    fig, (train_ax, decode_ax, memory_ax) = plt.subplots(1, 3, figsize=(16, 4.5))
    train = record.results["training_tokens_per_s"]
    for index, (label, stats) in enumerate(train.items()):
        kind, mode = label.split()
        train_ax.bar(index, stats["mean"], color=kit.kind_color(kind), hatch="//" if mode == "compiled" else None,
                     edgecolor="black", linewidth=0.5)
        train_ax.errorbar(index, stats["mean"], yerr=[[stats["mean"] - stats["min"]], [stats["max"] - stats["mean"]]],
                          color="black", capsize=3)
    train_ax.set_xticks(range(len(train)), [label.replace(" ", "\n") for label in train], fontsize=8)
    share = record.results.get("gate_share_of_step", {}).get("mean")
    note = f"; gate's share of an eager gatedfwa step: {share:.1%}" if share is not None else ""
    train_ax.set(ylabel="training tokens/s", title=f"Training throughput (hatched: compiled){note}\n{kit.title_note(record)}")
    decoding = record.results["decoding"]
    for index, (label, stats) in enumerate(decoding.items()):
        kind = label.split()[0]
        decode_ax.bar(index, stats["tokens_per_s"]["mean"], color=kit.kind_color(kind))
        memory_ax.bar(index, stats["cache_bytes_at_end"] / 2**20, color=kit.kind_color(kind))
    for ax in (decode_ax, memory_ax):
        ax.set_xticks(range(len(decoding)), [label.replace(" prompt ", "\nprompt ") for label in decoding], fontsize=8)
    decode_ax.set(ylabel="decoded tokens/s", title=f"Greedy decoding, {record.config['decode_tokens']} tokens after the prompt")
    memory_ax.set(ylabel="cache MiB at the end", title="Decoding cache memory")
    for ax in (train_ax, decode_ax, memory_ax):
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3, axis="y")
    kit.save_figure(fig, record, png_path)


if __name__ == "__main__":
    kit.main(sys.modules[__name__])
