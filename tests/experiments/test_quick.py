"""Every experiment's --quick mode runs and writes a sane record and figure; the shared
training loop trains exactly as ``gatedfwa train``; the synthetic data and the music
tokeniser hold their invariants."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EXPERIMENTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "experiments"
sys.path.insert(0, str(EXPERIMENTS_DIR))

import kit  # noqa: E402
import run as driver  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: several threads only contend on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def numbers(value, path="$"):
    """(path, number) of every int/float in a JSON value."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from numbers(item, f"{path}[{index}]")


@pytest.mark.parametrize("name", driver.EXPERIMENTS)
def test_quick_mode_writes_json_and_png(name, tmp_path):
    if name == "second_domain":
        pytest.importorskip("music21")
    module = __import__(name)
    config = kit.build_config(module, quick=True)
    kit.run_experiment(module, config, tmp_path, quick=True, deadline=kit.Deadline(None))

    record = json.loads((tmp_path / f"{name}.json").read_text())
    assert record["experiment"] == name and record["quick"] is True
    assert record["seeds"] == [0, 1] and record["config"]["kinds"]
    assert record["environment"]["torch"] == torch.__version__ and record["environment"]["git_commit"]
    assert "error" not in record and record["skipped"] == []
    seeds = {arm["seed"] for arm in record["arms"]}
    assert seeds == {0, 1}, "every arm runs with two seeds"
    assert record["results"], "the summary is filled"
    bad = [(path, value) for path, value in numbers(record) if not math.isfinite(value)]
    assert not bad, f"non-finite numbers: {bad[:5]}"
    # Strings "nan"/"inf" are how the record would carry non-finite values.
    assert '"nan"' not in json.dumps(record) and '"inf"' not in json.dumps(record)
    png = tmp_path / f"{name}.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    assert record["figures"] == [png.name]


def test_quick_losses_are_plausible(tmp_path):
    """Held-out loss of the quick LM runs starts near log2(256) = 8 bits and falls."""
    import lm_equal_tokens

    record = kit.run_experiment(lm_equal_tokens, kit.build_config(lm_equal_tokens, quick=True), tmp_path, True,
                                kit.Deadline(None))
    for arm in record.arms:
        curve = [point["heldout_bits"] for point in arm["curve"]]
        assert 7.0 < curve[0] < 9.0 and curve[-1] < curve[0]


def test_training_loop_matches_the_trainer(tmp_path):
    """lm.train_lm gives the training losses of gatedfwa.train.trainer.train bit for bit."""
    import lm
    from gatedfwa.train.config import TrainConfig
    from gatedfwa.train.presets import get_preset
    from gatedfwa.train.trainer import train

    preset = get_preset("tiny")
    data = [str(Path(lm.__file__).parent)]  # the experiment scripts as a small text corpus
    settings = {**preset, "data": data, "max_steps": 4, "eval_interval": 2, "save_interval": 0, "seed": 3}
    model = settings.pop("model")
    train(TrainConfig(**settings, model=model, attention="gatedfwa", device="cpu", plot=False, progress=False),
          tmp_path / "run")
    expected = [json.loads(line)["train_loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                if "train_loss" in line]
    spec = {"train": {k: v for k, v in settings.items() if k != "seed"}, "model": model, "kind": "gatedfwa", "seed": 3,
            "grad_log_interval": 1, "device": "cpu", "compile": False}
    ours = lm.train_lm(spec).history
    assert ours["train_loss"] == expected
    assert len(ours["grad_norms"]) == 4 and all(math.isfinite(v) for r in ours["grad_norms"] for v in r["attention"])
    assert [e["step"] for e in ours["eval"]] == [0, 2, 4]


def test_attention_probabilities_reproduce_the_library():
    """p @ v from memory_gradient_flow's probabilities equals gated_window_attention."""
    from memory_gradient_flow import attention_probabilities

    from gatedfwa import gated_window_attention

    q, k, v = torch.randn(2, 40, 4, 8), torch.randn(2, 40, 2, 8), torch.randn(2, 40, 2, 8)
    g = -torch.rand(2, 40, 4)
    for gate, window in ((g, 7), (None, 7), (g, None)):
        p = attention_probabilities(q, k, gate, window, 8**-0.5)
        assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5)
        read = torch.matmul(p, v.transpose(1, 2).repeat_interleave(2, dim=1)).transpose(1, 2)
        torch.testing.assert_close(read, gated_window_attention(q, k, v, gate, window_size=window), atol=1e-5, rtol=1e-5)


def test_mqar_batch_is_consistent():
    from associative_recall import mqar_batch

    ids, labels, queries = mqar_batch(np.random.default_rng(0), 16, 64, 6, 10, 12)
    rows = np.arange(16)[:, None]
    position, value, distance = queries["position"], queries["value"], queries["distance"]
    assert (ids.numpy()[rows, position + 1] == value).all()  # the value follows the query key
    assert (labels.numpy()[rows, position + 1] == value).all() and (labels != -100).sum() == 16 * 6
    # The value to recall sits `distance` positions before the query key, after the same key.
    assert (ids.numpy()[rows, position - distance] == value).all()
    assert (ids.numpy()[rows, position - distance - 1] == ids.numpy()[rows, position]).all()
    assert (distance >= 1).all() and ids.max() < 1 + 10 + 12

    # Short examples: the first rows keep every pair and query inside the short span.
    ids, labels, queries = mqar_batch(np.random.default_rng(1), 16, 64, 6, 10, 12, short_rows=5, short_len=24)
    assert (queries["position"][:5] + 1 < 24).all() and (ids.numpy()[:5, 24:] == 0).all()
    assert (queries["position"][5:] >= 24).any() and (labels != -100).sum() == 16 * 6
    with pytest.raises(ValueError, match="short_len"):
        mqar_batch(np.random.default_rng(1), 4, 64, 6, 10, 12, short_rows=2, short_len=16)


def test_music_tokens_round_trip():
    from second_domain import DURATION_BASE, MAX_SHIFT, PIECE, PITCH_BASE, SHIFT_BASE, VOCAB_SIZE, encode

    events = [(0, 60, 12), (0, 64, 12), (12, 67, 6), (12 + 2 * MAX_SHIFT + 3, 72, 500)]
    ids = encode(events)
    assert ids[0] == PIECE and max(ids) < VOCAB_SIZE
    # Decode: onsets from the shifts, (pitch, duration) pairs in order.
    onset, decoded = 0, []
    for token, following in zip(ids[1:], ids[2:] + [None]):
        if SHIFT_BASE <= token < PITCH_BASE:
            onset += token - SHIFT_BASE + 1
        elif PITCH_BASE <= token < DURATION_BASE:
            decoded.append((onset, token - PITCH_BASE, following - DURATION_BASE + 1))
    assert decoded == [(0, 60, 12), (0, 64, 12), (12, 67, 6), (12 + 2 * MAX_SHIFT + 3, 72, 96)]  # capped duration


def test_driver_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit):
        driver.main(["nonexistent", "--quick"])
    assert "unknown experiment" in capsys.readouterr().err


def _quick_record(module, out_dir, commit=None, **settings):
    """A quick run of ``module`` into ``out_dir``; ``commit``: the commit its record names
    (a clean tree), else what provenance.py finds here."""
    import provenance

    config = kit.build_config(module, quick=True)
    config.update(settings)
    settled = provenance._settled
    if commit is not None:
        provenance._settled = {"git_commit": commit, "dirty": False, "commit_from": "git"}
    try:
        return kit.run_experiment(module, config, out_dir, True, kit.Deadline(None))
    finally:
        provenance._settled = settled


COMMIT_A, COMMIT_B, COMMIT_C = "a" * 40, "b" * 40, "c" * 40  # not in any history: different code


def _provenance_of(record) -> list[tuple]:
    """(kind, seed, commit of the arm's run) for each arm of a merged record."""
    sources = record.data["sources"]
    return [(arm["kind"], arm["seed"], sources[arm["source"]]["environment"]["git_commit"]) for arm in record.arms]


def test_merge_adds_arms_of_a_like_for_like_run(tmp_path):
    """merge.py unites the arms of two runs of one commit, derives the results again and
    keeps both sources."""
    import associative_recall
    import merge

    _quick_record(associative_recall, tmp_path / "base", COMMIT_A, kinds=["gatedfwa"], seeds=[0])
    _quick_record(associative_recall, tmp_path / "extra", COMMIT_A, kinds=["full"], seeds=[0])
    merged = merge.merge(tmp_path / "base" / "associative_recall.json", tmp_path / "extra" / "associative_recall.json",
                         tmp_path / "merged")
    saved = json.loads(merged.json_path.read_text())
    assert saved["config"]["kinds"] == ["gatedfwa", "full"]
    assert [(arm["kind"], arm["source"]) for arm in saved["arms"]] == [("gatedfwa", 0), ("full", 1)]
    assert [entry["kind"] for entry in saved["results"]["summary"]] == ["gatedfwa", "full"]
    assert len(saved["sources"]) == 2 and "mixed_commits" not in saved
    assert saved["environment"]["git_commit"] == COMMIT_A and "git_commits" not in saved["environment"]
    assert (tmp_path / "merged" / "associative_recall.png").read_bytes()[:8] == PNG_MAGIC

    # An arm of the extra run replaces the base's arm of the same name; the run it replaced,
    # with no arm left, leaves the sources.
    again = merge.merge(merged.json_path, tmp_path / "extra" / "associative_recall.json", tmp_path / "again")
    assert [(arm["kind"], arm["source"]) for arm in again.arms] == [("gatedfwa", 0), ("full", 1)]
    assert len(again.data["sources"]) == 2

    # Runs that differ in how an arm runs are not like for like.
    _quick_record(associative_recall, tmp_path / "other", COMMIT_A, kinds=["full"], seeds=[0], steps=3)
    with pytest.raises(ValueError, match="steps"):
        merge.merge(tmp_path / "base" / "associative_recall.json", tmp_path / "other" / "associative_recall.json",
                    tmp_path / "refused")


def test_merge_keeps_each_arms_run_and_refuses_mixed_code_unless_told(tmp_path):
    """Arms of different commits are merged only with a recorded reason; a merged base
    keeps its own sources, so every arm still names the run (and commit) it came from."""
    import associative_recall
    import merge

    runs = {}
    for name, commit, kind, seed in (("a", COMMIT_A, "gatedfwa", 0), ("b", COMMIT_B, "full", 0),
                                      ("c", COMMIT_C, "gatedfwa", 1), ("b2", COMMIT_B, "full", 1)):
        _quick_record(associative_recall, tmp_path / name, commit, kinds=[kind], seeds=[seed])
        runs[name] = tmp_path / name / "associative_recall.json"

    with pytest.raises(ValueError, match="different code.*--allow-mixed-commits"):
        merge.merge(runs["a"], runs["b"], tmp_path / "refused")
    first = merge.merge(runs["a"], runs["b"], tmp_path / "ab", allow_mixed_commits="seed 0 of full re-run later")
    assert first.data["mixed_commits"] == {"commits": [COMMIT_A, COMMIT_B], "reasons": ["seed 0 of full re-run later"]}
    assert "git_commit" not in first.data["environment"] and first.data["environment"]["git_commits"] == [COMMIT_A, COMMIT_B]

    # A third commit needs a decision of its own; a run of a commit already there does not.
    with pytest.raises(ValueError, match="different code"):
        merge.merge(first.json_path, runs["c"], tmp_path / "refused")
    second = merge.merge(first.json_path, runs["b2"], tmp_path / "abb")
    assert _provenance_of(second) == [("gatedfwa", 0, COMMIT_A), ("full", 0, COMMIT_B), ("full", 1, COMMIT_B)]
    third = merge.merge(second.json_path, runs["c"], tmp_path / "abbc", allow_mixed_commits="seed 1 of gatedfwa")
    assert _provenance_of(third) == [("gatedfwa", 0, COMMIT_A), ("full", 0, COMMIT_B), ("full", 1, COMMIT_B),
                                     ("gatedfwa", 1, COMMIT_C)]
    assert third.data["mixed_commits"]["reasons"] == ["seed 0 of full re-run later", "seed 1 of gatedfwa"]
    assert [source["file"] for source in third.data["sources"]] == [str(runs[name]) for name in ("a", "b", "b2", "c")]
    assert third.data["wall_s"] == pytest.approx(sum(json.loads(runs[name].read_text())["wall_s"]
                                                     for name in ("a", "b", "b2", "c")))

    # The command line asks for a reason.
    with pytest.raises(SystemExit):
        merge.main([str(runs["a"]), str(runs["b"]), "--out", str(tmp_path / "cli"), "--allow-mixed-commits", " "])
    assert merge.main([str(runs["a"]), str(runs["b"]), "--out", str(tmp_path / "cli"),
                       "--allow-mixed-commits", "a reason"]) == 0


def test_merge_compares_the_code_of_two_commits():
    """Two names of one commit have the same code; an unknown commit or a dirty tree has
    code of its own."""
    import merge
    import provenance

    head = provenance.head_commit()
    if head is None:
        pytest.skip("needs a git checkout (an sdist has none)")
    assert merge.same_code({"git_commit": head}, {"git_commit": head[:9]})
    assert not merge.same_code({"git_commit": head}, {"git_commit": head, "dirty": True})
    assert not merge.same_code({"git_commit": "unknown"}, {"git_commit": "unknown"})
    assert not merge.same_code({"git_commit": head}, {"git_commit": COMMIT_A})


def test_set_overrides_one_setting_and_rejects_unknown_keys():
    import cost

    config = kit.build_config(cost, quick=True, overrides=kit.parse_overrides(['parts=["decode"]', "decode_tokens=3"]))
    assert config["parts"] == ["decode"] and config["decode_tokens"] == 3
    with pytest.raises(ValueError, match="no setting 'part'"):
        kit.build_config(cost, quick=True, overrides={"part": ["decode"]})
    with pytest.raises(ValueError, match="KEY=JSON"):
        kit.parse_overrides(["parts"])


def test_cost_runs_only_the_parts_asked_for(tmp_path):
    import cost

    record = _quick_record(cost, tmp_path, parts=["decode"], seeds=[0])
    assert {arm["part"] for arm in record.arms} == {"decode"}
    assert record.results["decoding"] and not record.results["training_tokens_per_s"]


def test_parallel_arms_give_the_numbers_of_arms_run_one_after_another(tmp_path, monkeypatch):
    """run_arms_parallel (the GPU path of associative_recall) trains each arm in a worker
    process, wave by wave, and records the same numbers, in arm order, as run_arms in this
    process; a wave that no longer fits the deadline is skipped."""
    import functools

    import associative_recall

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the workers compute on one thread, as this process does

    config = kit.build_config(associative_recall, quick=True, kinds=["gatedfwa", "full"], seeds=[0])
    config["steps"] = 2
    arms = associative_recall.arm_list(config)
    assert len(arms) == 2
    run_one = functools.partial(associative_recall.run_arm, config)
    serial = kit.Record("serial", "claim", config, tmp_path / "serial", quick=True)
    kit.run_arms(arms, run_one, serial, kit.Deadline(None))
    parallel = kit.Record("parallel", "claim", config, tmp_path / "parallel", quick=True)
    kit.run_arms_parallel(arms, run_one, parallel, kit.Deadline(None), workers=2)

    def numbers_of(record):
        return [{key: value for key, value in arm.items() if key != "wall_s"} for arm in record.arms]

    assert [arm["kind"] for arm in parallel.arms] == ["gatedfwa", "full"]
    assert numbers_of(parallel) == numbers_of(serial)
    assert all(arm["train_loss_first"] > 0 and arm["curve"] for arm in parallel.arms)

    late = kit.Record("late", "claim", config, tmp_path / "late", quick=True)
    kit.run_arms_parallel(arms, run_one, late, kit.Deadline(-1.0), workers=2)
    assert late.arms == [] and [entry["kind"] for entry in late.data["skipped"]] == ["gatedfwa", "full"]


def test_doc_tables_match_the_committed_records():
    """docs/experiments.md's result tables are those tables.py writes from the JSON files."""
    import tables

    assert tables.main(["--check"]) == 0, "run python benchmarks/experiments/tables.py"
