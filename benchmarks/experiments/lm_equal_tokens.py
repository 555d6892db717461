"""Experiment 1: language modelling at equal tokens.

Claim: GatedFWA makes better use of context than sliding-window attention at the same cost,
and is competitive with full (and forgetting) attention.

Every attention kind trains the same byte-level model (the gpu-20m preset's shape: 6 layers,
C = 512, 8 heads of 64, SwiGLU 1408, window 512, context 2048) on the Python standard
library's sources with the same data order, steps, tokens and optimizer; only the attention
differs. Held-out bits per byte are recorded over training; the final table gives mean, std,
min and max over the seeds.

    python benchmarks/experiments/lm_equal_tokens.py --quick --out /tmp/exp   # CPU, seconds
    python benchmarks/experiments/lm_equal_tokens.py                           # GPU

Writes lm_equal_tokens.json and lm_equal_tokens.png.
"""

from __future__ import annotations

import copy
import sys

import numpy as np

import kit
import lm

NAME = "lm_equal_tokens"
CLAIM = ("At equal training tokens, data order and parameters, GatedFWA reaches a lower held-out loss than "
         "sliding-window attention and is competitive with full and forgetting attention.")
# The four kinds of the paper's comparison (also the default of the experiments that study
# these models further), then Native Sparse Attention with a plain and with a gated sliding
# branch (docs/nsa.md). Arms are seed-major, so the four come first.
PAPER_KINDS = ["gatedfwa", "swa", "full", "forgetting"]
KINDS = PAPER_KINDS + ["nsa", "nsa-gatedfwa"]
ARM_KEYS = ("kind", "seed")  # what names an arm (merge.py)

# The model and training of the full run, shared with context_use and memory_gradient_flow
# (which study these same models). The gpu-20m preset's model; 300 steps of 32 x 2048
# bytes (19.7M tokens, about two thirds of one pass over the corpus) instead of the
# preset's 5000 steps, to fit the GPU time of the published run.
FULL_LM = {
    "model": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 6, "num_attention_heads": 8,
              "num_key_value_heads": 8, "head_dim": 64, "window_size": 512, "rope_theta": 10000.0},
    "train": {"data": None, "seq_len": 2048, "batch_size": 32, "micro_batch_size": 32, "max_steps": 300,
              "lr": 1.5e-3, "warmup_steps": 30, "eval_interval": 50, "eval_windows": 64},
    "grad_log_interval": 10,
    "compile": False,
}
QUICK_LM = {
    "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2, "head_dim": 16, "window_size": 16, "rope_theta": 10000.0},
    "train": {"data": None, "seq_len": 64, "batch_size": 4, "micro_batch_size": 4, "max_steps": 6,
              "lr": 3e-3, "warmup_steps": 2, "eval_interval": 3, "eval_windows": 4},
    "grad_log_interval": 2,
    "compile": False,
}


def shared_lm(quick: bool) -> dict:
    """The LM settings of this experiment (a fresh copy)."""
    return copy.deepcopy(QUICK_LM if quick else FULL_LM)


def config(quick: bool) -> dict:
    # The quick form leaves out the NSA kinds: their CPU path takes a minute even at this size.
    return {"kinds": list(PAPER_KINDS if quick else KINDS), "seeds": [0, 1], "lm": shared_lm(quick), "budget_s": 270}


def arm_order(config: dict) -> list[dict]:
    """Seed-major: every kind's first seed before any second seed, so that a run short of
    time still compares all kinds."""
    return [{"kind": kind, "seed": seed} for seed in config["seeds"] for kind in config["kinds"]]


def run(config: dict, record: kit.Record, deadline: kit.Deadline) -> None:
    compare_kinds(config, record, deadline)


def compare_kinds(config: dict, record: kit.Record, deadline: kit.Deadline) -> None:
    """Trains config["lm"] once per kind and seed; records curves and final losses (also
    used by second_domain)."""
    def one(arm):
        trained = lm.train_lm(lm.lm_spec(config["lm"], arm["kind"], arm["seed"], config["device"]))
        history = trained.history
        return {
            "parameters": history["parameters"], "unit": history["unit"], "data": history["data"],
            "tokens": history["eval"][-1]["tokens"],
            "final_heldout_bits": history["eval"][-1]["heldout_bits"],
            "curve": [{k: e[k] for k in ("step", "tokens", "heldout_bits")} for e in history["eval"]],
            "final_train_bits": float(np.mean(history["train_loss"][-10:])) / np.log(2),
            "median_tokens_per_s": history["median_tokens_per_s"], "train_wall_s": history["wall_s"],
        }

    kit.run_arms(arm_order(config), one, record, deadline, label=lambda a: f"{a['kind']} seed {a['seed']}")
    summarise(config, record)


def summarise(config: dict, record: kit.Record) -> None:
    """record.results from record.arms: final held-out loss and speed by kind over seeds."""
    record.results["final_heldout_bits"] = {
        kind: {**kit.spread(a["final_heldout_bits"] for a in arms), "per_seed": {a["seed"]: a["final_heldout_bits"] for a in arms}}
        for (kind,), arms in kit.group_by(record.arms, "kind").items()
    }
    record.results["median_tokens_per_s"] = {
        kind: kit.spread(a["median_tokens_per_s"] for a in arms) for (kind,), arms in kit.group_by(record.arms, "kind").items()
    }
    record.save()


def plot(record: kit.Record, png_path) -> None:
    plot_comparison(record, png_path)


def plot_comparison(record: kit.Record, png_path, what: str = "Held-out loss during training") -> None:
    """Held-out curves (mean, min..max band) and the final values as bars."""
    plt = kit.pyplot()
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    groups = kit.group_by(record.arms, "kind")
    for index, ((kind,), arms) in enumerate(groups.items()):
        color = kit.kind_color(kind, index)
        x = [point["tokens"] / 1e6 for point in arms[0]["curve"]]
        kit.plot_band(curves, x, [[p["heldout_bits"] for p in a["curve"]] for a in arms],
                      f"{kind} ({len(arms)} seeds)", color, marker="o")
        stats = record.results["final_heldout_bits"][kind]
        bars.bar(index, stats["mean"], color=color)
        bars.errorbar(index, stats["mean"], yerr=[[stats["mean"] - stats["min"]], [stats["max"] - stats["mean"]]],
                      color="black", capsize=4)
        bars.text(index, stats["mean"], f"{stats['mean']:.3f}", ha="center", va="bottom", fontsize=8)
    unit = record.arms[0]["unit"] if record.arms else "byte"
    curves.set_xlabel("training tokens (millions)")
    curves.set_ylabel(f"held-out bits per {unit}")
    curves.set_ylim(top=min(8.5, curves.get_ylim()[1]))
    curves.legend()
    curves.grid(alpha=0.3)
    curves.set_title(f"{what} (mean, band = min..max over seeds)\n{kit.title_note(record)}",
                     fontsize=9)
    bars.set_xticks(range(len(groups)), [k for (k,) in groups])
    finals = [record.results["final_heldout_bits"][k]["min"] for (k,) in groups]
    if finals:
        low = min(finals)
        bars.set_ylim(low - 0.15 * abs(low) - 0.01, None)
    bars.set_ylabel(f"final held-out bits per {unit}")
    bars.set_title("Final (bar = mean, whiskers = min..max)", fontsize=9)
    kit.save_figure(fig, record, png_path)


if __name__ == "__main__":
    kit.main(sys.modules[__name__])
