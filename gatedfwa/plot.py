"""``gatedfwa plot RUN_DIR ... --out loss.png``: loss curves of one or more runs in one PNG.

Each run contributes its training loss (thin line, smoothed over a few steps) and its
held-out loss (markers), both in bits per byte (byte tokenizer) or bits per token, against
training tokens. Runs are labelled by folder name and attention kind, which makes the
figure a like-for-like comparison of attention kinds trained on the same data.
"""

from __future__ import annotations

import json
from pathlib import Path

from gatedfwa.errors import ConfigError
from gatedfwa.train.metrics import METRICS_FILE, nats_to_bits, read_metrics

__all__ = ["plot_runs"]


def _label(run_dir: Path) -> tuple[str, str]:
    """(label, unit) of a run from its newest checkpoint's record, if any."""
    from gatedfwa.train.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        return run_dir.name, "token"
    try:
        record = json.loads((checkpoint / "train_config.json").read_text(encoding="utf-8"))
        settings = record["train"]
        kinds = settings.get("attention") or settings["model"].get("attention_kinds", "?")
        kinds = kinds if isinstance(kinds, str) else "+".join(sorted(set(kinds)))
        return f"{run_dir.name} ({kinds})", record.get("unit", "token")
    except (OSError, ValueError, KeyError, TypeError):
        return run_dir.name, "token"


def _smooth(values: list[float], width: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def plot_runs(run_dirs: list, out: Path, smooth: int = 10) -> Path:
    """Writes the PNG and returns its path; ConfigError if a run has no metrics."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out must name a .png file, got {out}")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder: name a .png file, e.g. {out / 'loss.png'}")
    runs = []
    for raw in run_dirs:
        run = Path(raw)
        path = run / METRICS_FILE
        if not path.is_file():
            raise ConfigError(f"{raw}: not a run folder (no {METRICS_FILE} in it)")
        records = read_metrics(path)
        if not records:
            raise ConfigError(f"{path} holds no metrics yet")
        runs.append((run, records))

    units = set()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for index, (run, records) in enumerate(runs):
        label, unit = _label(run)
        units.add(unit)
        color = f"C{index % 10}"
        train = [r for r in records if "train_loss" in r]
        held = [r for r in records if "heldout_loss" in r]
        if train:
            ax.plot([r["tokens"] for r in train], _smooth([nats_to_bits(r["train_loss"]) for r in train], smooth),
                    color=color, alpha=0.45, linewidth=1, label=f"{label} train")
        if held:
            ax.plot([r["tokens"] for r in held], [r["heldout_bits"] for r in held], color=color, marker="o",
                    markersize=4, linewidth=1.8, label=f"{label} held-out ({held[-1]['heldout_bits']:.3f})")
    unit = units.pop() if len(units) == 1 else "token"
    ax.set_xlabel("training tokens")
    ax.set_ylabel(f"loss (bits per {unit})")
    ax.set_title("gatedfwa: loss curves")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
    except OSError as error:  # e.g. a file where a parent folder should be, or no permission
        raise ConfigError(f"--out {out}: cannot write the plot ({error.strerror or error})") from None
    finally:
        plt.close(fig)
    return out
