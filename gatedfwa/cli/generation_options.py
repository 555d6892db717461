"""The checks on the options of ``gatedfwa generate`` (and of gatedfwa/cli/generate.py's
``generate_text``) that need no model: one place for the rules, in a module that imports
nothing heavy, so that the command line rejects a bad number before torch loads.
"""

from __future__ import annotations

from gatedfwa.errors import ConfigError

__all__ = ["CACHE_CHOICES", "check_generation_options"]

CACHE_CHOICES = ("auto", "static", "dynamic")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_generation_options(prompt: str | bytes, max_new_tokens: int, temperature: float, top_k: int | None,
                             cache: str) -> None:
    """ConfigError naming the option when one is out of range."""
    if not prompt:
        raise ConfigError("--prompt must not be empty (the model needs at least one token to continue)")
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {max_new_tokens!r}")
    # "not >= 0" also refuses NaN, which argparse's float() accepts.
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0 \
            or temperature == float("inf"):
        raise ConfigError(f"--temperature must be >= 0 (0 = greedy) and finite, got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ConfigError(f"--top-k must be >= 1, got {top_k!r}")
    if cache not in CACHE_CHOICES:
        raise ConfigError(f"--cache must be {', '.join(CACHE_CHOICES[:-1])} or {CACHE_CHOICES[-1]}, got {cache!r}")
