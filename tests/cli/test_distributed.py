"""Two processes (torchrun, gloo on the CPU) follow the loss curve of one process with the
same global batch, with DDP and with FSDP2 sharding."""

import json
import os
import subprocess
import sys

import pytest

from tests.cli.conftest import FAST

# On the CPU on every machine (gloo): a GPU machine may have fewer GPUs than processes.
STEPS = ["--device", "cpu", "--max-steps", "4", "--eval-interval", "2", "--batch-size", "8"]


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, text_corpus):
    from gatedfwa.cli.main import main

    run = tmp_path_factory.mktemp("one") / "run"
    main(["train", *FAST, "--data", str(text_corpus), *STEPS, "--out", str(run)])
    return run


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one(tmp_path, text_corpus, one_process_run, mode):
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "gatedfwa.cli.main", "train", *FAST, "--data", str(text_corpus), *STEPS, "--out", str(two)]
    if mode == "fsdp":
        command.append("--fsdp")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stderr and "micro-batch 4" in done.stderr

    a, b = _records(one_process_run), _records(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        key = "train_loss" if "train_loss" in ra else "heldout_loss"
        # Same windows, same average; only the order of float sums differs.
        assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra, rb)
    record = json.loads((two / "checkpoints" / "step-0000004" / "train_config.json").read_text())
    assert record["world_size"] == 2
