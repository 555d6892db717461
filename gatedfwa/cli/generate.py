"""``gatedfwa generate``: load a checkpoint, stream a continuation of a prompt, report speed
and the decoding cache's memory.

Text is printed as tokens arrive (through a ``transformers`` streamer); the report goes to
stderr so that stdout holds only the text. The model's ``generate()`` decodes with its
window cache, whose size stays at ``window_size`` tokens per layer however long the output
grows; the report shows the cache's bytes next to what a full-attention cache of the same
length would need.

The tokenizer is the one saved in the checkpoint (gatedfwa/train/checkpoint.py
``load_checkpoint_tokenizer``). A prompt is bytes to a byte model: command-line text that
holds bytes which are not UTF-8 (``sys.argv`` keeps them as surrogate escapes) is tokenized
as those very bytes, and echoed with U+FFFD in their place.

Ctrl-C stops generation cleanly: the text printed so far stays, the line is ended, and
:class:`gatedfwa.errors.Interrupted` says how many tokens came (``gatedfwa generate`` then
exits with status 130).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

from gatedfwa.attention_kinds import attention_kind
from gatedfwa.train.devices import resolve_device
from gatedfwa.errors import ConfigError, Interrupted
from gatedfwa.cli.generation_options import check_generation_options
from gatedfwa.train.checkpoint import load_checkpoint_tokenizer, load_model, read_train_record, resolve_checkpoint

__all__ = ["generate_text", "GenerationReport", "cache_bytes"]


@dataclass
class GenerationReport:
    checkpoint: Path
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float  # from the first generated token to the last
    first_token_s: float  # prompt processing and first token
    tokens_per_s: float
    cache_bytes: int | None  # None when the model returned no cache
    full_cache_bytes: int  # keys + values of every layer for all tokens, for comparison


def cache_bytes(cache) -> int:
    """Bytes the decoding cache holds: its own ``memory_bytes()`` when it has one, else
    every tensor reachable from it (attributes, lists, dicts), each storage counted once."""
    if callable(getattr(cache, "memory_bytes", None)):
        return int(cache.memory_bytes())
    seen: set[int] = set()
    visited: set[int] = set()
    total = 0

    def walk(obj, depth):
        nonlocal total
        if depth > 6 or id(obj) in visited:
            return
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            key = storage.data_ptr()
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(obj, dict):
            for value in obj.values():
                walk(value, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value, depth + 1)
        elif hasattr(obj, "__dict__"):
            for value in vars(obj).values():
                walk(value, depth + 1)

    walk(cache, 0)
    return total


def _human(nbytes: int | None) -> str:
    if nbytes is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


class _TextStreamer(BaseStreamer):
    """transformers streamer protocol (put/end): prints decoded text as ids arrive and
    records when each token came. ``decode``: a tokenizer's ``stream_decoder()``."""

    def __init__(self, decode, out):
        self.decode, self.out = decode, out
        self.prompt_seen = False
        self.times: list[float] = []
        self.pieces: list[str] = []

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        ids = value.reshape(-1).tolist()
        self.times.extend([time.perf_counter()] * len(ids))
        self._write(self.decode(ids))

    def end(self) -> None:
        """Prints what the decoder still holds (an incomplete character at the very end).
        Safe to call twice: generate_text calls it too (not every transformers version does)."""
        self._write(self.decode.flush())

    def _write(self, text: str) -> None:
        if text:
            self.pieces.append(text)
            self.out.write(text)
            self.out.flush()


def generate_text(ckpt: str | Path, prompt: str | bytes, max_new_tokens: int = 256, temperature: float = 0.8,
                  top_k: int | None = 50, seed: int = 0, device: str = "auto", out=None,
                  cache: str = "auto") -> GenerationReport:
    """Streams ``max_new_tokens`` tokens after ``prompt`` to ``out`` (default stdout).

    ``prompt``: text, which may hold bytes that are not UTF-8 as surrogate escapes (as
    ``sys.argv`` does), or bytes.

    ``cache``: "static" decodes with the fixed-shape StaticWindowCache, around which
    generate() compiles each step into one CUDA graph (on a GPU); "dynamic" with the growing
    WindowCache, uncompiled; "auto" (default) takes "static" on a GPU for models whose every
    attention kind has a static cache (not the NSA kinds), "dynamic" otherwise."""
    out = sys.stdout if out is None else out
    check_generation_options(prompt, max_new_tokens, temperature, top_k, cache)
    checkpoint = resolve_checkpoint(ckpt)
    record = read_train_record(checkpoint)
    tokenizer = load_checkpoint_tokenizer(checkpoint, record)
    target = resolve_device(device)
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # no loading notices before the streamed text
    model = load_model(checkpoint, "--ckpt", dtype).to(target).eval()

    prompt_bytes = prompt if isinstance(prompt, bytes) else prompt.encode("utf-8", errors="surrogateescape")
    ids = tokenizer.encode_bytes(prompt_bytes)
    if not ids:
        raise ConfigError("--prompt encodes to no tokens")
    if max(ids) >= model.config.vocab_size:
        raise ConfigError(f"--prompt has token id {max(ids)}, outside the model's vocabulary of {model.config.vocab_size}")
    input_ids = torch.tensor([ids], dtype=torch.long, device=target)
    streamer = _TextStreamer(tokenizer.stream_decoder(), out)
    torch.manual_seed(seed)
    sampling = temperature > 0
    # A NUL byte is the byte tokenizer's pad id and a real byte of a prompt: the mask says so.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options = dict(max_new_tokens=max_new_tokens, do_sample=sampling, streamer=streamer,
                   attention_mask=torch.ones_like(input_ids), return_dict_in_generate=True,
                   pad_token_id=0 if pad is None else pad)
    if sampling:
        options.update(temperature=temperature, top_k=top_k)
    no_static = sorted({kind for kind in model.config.layer_kinds if not attention_kind(kind).supports_static_cache})
    if cache == "static" and no_static:
        raise ConfigError(f"--cache static: the layers of attention kind {', '.join(no_static)} have no static cache "
                          "(the NSA kinds keep every token); use --cache dynamic")
    if cache == "static" or (cache == "auto" and target.type == "cuda" and not no_static):
        options["cache"] = model.new_static_cache(len(ids) + max_new_tokens + 1)
    out.write(prompt_bytes.decode("utf-8", errors="replace"))
    out.flush()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            result = model.generate(input_ids, **options)
    except KeyboardInterrupt:
        streamer.end()
        out.write("\n")
        out.flush()
        raise Interrupted(f"interrupted after {len(streamer.times)} of {max_new_tokens} new tokens") from None
    streamer.end()
    out.write("\n")
    out.flush()
    sequences = result.sequences if hasattr(result, "sequences") else result
    new = int(sequences.shape[1] - input_ids.shape[1])
    first = streamer.times[0] - start if streamer.times else 0.0
    seconds = streamer.times[-1] - streamer.times[0] if len(streamer.times) > 1 else 0.0
    rate = (new - 1) / seconds if seconds > 0 else float("nan")
    # The cache field of generate()'s output is "cache" in recent transformers, "past_key_values" before.
    cache = getattr(result, "cache", None)
    if cache is None:
        cache = getattr(result, "past_key_values", None)
    config = model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    full = 2 * config.num_hidden_layers * int(sequences.shape[1]) * kv_heads * head_dim * torch.finfo(dtype).bits // 8
    return GenerationReport(
        checkpoint=checkpoint, text="".join(streamer.pieces), prompt_tokens=len(ids), new_tokens=new,
        seconds=seconds, first_token_s=first, tokens_per_s=rate,
        cache_bytes=None if cache is None else cache_bytes(cache), full_cache_bytes=full,
    )


def describe(report: GenerationReport, unit: str = "token") -> str:
    """The lines ``gatedfwa generate`` prints to stderr after the text."""
    return (
        f"generated {report.new_tokens} tokens after a {report.prompt_tokens}-token prompt: "
        f"{report.tokens_per_s:,.1f} tokens/s (first token after {report.first_token_s:.2f} s)\n"
        f"decoding cache: {_human(report.cache_bytes)} "
        f"(a full-attention cache of these {report.prompt_tokens + report.new_tokens} tokens: {_human(report.full_cache_bytes)})\n"
        f"checkpoint: {report.checkpoint}"
    )
