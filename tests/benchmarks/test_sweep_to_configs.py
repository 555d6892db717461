"""The launch table written from a kernel sweep's JSON (benchmarks/sweep_to_configs.py), on
the CPU: the winners, the table's source, the comparison with the package's table, and the
refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import sweep_to_configs  # noqa: E402

FAST = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, USE_TMA=True)
SLOW = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
WRONG = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2, USE_TMA=True)
PARTIAL = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=4)


def sweep_row(config, window, ms, check="ok", kernel="forward", head_dim=128, gate=True):
    return dict(kernel=kernel, head_dim=head_dim, gate=gate, window=window, config=config, check=check, kernel_ms=ms)


SWEEP_ROWS = [sweep_row(FAST, 512, 1.0), sweep_row(FAST, 2048, 3.0), sweep_row(SLOW, 512, 0.9),
              sweep_row(SLOW, 2048, 3.5), sweep_row(WRONG, 512, 0.1, check="o: max error 1e-1 exceeds"),
              sweep_row(WRONG, 2048, 0.1, check="o: ..."), sweep_row(PARTIAL, 512, 0.05),
              {**sweep_row(PARTIAL, 2048, None), "error": "OutOfMemoryError"},
              {**sweep_row(SLOW, 512, 0.4, kernel="dkdv", head_dim=64, gate=False), "candidate": "64x64 w4 s3 (default)"}]
BEST = {("forward", 128, True): FAST, ("dkdv", 64, False): SLOW}


def test_sweep_winners_and_table(tmp_path):
    """The winner is the fastest candidate summed over the windows that passed its check and
    was timed at every window; the written table is valid Python holding the winners."""
    best = sweep_to_configs.best_configs(SWEEP_ROWS)
    assert best == BEST
    out = tmp_path / "table.py"
    other = {("dq", "sm80", 64, True): SLOW}
    out.write_text(sweep_to_configs.table_source(best, {"gpu": "test GPU"}, "sm90", other))
    table = sweep_to_configs.read_table(out)
    assert sweep_to_configs.on_architecture(table, "sm90") == best
    assert sweep_to_configs.on_architecture(table, "sm80") == {("dq", 64, True): SLOW}
    assert "test GPU" in out.read_text()


def test_sweep_to_configs_writes_beside_the_results_and_compares(tmp_path, capsys):
    """The command writes the table where --out says (by default under benchmarks/results/,
    never into the package) and prints each entry against the current table."""
    assert sweep_to_configs.TABLE.parent == BENCHMARKS / "results"
    sweep = tmp_path / "attention_sweep.json"
    sweep.write_text(json.dumps({"environment": {"gpu": "test GPU", "git_commit": "abc1234", "arch": "sm90"},
                                 "rows": SWEEP_ROWS}))
    current = tmp_path / "tuned.py"
    current.write_text(sweep_to_configs.table_source({("forward", 128, True): SLOW, ("dq", 64, True): SLOW}, {},
                                                     "sm90", {("forward", "sm80", 64, False): FAST}))
    out = tmp_path / "results" / "table.py"
    sweep_to_configs.main([str(sweep), "--out", str(out), "--current", str(current)])
    written = sweep_to_configs.read_table(out)
    assert sweep_to_configs.on_architecture(written, "sm90") == BEST
    assert written[("forward", "sm80", 64, False)] == FAST  # another architecture's entry carried over
    printed = capsys.readouterr().out
    assert f"changed  ('forward', 128, True): {FAST} (now {SLOW})\n" in printed
    assert f"new      ('dkdv', 64, False): {SLOW} (launch.py's default when swept)" in printed
    assert f"dropped  ('dq', 64, True): {SLOW}" in printed
    with pytest.raises(SystemExit):
        sweep_to_configs.main([str(sweep), "--out", str(sweep_to_configs.PACKAGE_TABLE)])


def test_sweep_to_configs_needs_the_architecture(tmp_path):
    """A sweep that did not record its architecture needs --arch; a contradicting one is refused."""
    sweep = tmp_path / "attention_sweep.json"
    sweep.write_text(json.dumps({"environment": {"gpu": "test GPU"}, "rows": SWEEP_ROWS}))
    out = tmp_path / "table.py"
    with pytest.raises(SystemExit):
        sweep_to_configs.main([str(sweep), "--out", str(out)])
    assert not out.exists()
    sweep_to_configs.main([str(sweep), "--out", str(out), "--arch", "sm90", "--current", str(tmp_path / "none.py")])
    assert sweep_to_configs.on_architecture(sweep_to_configs.read_table(out), "sm90") == BEST
    sweep.write_text(json.dumps({"environment": {"arch": "sm80"}, "rows": SWEEP_ROWS}))
    with pytest.raises(SystemExit):
        sweep_to_configs.main([str(sweep), "--out", str(out), "--arch", "sm90"])


def test_sweep_to_configs_refuses_a_sweep_without_winners(tmp_path):
    sweep = tmp_path / "attention_sweep.json"
    sweep.write_text(json.dumps({"environment": {"arch": "sm90"}, "rows": [sweep_row(WRONG, 512, 0.1, check="o: wrong")]}))
    with pytest.raises(SystemExit):
        sweep_to_configs.main([str(sweep), "--out", str(tmp_path / "table.py")])
    assert not (tmp_path / "table.py").exists()
