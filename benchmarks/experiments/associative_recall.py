"""Experiment 3: multi-query associative recall (MQAR), made here.

Claim: the gate lets a windowed model keep what it needs: GatedFWA recalls associations at
least as well as sliding-window attention inside the window, and the comparison with full
and forgetting attention shows what lies beyond it.

The data (generated here, Zoology-style): a sequence of ``seq_len`` tokens is a row of
two-token slots. ``num_pairs`` keys (distinct, from ``num_keys`` key tokens) each appear in
two random slots followed by a value (random, from ``num_values`` value tokens): the second
appearance is a query, and the model must predict the value that followed the first one.
Other slots hold the filler token 0. Only query answers are scored. The distance of a
query is the number of positions from the value to recall to the query key (a one-layer
model with window w can see it when distance < w). Training batches come from a generator
seeded by (seed, step), so every arm of a seed sees the same sequences; a fraction
``short_fraction`` of each batch are short examples, with every pair in the first
``short_len`` tokens. The test set is fixed and has full-length examples only. Accuracy is
reported by kind, window, model width and distance bin, with a learning curve per arm.

    python benchmarks/experiments/associative_recall.py --quick --out /tmp/exp   # CPU, seconds

Writes associative_recall.json and associative_recall.png.
"""

from __future__ import annotations

import functools
import math
import sys

import numpy as np
import torch

import kit
import lm

from gatedfwa.models import GatedFWAConfig, GatedFWAForCausalLM

NAME = "associative_recall"
CLAIM = ("GatedFWA recalls key-value associations at least as well as sliding-window attention; accuracy by "
         "distance shows what each kind retrieves inside and beyond its window.")
KINDS = ["gatedfwa", "swa", "full", "forgetting"]
WINDOWED = ("gatedfwa", "swa")


def config(quick: bool) -> dict:
    if quick:
        return {"kinds": list(KINDS), "seeds": [0, 1], "windows": [8], "widths": [32], "num_layers": 2, "num_heads": 2,
                "seq_len": 64, "num_pairs": 4, "num_keys": 16, "num_values": 16, "batch_size": 8, "steps": 4,
                "lr": 3e-3, "warmup_steps": 1, "test_sequences": 16, "curve_every": 2, "curve_sequences": 8,
                "short_fraction": 0.5, "short_len": 32, "distance_edges": [1, 4, 8, 16, 64], "parallel_arms": 1}
    # Sized the way Zoology sizes MQAR for two-layer models (width 64-128, batches of 256,
    # learning rates 1e-3..1e-2; arXiv 2312.04927), with a small vocabulary and 8 pairs.
    # Models first settle on a plateau (predicting any value of the sequence: accuracy about
    # 1 / num_pairs) and solve the task only after the attention learns to look up the key;
    # the learning curve in the JSON shows when. A run of 1000 steps at batch 64 left full
    # attention on that plateau, so this one sees 12 times as many sequences, and, as
    # Zoology trains on a mix of sequence lengths (most of them short), half of each batch
    # are short examples (all pairs in the first 64 tokens), where attention spread over
    # few keys learns the lookup sooner. The test set has none: its queries span all 256. A step of these tiny models is bound by kernel launches on the host (about
    # 10 ms on an H200 at batch 64 or 256), so the 6 arms of a seed run at once, one
    # process each (two waves of about a minute).
    return {"kinds": list(KINDS), "seeds": [0, 1], "windows": [16, 64], "widths": [128], "num_layers": 2,
            "num_heads": 4, "seq_len": 256, "num_pairs": 8, "num_keys": 64, "num_values": 64, "batch_size": 256,
            "steps": 3000, "lr": 3e-3, "warmup_steps": 100, "test_sequences": 1024, "curve_every": 250,
            "curve_sequences": 256, "short_fraction": 0.5, "short_len": 64,
            "distance_edges": [1, 8, 16, 32, 64, 128, 256], "parallel_arms": 6,
            "budget_s": 240}


def mqar_batch(rng: np.random.Generator, batch: int, seq_len: int, num_pairs: int, num_keys: int, num_values: int,
               short_rows: int = 0, short_len: int | None = None):
    """(input ids [B, T] int64, labels [B, T] (-100 except where a query's value is due),
    queries): queries["position"] [B, P] is where each query key stands (the logits there
    predict the value), queries["value"] [B, P] the value, queries["distance"] [B, P] the
    positions from the value to recall to the query key. Tokens: 0 filler, 1..num_keys
    keys, then values. The first ``short_rows`` rows are short examples: all their pairs and
    queries lie in the first ``short_len`` tokens (filler after)."""
    slots = seq_len // 2
    if 2 * num_pairs > slots or num_pairs > num_keys:
        raise ValueError(f"{num_pairs} pairs need {2 * num_pairs} slots and keys; have {slots} slots, {num_keys} keys")
    order = rng.random((batch, slots))
    if short_rows:
        if short_len is None or not 4 * num_pairs <= short_len <= seq_len:
            raise ValueError(f"short_len: expected {4 * num_pairs}..{seq_len} tokens for {num_pairs} pairs, got {short_len}")
        order[:short_rows, short_len // 2:] += 2.0  # slots past the short span sort last, never chosen
    chosen = np.argsort(order, axis=1)[:, :2 * num_pairs]
    first = np.minimum(chosen[:, 0::2], chosen[:, 1::2])  # [B, P] slot of the key-value pair
    query = np.maximum(chosen[:, 0::2], chosen[:, 1::2])  # [B, P] slot of the query
    keys = np.argsort(rng.random((batch, num_keys)), axis=1)[:, :num_pairs] + 1
    values = rng.integers(0, num_values, size=(batch, num_pairs)) + 1 + num_keys
    ids = np.zeros((batch, seq_len), dtype=np.int64)
    labels = np.full((batch, seq_len), -100, dtype=np.int64)
    rows = np.arange(batch)[:, None]
    ids[rows, 2 * first], ids[rows, 2 * first + 1] = keys, values
    ids[rows, 2 * query], ids[rows, 2 * query + 1] = keys, values
    labels[rows, 2 * query + 1] = values  # the model's loss scores position t against labels[t + 1]
    queries = {"position": 2 * query, "value": values, "distance": 2 * query - (2 * first + 1)}
    return torch.from_numpy(ids), torch.from_numpy(labels), queries


def build(config: dict, kind: str, width: int, window: int | None, seed: int) -> GatedFWAForCausalLM:
    torch.manual_seed(seed)
    heads = config["num_heads"]
    return GatedFWAForCausalLM(GatedFWAConfig(
        vocab_size=1 + config["num_keys"] + config["num_values"], hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=config["num_layers"], num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=width // heads, window_size=window if window is not None else config["seq_len"], attention_kinds=kind))


def data_shape(config: dict) -> tuple:
    return config["seq_len"], config["num_pairs"], config["num_keys"], config["num_values"]


def train_and_test(config: dict, arm: dict, device: torch.device) -> dict:
    """Trains one arm (AdamW, warm-up then cosine to 10%, clipping at 1) and scores the
    fixed test set: overall accuracy, accuracy by distance bin, and a learning curve
    (accuracy on the first ``curve_sequences`` test sequences every ``curve_every`` steps)."""
    model = build(config, arm["kind"], arm["width"], arm["window"], arm["seed"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type == "cuda")
    losses, curve = [], []
    for step in range(config["steps"]):
        model.train()
        warm = min(1.0, (step + 1) / config["warmup_steps"])
        cosine = 0.5 * (1 + math.cos(math.pi * step / config["steps"]))
        for group in optimizer.param_groups:
            group["lr"] = config["lr"] * warm * (0.1 + 0.9 * cosine)
        ids, labels, _ = mqar_batch(np.random.default_rng([arm["seed"], step]), config["batch_size"], *data_shape(config),
                                    short_rows=round(config["short_fraction"] * config["batch_size"]),
                                    short_len=config["short_len"])
        if device.type == "cuda":  # pinned and asynchronous: the host queues the next step without waiting
            ids, labels = ids.pin_memory().to(device, non_blocking=True), labels.pin_memory().to(device, non_blocking=True)
        with lm.autocast(device):
            loss = model(ids.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())  # read back once at the end: no host sync per step
        if (step + 1) % config["curve_every"] == 0 and step + 1 < config["steps"]:
            hits, _ = test_accuracy(model, config, device, config["curve_sequences"])
            curve.append({"step": step + 1, "accuracy": float(hits.mean())})
    losses = torch.stack(losses).float().cpu().numpy()
    hits, distances = test_accuracy(model, config, device)
    curve.append({"step": config["steps"], "accuracy": float(hits.mean())})
    edges = config["distance_edges"]
    by_bin = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (distances >= lo) & (distances < hi)
        by_bin.append({"from": lo, "to": hi, "count": int(inside.sum()),
                       "accuracy": float(hits[inside].mean()) if inside.any() else None})
    return {"accuracy": float(hits.mean()), "accuracy_by_distance": by_bin, "curve": curve,
            "train_loss_first": float(losses[0]), "final_train_loss": float(np.mean(losses[-20:])),
            "parameters": sum(p.numel() for p in model.parameters())}


@torch.no_grad()
def test_accuracy(model, config: dict, device: torch.device, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(hit [N] bool, distance [N]) for every query of the fixed test set (or of its first
    ``count`` sequences)."""
    ids, _, queries = mqar_batch(np.random.default_rng([10**6]), config["test_sequences"], *data_shape(config))
    count = len(ids) if count is None else min(count, len(ids))
    ids, queries = ids[:count], {key: value[:count] for key, value in queries.items()}
    model.eval()
    predicted = []
    for start in range(0, len(ids), 256):
        with lm.autocast(device):
            predicted.append(model(ids[start:start + 256].to(device)).logits.argmax(-1).cpu())
    predicted = torch.cat(predicted).numpy()
    answers = np.take_along_axis(predicted, queries["position"], axis=1)
    return (answers == queries["value"]).ravel(), queries["distance"].ravel()


def arm_list(config: dict) -> list[dict]:
    """Seed-major, then width, kind and window (window-free kinds once per width)."""
    arms = []
    for seed in config["seeds"]:
        for width in config["widths"]:
            for kind in config["kinds"]:
                for window in (config["windows"] if kind in WINDOWED else [None]):
                    arms.append({"kind": kind, "window": window, "width": width, "seed": seed})
    return arms


def run_arm(config: dict, arm: dict) -> dict:
    """One arm on the config's device (module-level: worker processes receive it pickled)."""
    return train_and_test(config, arm, kit.pick_device(config["device"]))


def run(config: dict, record: kit.Record, deadline: kit.Deadline) -> None:
    kit.run_arms_parallel(arm_list(config), functools.partial(run_arm, config), record, deadline,
                          workers=config["parallel_arms"],
                          label=lambda a: f"{a['kind']} w={a['window']} C={a['width']} seed {a['seed']}")
    summarise(config, record)


ARM_KEYS = ("kind", "window", "width", "seed")  # what names an arm (merge.py)


def summarise(config: dict, record: kit.Record) -> None:
    """record.results from record.arms: accuracy by kind, window and width over seeds."""
    summary = []
    for (kind, window, width), arms in kit.group_by(record.arms, "kind", "window", "width").items():
        summary.append({"kind": kind, "window": window, "width": width,
                        "accuracy": kit.spread(a["accuracy"] for a in arms),
                        "accuracy_by_distance": [kit.spread(a["accuracy_by_distance"][i]["accuracy"] for a in arms)
                                                 for i in range(len(config["distance_edges"]) - 1)]})
    record.results["summary"] = summary
    record.results["chance_accuracy"] = 1 / config["num_values"]
    # Guessing any value present in the sequence: where models sit before they learn the lookup.
    record.results["plateau_accuracy"] = 1 / config["num_pairs"]
    record.save()


def plot(record: kit.Record, png_path) -> None:
    plt = kit.pyplot()
    config = record.config
    widths = config["widths"]
    fig, axes = plt.subplots(1, len(widths) + 1, figsize=(6.5 * (len(widths) + 1), 4.5), squeeze=False)
    edges = config["distance_edges"]
    x = np.sqrt(np.asarray(edges[:-1], float) * np.asarray(edges[1:], float))
    styles = ["-", "--", ":", "-."]
    for ax, width in zip(axes[0], widths):
        for index, ((kind, window), arms) in enumerate(kit.group_by([a for a in record.arms if a["width"] == width],
                                                                       "kind", "window").items()):
            style = styles[config["windows"].index(window) % len(styles)] if window in config["windows"] else "-"
            curves = [[b["accuracy"] if b["accuracy"] is not None else np.nan for b in a["accuracy_by_distance"]] for a in arms]
            label = f"{kind}" + (f" w={window}" if window else "") + f" ({np.mean([a['accuracy'] for a in arms]):.2f})"
            kit.plot_band(ax, x, curves, label, kit.kind_color(kind, index), marker="o")
            ax.lines[-1].set_linestyle(style)
        for window in config["windows"]:
            ax.axvline(window, color="gray", linestyle=":", linewidth=1)
        ax.axhline(record.results["chance_accuracy"], color="black", linewidth=0.8, linestyle="--")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("distance from the value to its query (tokens; dotted: windows)")
        ax.set_ylabel("recall accuracy")
        ax.set_title(f"MQAR, width {width}, {config['num_layers']} layers, {config['num_pairs']} pairs in {config['seq_len']} "
                     f"tokens\n{kit.title_note(record)}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    plot_learning_curves(axes[0][-1], record)
    kit.save_figure(fig, record, png_path)


def plot_learning_curves(ax, record: kit.Record) -> None:
    """Test accuracy through training, one line per kind, window and width (mean over seeds)."""
    styles = ["-", "--", ":", "-."]
    windows = record.config["windows"]
    for index, ((kind, window, width), arms) in enumerate(kit.group_by(record.arms, "kind", "window", "width").items()):
        if not all("curve" in a for a in arms):
            continue  # records from before the curve was recorded
        steps = [point["step"] for point in arms[0]["curve"]]
        kit.plot_band(ax, steps, [[p["accuracy"] for p in a["curve"]] for a in arms],
                      f"{kind}" + (f" w={window}" if window else "") + f" C={width}", kit.kind_color(kind, index))
        if ax.lines:
            ax.lines[-1].set_linestyle(styles[windows.index(window) % len(styles)] if window in windows else "-")
    ax.axhline(record.results["chance_accuracy"], color="black", linewidth=0.8, linestyle="--")
    ax.axhline(1 / record.config["num_pairs"], color="gray", linewidth=0.8, linestyle=":")
    ax.set_ylim(-0.02, 1.02)
    ax.set(xlabel="training step (dashed: chance; dotted: 1 / pairs, the plateau)", ylabel="test accuracy", title="Learning curves (mean, band = min..max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


if __name__ == "__main__":
    kit.main(sys.modules[__name__])
