"""`gatedfwa train --context-parallel 2` under torchrun (gloo on the CPU) follows the loss
curve of one process with the same global batch: 2 processes splitting every window (DDP),
and 4 processes as 2 data-parallel x 2 context-parallel ranks on a 2-D DeviceMesh (FSDP2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.cli.conftest import FAST, text_corpus  # noqa: F401  (text_corpus is a fixture)

# On the CPU on every machine (gloo): a GPU machine may have fewer GPUs than processes.
STEPS = ["--device", "cpu", "--max-steps", "3", "--eval-interval", "3", "--batch-size", "4"]


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _one_process(tmp_path, corpus, options):
    from gatedfwa.cli.main import main

    run = tmp_path / "one"
    assert main(["train", *FAST, "--data", str(corpus), *STEPS, *options, "--out", str(run)]) == 0
    return _records(run)


# processes, options: window 40 is longer than a shard of the 64-token windows (32), 16 shorter.
RUNS = [
    (2, ["--window", "40"]),
    (4, ["--attention", "swa", "--fsdp"]),
]


@pytest.mark.parametrize("processes,options", RUNS, ids=["cp2-ddp-w>shard", "dp2xcp2-fsdp-swa"])
def test_context_parallel_training_equals_one_process(tmp_path, text_corpus, processes, options):  # noqa: F811
    run = tmp_path / "parallel"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "-m", "gatedfwa.cli.main", "train", *FAST, "--data", str(text_corpus), *STEPS, *options,
               "--context-parallel", "2", "--out", str(run)]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"({processes // 2} data parallel x 2 context parallel)" in done.stderr

    expected, got = _one_process(tmp_path, text_corpus, options), _records(run)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(expected, got):
        key = "train_loss" if "train_loss" in a else "heldout_loss"
        # The same windows and the same mean; only the order of float sums differs.
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a, b)


def test_context_parallel_settings_are_checked():
    from gatedfwa.errors import ConfigError
    from gatedfwa.train.config import TrainConfig

    model = {"num_hidden_layers": 1, "window_size": 4}
    with pytest.raises(ConfigError, match="seq_len .* multiple of context_parallel"):
        TrainConfig(model=model, seq_len=63, context_parallel=2).validate()
    with pytest.raises(ConfigError, match="--compile"):
        TrainConfig(model=model, seq_len=64, context_parallel=2, compile=True).validate()
    with pytest.raises(ConfigError, match="context_parallel must be a positive integer"):
        TrainConfig(model=model, context_parallel=0).validate()
