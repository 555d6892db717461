"""Tokenizers the trainer and the generator share.

The default is :class:`ByteTokenizer`: one token per UTF-8 byte, vocabulary 256, nothing to
download or train, and held-out loss per token is loss per byte. A Hugging Face tokenizer can
be used instead when ``transformers`` has it in the local cache (``--tokenizer NAME``); nothing
is ever downloaded.

A tokenizer is recorded in a checkpoint as a small dict (``spec``) so ``gatedfwa generate``
rebuilds the same one: ``{"kind": "byte"}``, ``{"kind": "hf", "name": ...}`` or
``{"kind": "none"}`` (pre-tokenized data of unknown origin: generation prints token ids).
"""

from __future__ import annotations

import codecs

from gatedfwa.errors import ConfigError

__all__ = ["ByteTokenizer", "HFTokenizer", "IdTokenizer", "tokenizer_from_spec", "load_tokenizer"]


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255. ``unit`` names what one token is, for reporting
    held-out loss in bits per byte."""

    vocab_size = 256
    unit = "byte"
    eos_token_id = None

    @property
    def spec(self) -> dict:
        return {"kind": "byte"}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> list[int]:
        return list(data)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self):
        """A function ids -> str that keeps an incomplete UTF-8 character for the next call,
        so a multi-byte character split across two tokens is printed whole."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda ids: decoder.decode(bytes(int(i) for i in ids))


class HFTokenizer:
    """A Hugging Face tokenizer from the local cache or a local folder (never downloaded)."""

    unit = "token"

    def __init__(self, name: str):
        try:
            from transformers import AutoTokenizer
        except ImportError as error:  # transformers is a dependency, but keep the message clear
            raise ConfigError(f"--tokenizer {name!r} needs the transformers package: {error}") from None
        try:
            self._tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except Exception as error:  # many exception types, all meaning "not available here"
            raise ConfigError(
                f"tokenizer {name!r} is not available locally (nothing is downloaded): "
                f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            ) from None
        self.name = name
        self.vocab_size = len(self._tok)
        self.eos_token_id = self._tok.eos_token_id

    @property
    def spec(self) -> dict:
        return {"kind": "hf", "name": self.name}

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def encode_bytes(self, data: bytes) -> list[int]:
        return self.encode(data.decode("utf-8", errors="replace"))

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids))

    def stream_decoder(self):
        """Decodes the growing sequence and returns only the new text (tokens may merge
        with their neighbours, so decoding them one by one would be wrong)."""
        seen: list[int] = []
        printed = [0]

        def decode(ids) -> str:
            seen.extend(int(i) for i in ids)
            text = self._tok.decode(seen)
            if text.endswith("\ufffd"):  # an incomplete character: wait for more tokens
                return ""
            new = text[printed[0]:]
            printed[0] = len(text)
            return new

        return decode


class IdTokenizer:
    """For pre-tokenized data without a named tokenizer: text in, error; ids out as text."""

    unit = "token"
    eos_token_id = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    @property
    def spec(self) -> dict:
        return {"kind": "none", "vocab_size": self.vocab_size}

    def encode(self, text: str) -> list[int]:
        try:
            return [int(x) for x in text.split()]
        except ValueError:
            raise ConfigError(
                "this model was trained on pre-tokenized data without a named tokenizer: "
                "give the prompt as space-separated token ids, e.g. --prompt '17 4 99'"
            ) from None

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    def stream_decoder(self):
        return lambda ids: "".join(f"{int(i)} " for i in ids)


def load_tokenizer(name: str | None):
    """``None`` or ``"byte"``: the byte tokenizer; anything else: a local HF tokenizer."""
    if name is None or name == "byte":
        return ByteTokenizer()
    return HFTokenizer(name)


def tokenizer_from_spec(spec: dict):
    kind = spec.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        return HFTokenizer(spec["name"])
    if kind == "none":
        return IdTokenizer(int(spec["vocab_size"]))
    raise ConfigError(f"unknown tokenizer record {spec!r} in the checkpoint")
