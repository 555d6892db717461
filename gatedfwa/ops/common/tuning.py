"""One tuning surface per op family: every launch choice of a family's kernels in one object.

A family (window attention, gate, decode, NSA) keeps a `Tuning` in its launch.py. It holds:

- rules: for each kernel, a function of the GPU architecture and the kernel's keys (e.g. the
  head size's BLOCK_D and whether a gate is applied) that returns its launch configuration
  (tile sizes, num_warps, num_stages, ...): the family's defaults, written as code with the
  measurements that chose them in comments;
- measured: entries that take precedence over the rules for one (kernel, architecture, keys),
  written from a sweep on that GPU (e.g. benchmarks/sweep_to_configs.py);
- knobs: switches that are not launch shapes (e.g. whether a kernel may use an inline-assembly
  store), which benchmarks turn off to time the portable path.

The architecture is a string: "sm90" for compute capability 9.0 (H100/H200), "sm80", ...,
"rocm" for AMD GPUs, "interpreter" under TRITON_INTERPRET=1 (where rules return the small
tiles the tests want: several tiles per sequence at tiny sizes) and "cpu" otherwise.

Tests and benchmarks change a family's choices only through `Tuning.overridden(...)`, a
context manager: rules, measured entries and knobs are read-only everywhere else, so what a
kernel launches with is always what this object says.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType

import torch

from gatedfwa.ops.common.triton_support import interpreting

__all__ = ["Tuning", "architecture"]

Rule = Callable[..., dict]


def architecture(device: torch.device) -> str:
    """The key launch configurations are chosen by for tensors on `device` (see module doc)."""
    if interpreting():
        return "interpreter"
    if device.type != "cuda":
        return "cpu"
    return _cuda_architecture(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_architecture(index: int) -> str:
    # Looked up once per GPU: launchers ask on every call.
    if torch.version.hip is not None:
        return "rocm"
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm{major}{minor}"


class Tuning:
    """The launch choices of one op family (module doc).

    family: a name for messages. key_names: the names of the keys every rule takes after the
    architecture, in the order measured entries list them. rules: {kernel: rule(arch, **keys)
    -> config dict}. measured: {(kernel, arch, *keys in key_names order): config dict}.
    knobs: a frozen dataclass instance (or None) of the family's switches.
    """

    def __init__(self, family: str, key_names: tuple[str, ...], rules: Mapping[str, Rule],
                 measured: Mapping[tuple, dict] | None = None, knobs=None):
        self.family = family
        self.key_names = tuple(key_names)
        if knobs is not None and not (dataclasses.is_dataclass(knobs) and knobs.__dataclass_params__.frozen):
            raise TypeError(f"{family} tuning: knobs must be a frozen dataclass instance, got {type(knobs).__name__}")
        self._rules = MappingProxyType(dict(rules))
        self._measured = self._checked(measured or {})
        self._knobs = knobs
        self._cache: dict[tuple, dict] = {}

    def _checked(self, measured: Mapping[tuple, dict]) -> Mapping[tuple, dict]:
        """measured as a read-only mapping, each key (kernel, arch, *key_names) of a known kernel."""
        for key in measured:
            if key[0] not in self._rules or len(key) != 2 + len(self.key_names):
                raise ValueError(f"{self.family} tuning: measured entry {key!r} must be (kernel, arch, "
                                 f"{', '.join(self.key_names)}) with kernel one of {sorted(self._rules)}")
        return MappingProxyType(dict(measured))

    @property
    def rules(self) -> Mapping[str, Rule]:
        return self._rules

    @property
    def measured(self) -> Mapping[tuple, dict]:
        return self._measured

    @property
    def knobs(self):
        return self._knobs

    def config(self, kernel: str, arch: str, **keys) -> dict:
        """The launch configuration of `kernel` on `arch` for these keys (exactly key_names):
        the measured entry where there is one, else the kernel's rule. A fresh dict each call
        (callers may adjust their copy)."""
        if kernel not in self._rules:
            raise KeyError(f"{self.family} tuning has no kernel {kernel!r}; kernels: {sorted(self._rules)}")
        if set(keys) != set(self.key_names):
            raise TypeError(f"{self.family} tuning: config({kernel!r}) takes keys {self.key_names}, got {tuple(keys)}")
        values = tuple(keys[name] for name in self.key_names)
        cache_key = (kernel, arch, *values)
        chosen = self._cache.get(cache_key)
        if chosen is None:
            # Launchers ask on every call: the rule runs once per (kernel, arch, keys).
            chosen = self._measured.get(cache_key)
            if chosen is None:
                chosen = self._rules[kernel](arch, **keys)
            self._cache[cache_key] = chosen = dict(chosen)
        return dict(chosen)

    @contextlib.contextmanager
    def overridden(self, rules: Mapping[str, Rule] | None = None, measured: Mapping[tuple, dict] | None = None,
                   **knobs) -> Iterator[Tuning]:
        """Within the block: `rules` replace those kernels' rules, `measured` replaces the
        measured entries (pass {} to drop them all), `knobs` replace those knobs. Everything
        is restored on exit, exceptions included."""
        unknown = set(rules or {}) - set(self._rules)
        if unknown:
            raise KeyError(f"{self.family} tuning has no kernel {sorted(unknown)}; kernels: {sorted(self._rules)}")
        saved = (self._rules, self._measured, self._knobs)
        try:
            if rules:
                self._rules = MappingProxyType({**self._rules, **rules})
            if measured is not None:
                self._measured = self._checked(measured)
            if knobs:
                if self._knobs is None:
                    raise TypeError(f"{self.family} tuning has no knobs")
                self._knobs = dataclasses.replace(self._knobs, **knobs)
            self._cache = {}
            yield self
        finally:
            self._rules, self._measured, self._knobs = saved
            self._cache = {}

    def __repr__(self) -> str:
        return (f"Tuning({self.family!r}, kernels={sorted(self._rules)}, measured={len(self._measured)} entries, "
                f"knobs={self._knobs!r})")
