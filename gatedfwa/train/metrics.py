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


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics file (lines that are not JSON objects, e.g. a line cut short by
    a crash, are skipped)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
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
            keep = [r for r in read_metrics(previous) if r.get("step", 0) <= resume_step]
        with open(self.path, "w", encoding="utf-8") as f:
            for record in keep:
                f.write(json.dumps(record) + "\n")
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
