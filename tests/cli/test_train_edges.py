"""Edges of `gatedfwa train`: resuming a finished run, --max-steps below the checkpoint,
a 1-token context, a batch far beyond the machine's memory, and the CPU thread count."""

import contextlib
import resource
import sys
import time
from pathlib import Path

import pytest
import torch

import gatedfwa.train.threads as threads
from tests.cli.conftest import FAST, folder_files


@pytest.fixture
def run(run_copy):
    return run_copy


def test_resuming_a_finished_run_writes_nothing(cli, run, tmp_path):
    before = folder_files(run)
    for extra in ([], ["--max-steps", 2], ["--out", tmp_path / "elsewhere"]):
        status, out, err = cli(["train", "--resume", run, "--no-progress", *extra])
        assert status == 0, err
        assert out.count("\n") == 1 and "Traceback" not in err
        assert "the run is finished" in out and "is step 2" in out, out
        assert f"raise --max-steps: gatedfwa train --resume {run} --max-steps 4" in out, out
        assert folder_files(run) == before
    assert not (tmp_path / "elsewhere").exists()


def test_max_steps_below_the_checkpoint_is_refused(cli, run):
    before = folder_files(run)
    status, out, err = cli(["train", "--resume", run, "--max-steps", 1, "--no-progress"])
    assert status == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "gatedfwa train: error: --max-steps 1 is below the step of the checkpoint to resume" in err, err
    assert "is step 2" in err and "for 1 more, give --max-steps 3" in err, err
    assert folder_files(run) == before


def test_a_one_token_context_is_refused(cli, text_corpus, tmp_path):
    status, _, err = cli(["train", *FAST, "--data", text_corpus, "--seq-len", 1, "--window", 1, "--out", tmp_path / "o"])
    assert status == 2 and "Traceback" not in err, err
    assert "gatedfwa train: error: seq_len must be at least 2, got 1" in err
    assert not (tmp_path / "o").exists()


def test_the_shortest_context_trains(cli, text_corpus, tmp_path):
    status, _, err = cli(["train", *FAST, "--data", text_corpus, "--seq-len", 2, "--window", 2, "--max-steps", 1,
                          "--out", tmp_path / "o"])
    assert status == 0, err
    assert "held-out loss nan" not in err


@contextlib.contextmanager
def _address_space_limit(headroom: int):
    """Caps this process's address space at its current size + ``headroom`` bytes, so that a
    run that does try to allocate far too much fails with an error instead of bringing the
    machine down. Linux only (elsewhere no cap)."""
    status = Path("/proc/self/status")
    if not sys.platform.startswith("linux") or not status.exists():
        yield
        return
    size = next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines() if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = size + headroom if hard == resource.RLIM_INFINITY else min(hard, size + headroom)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_a_batch_beyond_memory_is_refused_before_allocating(cli, text_corpus, tmp_path, trained_run):
    # trained_run has imported everything a run needs: the time measured is the run's own.
    out = tmp_path / "o"
    with _address_space_limit(headroom=4 * 2**30):
        started = time.perf_counter()
        status, _, err = cli(["train", *FAST, "--data", text_corpus, "--batch-size", 1_000_000, "--out", out])
        seconds = time.perf_counter() - started
    assert status == 2 and "Traceback" not in err, err
    message = err.strip().splitlines()[-1]
    assert message.startswith("gatedfwa train: error: a micro-batch of 1000000 windows needs about "), err
    assert " GiB is available RAM: lower --micro-batch-size (at most about " in message, message
    assert seconds < 5, seconds
    assert not out.exists()


def test_the_presets_fit_a_small_machine():
    # The CPU presets must never be refused on an ordinary machine: estimated well under 2 GiB.
    from gatedfwa.models import GatedFWAConfig, GatedFWAForCausalLM
    from gatedfwa.train.config import TrainConfig
    from gatedfwa.train.memory import estimate_training_memory
    from gatedfwa.train.presets import get_preset

    for name, device, limit in (("cpu", "cpu", 2), ("tiny", "cpu", 2), ("gpu-20m", "cuda", 20), ("gpu-125m", "cuda", 40)):
        preset = TrainConfig.from_dict(get_preset(name), name)
        config = GatedFWAConfig(**preset.model, vocab_size=256)
        with torch.device("meta"):
            parameters = sum(p.numel() for p in GatedFWAForCausalLM(config).parameters())
        micro, _ = preset.micro_steps(1)
        estimate = estimate_training_memory(config, parameters, micro, preset.seq_len, torch.device(device))
        assert estimate.total < limit * 2**30, (name, estimate)


def test_threads_are_chosen_and_reported(cli, text_corpus, tmp_path):
    before = torch.get_num_threads()
    status, _, err = cli(["train", *FAST, "--data", text_corpus, "--max-steps", 1, "--threads", 2, "--out", tmp_path / "a"])
    assert status == 0, err
    assert "1 process(es) on cpu, 2 CPU threads, batch" in err, err
    assert torch.get_num_threads() == before  # the process's setting is left as found
    status, _, err = cli(["train", *FAST, "--data", text_corpus, "--threads", 0, "--out", tmp_path / "b"])
    assert status == 2 and "threads must be a positive integer, got 0" in err, err


def test_automatic_threads(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    assert threads.choose_threads(None, cpu) == 1  # a small machine: one thread
    assert threads.choose_threads(3, cpu) == 3  # asked for
    assert threads.choose_threads(None, cuda) == torch.get_num_threads()
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    assert threads.choose_threads(None, cpu) == torch.get_num_threads()  # torch's choice
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    assert threads.choose_threads(None, cpu) == torch.get_num_threads()  # the user's OMP_NUM_THREADS stands


def test_without_matplotlib_training_ends_without_the_plot(cli, text_corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    out_dir = tmp_path / "run"
    with_plot = [arg for arg in FAST if arg != "--no-plot"]
    status, out, err = cli(["train", *with_plot, "--data", text_corpus, "--out", out_dir])
    assert status == 0, err
    assert "plot:       skipped (plots need matplotlib, which is not installed: pip install 'gatedfwa[plot]')" in out
    assert (out_dir / "metrics.jsonl").is_file() and not (out_dir / "loss.png").exists()


def test_tf32_is_switched_on_for_training_only():
    from gatedfwa.train.trainer import _tf32_matmuls

    flags = torch.backends.cuda.matmul, torch.backends.cudnn
    before = [flag.allow_tf32 for flag in flags]
    try:
        for flag in flags:
            flag.allow_tf32 = False
        with _tf32_matmuls(torch.device("cuda")):  # the flags need no GPU to be read and set
            assert all(flag.allow_tf32 for flag in flags)
        assert not any(flag.allow_tf32 for flag in flags)
        with pytest.raises(RuntimeError), _tf32_matmuls(torch.device("cuda")):
            raise RuntimeError("a failed run")
        assert not any(flag.allow_tf32 for flag in flags)
        with _tf32_matmuls(torch.device("cpu")):
            assert not any(flag.allow_tf32 for flag in flags)
    finally:
        for flag, value in zip(flags, before):
            flag.allow_tf32 = value
