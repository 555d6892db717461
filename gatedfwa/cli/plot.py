"""``gatedfwa plot RUN_DIR ... --out loss.png``: loss curves of one or more runs in one PNG.

Each run contributes its training loss (thin line, smoothed over a few steps) and its
held-out loss (markers), both in bits per byte (byte tokenizer) or bits per token, against
training tokens. Runs are labelled by folder name and attention kind, which makes the
figure a like-for-like comparison of attention kinds trained on the same data.

Without ``--out`` the figure goes into the first run folder: ``RUN/loss.png`` for one run,
``RUN1/compare.png`` for several (never into the working directory unasked). ``--out`` must
name a .png file in an existing folder. Everything is checked before matplotlib loads.
"""

from __future__ import annotations

import json
from pathlib import Path

from gatedfwa.errors import ConfigError
from gatedfwa.train.metrics import METRICS_FILE, nats_to_bits, read_metrics

__all__ = ["plot_runs", "default_out", "check_out", "read_runs", "PlotUnavailable"]


class PlotUnavailable(ConfigError):
    """matplotlib is not installed (it is the optional extra ``gatedfwa[plot]``)."""


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


def default_out(run_dirs: list) -> Path:
    """Where ``gatedfwa plot`` writes without --out: RUN/loss.png for one run, compare.png
    inside the first run folder for several; always inside a folder the user named, never
    the working directory unasked."""
    return Path(run_dirs[0]) / ("loss.png" if len(run_dirs) == 1 else "compare.png")


def check_out(out: Path) -> None:
    """ConfigError unless ``out`` names a .png file in an existing folder (nothing is created)."""
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder: name a .png file, e.g. {out / 'loss.png'}")
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out must name a .png file (the plot is a PNG image), got {out}")
    folder = out.parent
    if not folder.exists():
        raise ConfigError(f"--out {out}: the folder {folder} does not exist; create it first or name a .png "
                          f"file in an existing folder")
    if not folder.is_dir():
        raise ConfigError(f"--out {out}: cannot write the plot ({folder} is a file, not a folder)")


def read_runs(run_dirs: list) -> list[tuple[Path, list[dict]]]:
    """(run folder, metrics records) of each run; ConfigError for a folder that is not a run,
    a metrics file with no losses yet, or one with a line that is not a metrics record."""
    runs = []
    for raw in run_dirs:
        run = Path(raw)
        if not run.is_dir():
            raise ConfigError(f"{raw}: no such run folder")
        path = run / METRICS_FILE
        if not path.is_file():
            raise ConfigError(f"{raw}: not a run folder (no {METRICS_FILE} in it)")
        records = [r for r in read_metrics(path) if "train_loss" in r or "heldout_bits" in r]
        if not records:
            raise ConfigError(f"{path} holds no metrics yet")
        runs.append((run, records))
    return runs


def plot_runs(run_dirs: list, out: Path | None = None, smooth: int = 10) -> Path:
    """Writes the PNG (``out``; None: :func:`default_out`) and returns its path. Every
    argument is checked before matplotlib loads: ConfigError if ``smooth`` < 1, a run has
    no metrics, or ``out`` is not a .png file in an existing folder; PlotUnavailable (a
    ConfigError) without matplotlib."""
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 1:
        raise ConfigError(f"--smooth must be an integer >= 1, got {smooth!r}")
    runs = read_runs(run_dirs)
    out = default_out(run_dirs) if out is None else Path(out)
    check_out(out)

    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable("plots need matplotlib, which is not installed: pip install 'gatedfwa[plot]'") from None

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

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
        fig.savefig(out)
    except OSError as error:  # e.g. a file where a parent folder should be, or no permission
        raise ConfigError(f"--out {out}: cannot write the plot ({error.strerror or error})") from None
    finally:
        plt.close(fig)
    return out
