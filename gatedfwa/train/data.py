"""Training text: where it comes from, the fixed held-out split, and the batches.

Sources (``load_corpus``):
    * default: the source files (``*.py``) of the running interpreter's standard library,
      sorted by path. Real text that needs no download; about 30 MB on CPython 3.11.
    * ``--data PATH ...``: text files and folders (read recursively; hidden and binary files,
      those with a NUL byte in their first 8 KiB, are skipped), sorted by path. A binary
      file named on its own is refused with a message saying what --data takes.
    * ``--data FILE.bin``: pre-tokenized ids stored as uint16 (the nanoGPT layout). A
      ``val.bin`` beside a ``train.bin`` is used as the held-out set.
    * ``--hf-dataset NAME``: a Hugging Face dataset already in the local cache (the
      ``datasets`` package is optional; nothing is downloaded).

Held-out split, fixed for a given source: every 20th document (file) in sorted order is
held out; with fewer than 20 documents (or a single .bin) the last 1/20 of the token stream
is. Documents are concatenated into one stream of token ids (the byte tokenizer needs no
separator: files end in a newline; a tokenizer with an end-of-text token gets it between
documents).

Batches (``WindowSampler``): each optimizer step reads ``global_batch`` windows of
``seq_len`` tokens at offsets drawn from a generator seeded by (seed, step). The data
position is therefore the step number itself: resuming at step k reads exactly what an
uninterrupted run reads, and splitting a step's windows across processes and accumulation
micro-steps changes nothing but who computes which rows.
"""

from __future__ import annotations

import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gatedfwa.environment import forbid_dataset_downloads
from gatedfwa.errors import ConfigError
from gatedfwa.text.tokenizer import ByteTokenizer, IdTokenizer, load_tokenizer

__all__ = ["Corpus", "load_corpus", "stdlib_source_files", "WindowSampler", "heldout_windows", "HELDOUT_EVERY"]

HELDOUT_EVERY = 20  # one document in 20 (or the last 1/20 of the stream) is held out
_BINARY_PROBE = 8192


@dataclass
class Corpus:
    """Token streams ready for training.

    train, heldout: 1-D integer arrays (uint8 for bytes, uint16/int32 otherwise; may be
    memory-mapped). ``unit`` is what one token is ("byte" or "token"), for reporting loss.
    """

    train: np.ndarray
    heldout: np.ndarray
    vocab_size: int
    unit: str
    tokenizer_spec: dict
    description: str


def stdlib_source_files() -> tuple[Path, list[Path]]:
    """(root, files): the running interpreter's standard-library ``.py`` files, sorted by
    their path relative to root, third-party packages (site-packages) excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p for p in root.rglob("*.py")
        if "site-packages" not in p.relative_to(root).parts and "dist-packages" not in p.relative_to(root).parts
        and p.is_file()
    ]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _is_binary(path: Path) -> bool:
    """A NUL byte in the first 8 KiB: an image, an archive, random bytes; never text."""
    with open(path, "rb") as f:
        return b"\0" in f.read(_BINARY_PROBE)


def _text_files(paths: list[str]) -> list[Path]:
    """Every readable text file named by paths (folders are walked, their binary files
    skipped), sorted, deduplicated; ConfigError for a named file that is not text."""
    found: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ConfigError(f"--data: no such file or folder: {raw}")
        if path.is_dir():
            for p in path.rglob("*"):
                rel = p.relative_to(path).parts
                if p.is_file() and not any(part.startswith(".") for part in rel) and not _is_binary(p):
                    found.add(p)
        elif _is_binary(path):
            raise ConfigError(
                f"--data: {raw} is not text (it has NUL bytes, as images and other binary files do); --data takes "
                f"text files and folders of them, or one pre-tokenized .bin file of uint16 token ids"
            )
        else:
            found.add(path)
    return sorted(found, key=lambda q: q.as_posix())


def _split_documents(documents: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    if len(documents) >= HELDOUT_EVERY:
        heldout = [d for i, d in enumerate(documents) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
        train = [d for i, d in enumerate(documents) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
        return train, heldout
    return documents, []  # split the stream's tail instead


def _count(n: int, noun: str) -> str:
    """"1 text file", "2 text files"."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def _tail_split(stream: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cut = len(stream) - len(stream) // HELDOUT_EVERY
    return stream[:cut], stream[cut:]


def _smallest_dtype(vocab_size: int):
    if vocab_size <= 256:
        return np.uint8
    return np.uint16 if vocab_size <= 65536 else np.int32


def _encode_documents(documents: list[bytes], tokenizer) -> np.ndarray:
    if isinstance(tokenizer, ByteTokenizer):
        stream = b"".join(d if d.endswith(b"\n") or not d else d + b"\n" for d in documents)
        return np.frombuffer(stream, dtype=np.uint8)
    ids: list[int] = []
    for d in documents:
        ids.extend(tokenizer.encode_bytes(d))
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    return np.asarray(ids, dtype=_smallest_dtype(tokenizer.vocab_size))


def _corpus_from_documents(documents: list[bytes], tokenizer, description: str) -> Corpus:
    if sum(len(d) for d in documents) == 0:
        raise ConfigError(f"the corpus is empty: no text in {description}")
    train_docs, heldout_docs = _split_documents(documents)
    if heldout_docs:
        train, heldout = _encode_documents(train_docs, tokenizer), _encode_documents(heldout_docs, tokenizer)
    else:
        train, heldout = _tail_split(_encode_documents(train_docs, tokenizer))
    return Corpus(train, heldout, tokenizer.vocab_size, tokenizer.unit, tokenizer.spec, description)


def _read_bin(path: Path) -> np.ndarray:
    size = path.stat().st_size
    if size == 0:
        raise ConfigError(f"the corpus is empty: {path} has no tokens")
    if size % 2:
        raise ConfigError(f"{path}: a .bin file must hold uint16 token ids (an even number of bytes), got {size} bytes")
    return np.memmap(path, dtype=np.uint16, mode="r")


def _load_bin(path: Path, tokenizer_name: str | None) -> Corpus:
    tokens = _read_bin(path)
    sibling = path.with_name("val.bin")
    if path.name == "train.bin" and sibling.exists():
        train, heldout = tokens, _read_bin(sibling)
        where = f"{path} (held out: {sibling})"
    else:
        train, heldout = _tail_split(tokens)
        where = f"{path} (held out: last 1/{HELDOUT_EVERY})"
    largest = int(max(train.max(), heldout.max()))
    if tokenizer_name is not None:
        tokenizer = load_tokenizer(tokenizer_name)
        if largest >= tokenizer.vocab_size:
            raise ConfigError(
                f"{path} holds token id {largest}, outside the vocabulary of tokenizer "
                f"{tokenizer_name!r} ({tokenizer.vocab_size} tokens)"
            )
    else:
        # Round up so the embedding table has a friendly size; ids above the largest seen
        # are simply never used.
        tokenizer = IdTokenizer(-(-(largest + 1) // 64) * 64)
    return Corpus(train, heldout, tokenizer.vocab_size, tokenizer.unit, tokenizer.spec,
                  f"{len(tokens):,} pre-tokenized ids from {where}")


def _load_hf_dataset(name: str, split: str, text_field: str, tokenizer) -> Corpus:
    forbid_dataset_downloads()
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            "--hf-dataset needs the optional 'datasets' package (pip install datasets); "
            "without it use --data with text files"
        ) from None
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as error:  # many types, all meaning "not available here"
        raise ConfigError(
            f"Hugging Face dataset {name!r} (split {split!r}) is not available locally "
            f"(nothing is downloaded): {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from None
    if text_field not in dataset.column_names:
        raise ConfigError(f"--hf-text-field: dataset {name!r} has no column {text_field!r}; it has {dataset.column_names}")
    documents = [str(t).encode("utf-8") for t in dataset[text_field]]
    return _corpus_from_documents(documents, tokenizer, f"Hugging Face dataset {name} [{split}], {len(documents):,} documents")


def load_corpus(
    data: list[str] | None = None,
    tokenizer: str | None = None,
    hf_dataset: str | None = None,
    hf_split: str = "train",
    hf_text_field: str = "text",
) -> Corpus:
    """Reads and tokenizes the training text (see the module docstring for the sources)."""
    if data and hf_dataset:
        raise ConfigError("give either --data or --hf-dataset, not both")
    if hf_dataset:
        return _load_hf_dataset(hf_dataset, hf_split, hf_text_field, load_tokenizer(tokenizer))
    if data:
        bins = [p for p in data if p.endswith(".bin")]
        if bins:
            if len(data) != 1:
                raise ConfigError(f"--data: a pre-tokenized .bin file must be the only data path, got {data}")
            path = Path(bins[0])
            if not path.is_file():
                raise ConfigError(f"--data: no such file: {bins[0]}")
            return _load_bin(path, tokenizer)
        files = _text_files(data)
        if not files:
            raise ConfigError(f"the corpus is empty: no text files found in {', '.join(data)} "
                              f"(files with a NUL byte in their first {_BINARY_PROBE // 1024} KiB are binary and skipped)")
        documents = [p.read_bytes() for p in files]
        size = sum(len(d) for d in documents)
        return _corpus_from_documents(documents, load_tokenizer(tokenizer), f"{_count(len(files), 'text file')} from {', '.join(data)} ({size / 1e6:.1f} MB)")
    root, files = stdlib_source_files()
    if not files:
        raise ConfigError(f"the corpus is empty: no .py files under this interpreter's standard library {root}")
    documents = [p.read_bytes() for p in files]
    size = sum(len(d) for d in documents)
    version = ".".join(str(v) for v in sys.version_info[:3])
    return _corpus_from_documents(
        documents, load_tokenizer(tokenizer),
        f"Python {version} standard library sources: {_count(len(files), 'file')} under {root} ({size / 1e6:.1f} MB)",
    )


def _gather(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    """[len(starts), seq_len] int64 windows tokens[s : s + seq_len]."""
    index = starts[:, None] + np.arange(seq_len)[None, :]
    return torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))


class WindowSampler:
    """Training windows. Step ``s`` reads ``global_batch`` windows whose offsets depend only
    on (seed, s); :meth:`rows` hands each (micro-step, rank) its own block of them."""

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, seed: int):
        if len(tokens) < seq_len + 1:
            raise ConfigError(
                f"the training split has {len(tokens):,} tokens, fewer than one window of seq_len "
                f"{seq_len} + 1: use more data or a smaller seq_len"
            )
        self.tokens, self.seq_len, self.global_batch, self.seed = tokens, seq_len, global_batch, seed

    def starts(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.seq_len + 1, size=self.global_batch)

    def rows(self, step: int, micro_step: int, micro_batch: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """[micro_batch, seq_len] int64: block ``micro_step * world_size + rank`` of step's windows."""
        block = micro_step * world_size + rank
        starts = self.starts(step)[block * micro_batch:(block + 1) * micro_batch]
        return _gather(self.tokens, starts, self.seq_len)


def heldout_windows(tokens: np.ndarray, seq_len: int, count: int) -> torch.Tensor:
    """[n, seq_len] int64: ``count`` (at most) windows at evenly spaced offsets of the
    held-out stream; the same windows at every evaluation, in every run of this corpus."""
    if len(tokens) < seq_len:
        raise ConfigError(
            f"the held-out split has {len(tokens):,} tokens, fewer than one window of seq_len {seq_len}: "
            f"use more data or a smaller seq_len"
        )
    last = len(tokens) - seq_len
    count = max(1, min(count, last + 1))
    starts = np.linspace(0, last, count).round().astype(np.int64)
    return _gather(tokens, starts, seq_len)
