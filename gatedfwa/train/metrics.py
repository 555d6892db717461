"""Metrics of a run: one JSON object per line in ``RUN/metrics.jsonl``.

Training records: ``{"step", "tokens", "train_loss", "lr", "grad_norm", "tokens_per_s",
"elapsed_s"}``; held-out records: ``{"step", "tokens", "heldout_loss", "heldout_bits",
"unit"}``. Losses are mean cross-entropy in nats per predicted token; ``heldout_bits`` is
the same in bits, per byte with the byte tokenizer (``unit`` = "byte") and per token
otherwise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["MetricsLog", "read_metrics", "nats_to_bits"]

METRICS_FILE = "metrics.jsonl"


def nats_to_bits(nats: float) -> float:
    return nats / math.log(2)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_record(record) -> bool:
    """A JSON object whose losses, if it has any, come with numeric values and tokens."""
    if not isinstance(record, dict):
        return False
    needed = []
    if "train_loss" in record:
        needed += ["tokens", "train_loss"]
    if "heldout_loss" in record or "heldout_bits" in record:
        needed += ["tokens", "heldout_bits"]
    return all(_is_number(record.get(name)) for name in needed)


def read_metrics(path: Path, skip_damaged: bool = False) -> list[dict]:
    """Records of a metrics file. A last line without its newline that does not parse was
    cut short by a crash and is skipped; any other line that is not a metrics record (one
    JSON object, numeric losses and tokens) raises ConfigError naming the file and line,
    unless ``skip_damaged``, which skips it (a resumed run keeps what it can)."""
    from gatedfwa.errors import ConfigError

    try:
        lines = Path(path).read_bytes().split(b"\n")
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror or error}") from None
    records = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except ValueError:  # also UnicodeDecodeError: bytes that are not text
            record = None
        if _is_record(record):
            records.append(record)
        elif not (skip_damaged or number == len(lines)):  # the last piece has no newline: cut short
            shown = raw[:60].decode("utf-8", errors="replace")
            raise ConfigError(
                f"{path} line {number} is not a metrics record (gatedfwa train writes one JSON object per line, "
                f"with numeric tokens and losses): {shown!r}{'...' if len(raw) > 60 else ''}"
            )
    return records


class MetricsLog:
    """Appends records to RUN/metrics.jsonl. When a run resumes at step k, records after k
    (written by the interrupted run past its last checkpoint) are dropped first, so the
    file reads as one uninterrupted run."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, previous: Path | None = None):
        """``previous``: the metrics file of the run being resumed (it may be this one);
        its records up to ``resume_step`` start the new file."""
        self.path = run_dir / METRICS_FILE
        keep: list[dict] = []
        if resume_step is not None and previous is not None and previous.exists():
            keep = [r for r in read_metrics(previous, skip_damaged=True) if r.get("step", 0) <= resume_step]
        with open(self.path, "w", encoding="utf-8") as f:
            for record in keep:
                f.write(json.dumps(record) + "\n")
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
