"""Simple bad arguments fail before torch, transformers or matplotlib load: a fraction of a
second instead of the seconds those imports take. Each case runs in a fresh interpreter,
which reports the exit status, the message, the heavy modules imported and how long
``main()`` took."""

import json
import os
import subprocess
import sys

import pytest

from tests.cli.test_startup import HEAVY, PACKAGE

# Seconds main() may take for a bad argument. The light path takes a few hundredths; importing
# torch alone takes several seconds, so a slow answer means a heavy import crept back in.
QUICK_S = 2.0

_RUN = f"""
import json, sys, time
from gatedfwa.cli.main import main
start = time.perf_counter()
try:
    status = main(sys.argv[1:])
except SystemExit as exit_:
    status = exit_.code
seconds = time.perf_counter() - start
heavy = sorted(name for name in {HEAVY!r} if name in sys.modules)
print("REPORT " + json.dumps({{"status": status, "heavy": heavy, "seconds": seconds}}), file=sys.stderr)
"""


def _run(args, cwd, env=None):
    """(report dict, stderr without the report line) of ``gatedfwa args`` in a fresh process."""
    environment = {name: value for name, value in os.environ.items() if name != "GATEDFWA_BACKEND"}
    environment.update(PYTHONPATH=str(PACKAGE.parent), **(env or {}))
    result = subprocess.run([sys.executable, "-c", _RUN, *map(str, args)], capture_output=True, text=True,
                            cwd=cwd, env=environment, timeout=120)
    lines = result.stderr.splitlines()
    report = next(line for line in lines if line.startswith("REPORT "))
    return json.loads(report[len("REPORT "):]), "\n".join(line for line in lines if not line.startswith("REPORT "))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A folder with a checkpoint-free run folder, a garbage metrics file and another
    model's checkpoint folder (a config.json with model_type llama)."""
    root = tmp_path_factory.mktemp("fast")
    (root / "empty").mkdir()
    (root / "garbage").mkdir()
    (root / "garbage" / "metrics.jsonl").write_text("this is not json\n")
    (root / "llama").mkdir()
    (root / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (root / "text.txt").write_text("hello world\n" * 100)
    return root


TRAIN = ["train", "--preset", "tiny", "--data", "text.txt", "--out", "out"]
CASES = [
    (TRAIN + ["--max-steps", "0"], "max_steps must be a positive integer, got 0"),
    (TRAIN + ["--seq-len", "0"], "seq_len must be a positive integer, got 0"),
    (TRAIN + ["--window", "0"], "model.window_size must be a positive integer"),
    (TRAIN + ["--window", "128", "--seq-len", "64"], "model.window_size (128) is larger than the context seq_len (64)"),
    (TRAIN + ["--batch-size", "0"], "batch_size must be a positive integer, got 0"),
    (TRAIN + ["--micro-batch-size", "-2"], "micro_batch_size must be a positive integer, got -2"),
    (TRAIN + ["--batch-size", "6", "--micro-batch-size", "4"], "batch_size 6 must be a multiple of micro_batch_size 4"),
    (TRAIN + ["--lr", "-0.1"], "lr must be a positive number, got -0.1"),
    (TRAIN + ["--preset", "huge"], "unknown preset 'huge'"),
    (TRAIN + ["--attention", "linear"], "--attention: unknown attention kind 'linear'"),
    (["train", "--data", "missing.txt"], "--data: no such file or folder: missing.txt"),
    (TRAIN + ["--config", "missing.json"], "--config: no such file: missing.json"),
    (["train", "--resume", "missing"], "--resume: no such checkpoint or run folder: missing"),
    (["train", "--resume", "empty"], "--resume: empty holds no checkpoint"),
    (["train", "--resume", "llama"], "--resume: llama holds a 'llama' model"),
    (["generate", "--ckpt", "missing"], "--ckpt: no such checkpoint or run folder: missing"),
    (["generate", "--ckpt", "llama"], "--ckpt: llama holds a 'llama' model"),
    (["generate", "--ckpt", "empty", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["generate", "--ckpt", "empty", "--temperature", "-1"], "--temperature must be >= 0"),
    (["generate", "--ckpt", "empty", "--temperature", "nan"], "--temperature must be >= 0 (0 = greedy) and finite"),
    (["generate", "--ckpt", "empty", "--top-k", "0"], "--top-k must be >= 1, got 0"),
    (["plot", "missing"], "missing: no such run folder"),
    (["plot", "empty"], "empty: not a run folder (no metrics.jsonl in it)"),
    (["plot", "garbage"], "garbage/metrics.jsonl line 1 is not a metrics record"),
    (["plot", "garbage", "--smooth", "0"], "--smooth must be an integer >= 1, got 0"),
]


def _case_id(args):
    """The command and what differs from the other cases, e.g. "train --max-steps 0"."""
    return " ".join([args[0], *(args[len(TRAIN):] if args[:len(TRAIN)] == TRAIN else args[1:])])


@pytest.mark.parametrize("args, message", CASES, ids=[_case_id(args) for args, _ in CASES])
def test_bad_argument_fails_before_heavy_imports(folders, args, message):
    report, err = _run(args, folders)
    command = args[0]
    assert report["status"] == 2, err
    assert f"gatedfwa {command}: error: " in err and message in err, err
    assert "Traceback" not in err and err.count("\n") == 0, err
    assert report["heavy"] == [], f"{args}: imported {report['heavy']} before failing"
    assert report["seconds"] < QUICK_S, report


@pytest.mark.parametrize("variable, value, message", [
    ("GATEDFWA_BACKEND", "cuda", "GATEDFWA_BACKEND='cuda' is not a backend; accepted values: auto, triton, torch"),
    ("WORLD_SIZE", "two", "WORLD_SIZE='two' must be a whole number >= 1: how many processes train together"),
    ("LOCAL_RANK", "-1", "LOCAL_RANK='-1' must be a whole number >= 0"),
])
def test_bad_environment_variable_fails_before_heavy_imports(folders, variable, value, message):
    for args in (TRAIN, ["generate", "--ckpt", "empty"]):
        report, err = _run(args, folders, env={variable: value})
        assert report["status"] == 2 and message in err and "Traceback" not in err, err
        assert report["heavy"] == [], report
