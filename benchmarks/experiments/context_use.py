"""Experiment 2: use of context and length extrapolation.

Claim: GatedFWA uses context beyond its window better than sliding-window attention, and,
unlike full attention, keeps working on contexts longer than it was trained on.

The models are those of lm_equal_tokens (trained on 2048-byte windows; trained here if
that experiment did not run in the same process). They read long held-out documents: the
held-out files of the standard library (the trainer's split: every 20th file in sorted
order) that are at least as long as the longest evaluation length, each cut to its first L
bytes, for L in the evaluation lengths (2k, 4k, 8k, 16k; the same documents for every L).
Recorded: held-out bits per byte by position (averaged over documents and grouped into
logarithmic position bins) and the mean over all positions, and over the positions beyond
the training length, for every L.

    python benchmarks/experiments/context_use.py --quick --out /tmp/exp   # CPU, seconds

Writes context_use.json and context_use.png.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

import kit
import lm
import lm_equal_tokens

from gatedfwa.train.data import HELDOUT_EVERY, stdlib_source_files

NAME = "context_use"
CLAIM = ("GatedFWA uses context beyond its window better than sliding-window attention, and keeps its loss on "
         "contexts longer than the training length, where full attention does not.")


def config(quick: bool) -> dict:
    return {
        "kinds": list(lm_equal_tokens.PAPER_KINDS), "seeds": [0, 1], "lm": lm_equal_tokens.shared_lm(quick),
        "eval_lengths": [64, 128, 256] if quick else [2048, 4096, 8192, 16384],
        "max_documents": 4 if quick else 32, "eval_micro_batch": 4,
        "position_bins": 8 if quick else 24, "budget_s": 60,
    }


def long_heldout_documents(min_length: int, max_documents: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``min_length`` bytes of each held-out standard-library file (the trainer's
    split) at least that long: ([n, min_length] int64, file names)."""
    root, files = stdlib_source_files()
    rows, names = [], []
    for index, path in enumerate(files):
        if index % HELDOUT_EVERY != HELDOUT_EVERY - 1:
            continue
        data = path.read_bytes()
        if len(data) >= min_length:
            rows.append(np.frombuffer(data[:min_length], dtype=np.uint8).astype(np.int64))
            names.append(path.relative_to(root).as_posix())
        if len(rows) == max_documents:
            break
    if not rows:
        raise RuntimeError(f"no held-out standard-library file has {min_length} bytes")
    return torch.from_numpy(np.stack(rows)), names


def binned(values: np.ndarray, edges: np.ndarray) -> list[float]:
    return [float(values[lo:hi].mean()) for lo, hi in zip(edges[:-1], edges[1:])]


def run(config: dict, record: kit.Record, deadline: kit.Deadline) -> None:
    if config["lm"]["train"].get("data") is not None:
        raise ValueError("context_use reads held-out standard-library files: its models must train on the default corpus")
    lengths = sorted(config["eval_lengths"])
    documents, names = long_heldout_documents(lengths[-1], config["max_documents"])
    train_length = config["lm"]["train"]["seq_len"]
    edges = {length: kit.log_bins(length - 1, config["position_bins"]) for length in lengths}
    record.results.update(documents=names, train_length=train_length, window=config["lm"]["model"]["window_size"],
                          bin_edges={str(length): e.tolist() for length, e in edges.items()})

    def one(arm):
        trained = lm.train_lm(lm.lm_spec(config["lm"], arm["kind"], arm["seed"], config["device"]))
        out = {}
        for length in lengths:
            bits = lm.position_losses(trained.model, documents[:, :length], config["eval_micro_batch"], trained.device) / math.log(2)
            out[str(length)] = {
                "mean_bits": float(bits.mean()),
                "beyond_training_length_bits": float(bits[train_length:].mean()) if length > train_length else None,
                "binned_bits": binned(bits, edges[length]),
            }
        return {"by_length": out}

    arms = [{"kind": kind, "seed": seed} for seed in config["seeds"] for kind in config["kinds"]]
    kit.run_arms(arms, one, record, deadline, label=lambda a: f"{a['kind']} seed {a['seed']}")
    summary = {}
    for (kind,), arms in kit.group_by(record.arms, "kind").items():
        summary[kind] = {str(length): kit.spread(a["by_length"][str(length)]["mean_bits"] for a in arms) for length in lengths}
    record.results["mean_bits_by_length"] = summary
    record.save()


def plot(record: kit.Record, png_path) -> None:
    plt = kit.pyplot()
    results = record.results
    lengths = sorted(int(length) for length in results["bin_edges"])
    longest = lengths[-1]
    edges = np.asarray(results["bin_edges"][str(longest)])
    centres = np.sqrt(np.maximum(edges[:-1], 1) * edges[1:])
    fig, (by_position, by_length) = plt.subplots(1, 2, figsize=(12, 4.5))
    for index, ((kind,), arms) in enumerate(kit.group_by(record.arms, "kind").items()):
        color = kit.kind_color(kind, index)
        kit.plot_band(by_position, centres, [a["by_length"][str(longest)]["binned_bits"] for a in arms], kind, color, marker="o")
        kit.plot_band(by_length, lengths, [[a["by_length"][str(length)]["mean_bits"] for length in lengths] for a in arms],
                      kind, color, marker="o")
    for ax in (by_position, by_length):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.axvline(results["train_length"], color="gray", linestyle="--", linewidth=1)
    by_position.axvline(results["window"], color="gray", linestyle=":", linewidth=1)
    by_position.set_xlabel(f"position in a {longest}-byte held-out document (dotted: window, dashed: training length)")
    by_position.set_ylabel("held-out bits per byte")
    by_position.set_title(f"Loss by position, {len(results['documents'])} documents\n{kit.title_note(record)}", fontsize=9)
    by_position.legend()
    by_length.set_xlabel("evaluation length (dashed: training length)")
    by_length.set_ylabel("mean held-out bits per byte")
    by_length.set_title("Length extrapolation (mean, band = min..max over seeds)", fontsize=9)
    kit.save_figure(fig, record, png_path)


if __name__ == "__main__":
    kit.main(sys.modules[__name__])
