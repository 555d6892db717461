"""The tuning surface every op family keeps in its launch.py (gatedfwa/ops/common/tuning.py):
measured entries over rules, per architecture; overrides only within a block; nothing else
may change what a kernel launches with."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gatedfwa.ops.common.tuning import Tuning, architecture
from gatedfwa.ops.decode import launch as decode_launch
from gatedfwa.ops.gate import launch as gate_launch
from gatedfwa.ops.nsa import launch as nsa_launch
from gatedfwa.ops.window_attention import launch as attention_launch


@dataclasses.dataclass(frozen=True)
class Knobs:
    fast_path: bool = True


def tile_rule(arch, block_d, gate):
    return dict(BLOCK=64 if arch == "sm90" else 32, num_warps=4 if gate else 8)


def make_tuning(measured=None):
    return Tuning("example", key_names=("block_d", "gate"), rules={"tile": tile_rule}, measured=measured,
                  knobs=Knobs())


def test_measured_entries_win_for_their_architecture_and_keys_only():
    tuning = make_tuning({("tile", "sm90", 128, True): dict(BLOCK=128, num_warps=8)})
    assert tuning.config("tile", "sm90", block_d=128, gate=True) == dict(BLOCK=128, num_warps=8)
    assert tuning.config("tile", "sm90", block_d=128, gate=False) == dict(BLOCK=64, num_warps=8)
    assert tuning.config("tile", "sm80", block_d=128, gate=True) == dict(BLOCK=32, num_warps=4)


def test_config_returns_a_copy():
    tuning = make_tuning()
    tuning.config("tile", "sm90", block_d=64, gate=True)["BLOCK"] = 1
    assert tuning.config("tile", "sm90", block_d=64, gate=True)["BLOCK"] == 64


def test_overridden_restores_everything_even_after_an_error():
    tuning = make_tuning()
    with pytest.raises(RuntimeError):
        with tuning.overridden(rules={"tile": lambda arch, block_d, gate: dict(BLOCK=16)},
                               measured={("tile", "sm80", 64, True): dict(BLOCK=8)}, fast_path=False):
            assert tuning.config("tile", "sm90", block_d=64, gate=True) == dict(BLOCK=16)
            assert tuning.config("tile", "sm80", block_d=64, gate=True) == dict(BLOCK=8)
            assert tuning.knobs.fast_path is False
            raise RuntimeError
    assert tuning.config("tile", "sm90", block_d=64, gate=True) == dict(BLOCK=64, num_warps=4)
    assert tuning.config("tile", "sm80", block_d=64, gate=True) == dict(BLOCK=32, num_warps=4)
    assert tuning.knobs.fast_path is True


def test_nothing_changes_outside_overridden():
    tuning = make_tuning()
    with pytest.raises(TypeError):
        tuning.rules["tile"] = tile_rule
    with pytest.raises(TypeError):
        tuning.measured[("tile", "sm90", 64, True)] = {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        tuning.knobs.fast_path = False


def test_bad_requests_name_what_was_expected():
    tuning = make_tuning()
    with pytest.raises(KeyError, match="no kernel 'tiles'.*tile"):
        tuning.config("tiles", "sm90", block_d=64, gate=True)
    with pytest.raises(TypeError, match=r"keys \('block_d', 'gate'\)"):
        tuning.config("tile", "sm90", block_d=64)
    with pytest.raises(ValueError, match="measured entry"):
        make_tuning({("tile", "sm90", 64): {}})
    with pytest.raises(KeyError, match="no kernel"):
        with tuning.overridden(rules={"other": tile_rule}):
            pass
    with pytest.raises(TypeError, match="frozen dataclass"):
        Tuning("example", (), {"tile": tile_rule}, knobs={"fast_path": True})
    with pytest.raises(TypeError):
        with tuning.overridden(no_such_knob=1):
            pass


def test_architecture_names_the_interpreter_and_the_cpu():
    from gatedfwa.ops.common.triton_support import interpreting

    assert architecture(torch.device("cpu")) == ("interpreter" if interpreting() else "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_architecture_of_a_gpu():
    from gatedfwa.ops.common.triton_support import interpreting

    if interpreting():
        pytest.skip("under the interpreter every device is 'interpreter'")
    major, minor = torch.cuda.get_device_capability()
    expected = "rocm" if torch.version.hip else f"sm{major}{minor}"
    assert architecture(torch.device("cuda")) == expected


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def test_every_family_keeps_one_tuning_surface():
    """The window attention, gate, decode and NSA families' launch choices come from their
    TUNING: every rule answers on the architectures we tune for, and the tiles keep the
    invariants their kernels assert (attention forward and dq: BLOCK_M a multiple of BLOCK_N;
    dk/dv: BLOCK_N a multiple of BLOCK_M; NSA: ROWS a power of two holding whole groups,
    summary and key tiles powers of two of at least 16, gatedfwa/ops/nsa/tiles.py check_tiles)."""
    for arch in ("sm90", "sm80", "rocm", "interpreter", "cpu"):
        for block_d in (16, 32, 64, 128, 256):
            for gate in (True, False):
                forward = attention_launch.TUNING.config("forward", arch, block_d=block_d, gate=gate)
                dq = attention_launch.TUNING.config("dq", arch, block_d=block_d, gate=gate)
                dkdv = attention_launch.TUNING.config("dkdv", arch, block_d=block_d, gate=gate)
                assert forward["BLOCK_M"] % forward["BLOCK_N"] == 0
                assert dq["BLOCK_M"] % dq["BLOCK_N"] == 0
                assert dkdv["BLOCK_N"] % dkdv["BLOCK_M"] == 0
        assert gate_launch.TUNING.config("elementwise", arch)["ELEMENTS"] >= 1
        for block_d in (16, 64, 128, 256):
            step = decode_launch.TUNING.config("step", arch, block_d=block_d)
            assert step["MAX_BLOCK_M"] >= 16 and step["BLOCK_N"] >= 16
        for kernel in ("chunk_sums", "delta", "reverse_cumsum", "flux_gradient"):
            assert attention_launch.TUNING.config(kernel, arch, block_d=0, gate=False)["num_warps" if kernel in (
                "chunk_sums", "reverse_cumsum", "flux_gradient") else "BLOCK"] >= 1
        for block_d in (16, 64, 128, 256):
            for group_pad in (1, 2, 4, 8, 16, 32, 64):
                for block_size in (8, 16, 32, 64, 128):
                    keys = dict(block_d=block_d, group_pad=group_pad, block_size=block_size)
                    for kernel, key_tile in (("compressed", "BLOCK_C"), ("selection", "BLOCK_C"),
                                             ("selected", "BLOCK_K"), ("block_major", "BLOCK_K")):
                        tiles = nsa_launch.TUNING.config(kernel, arch, **keys)
                        assert is_power_of_two(tiles["ROWS"]) and tiles["ROWS"] >= max(16, group_pad), (kernel, keys)
                        assert is_power_of_two(tiles[key_tile]) and tiles[key_tile] >= 16, (kernel, keys)
                        assert tiles["num_warps"] >= 1 and tiles["num_stages"] >= 1, (kernel, keys)
                    splits = nsa_launch.TUNING.config("query_splits", arch, **keys)
                    assert splits["MIN_QUERY_SPAN"] >= 1 and splits["WAVES"] >= 1
                    assert splits["MAX_SPLITS"] is None or splits["MAX_SPLITS"] >= 1
                    assert nsa_launch.TUNING.config("work_items", arch, **keys)["ROWS_PER_ITEM"] >= group_pad
    assert nsa_launch.TUNING.knobs.block_major_max_group >= 0
