"""The tokenizers training and generation share: text (or raw bytes) to ids, ids back to
text, and the record a checkpoint keeps of which tokenizer it was trained with.

The default is the byte tokenizer (:class:`ByteTokenizer`, around the transformers
tokenizer of gatedfwa/text/byte_tokenizer.py). Bytes that are not valid UTF-8 are valid
input for a byte model: :meth:`ByteTokenizer.encode_bytes` looks every byte up in the
vocabulary, and :meth:`ByteTokenizer.encode` takes text that carries such bytes as
surrogate escapes (Python's ``surrogateescape``, how ``sys.argv`` holds them).

A Hugging Face tokenizer can be used instead of bytes when ``transformers`` has it in the
local cache or a local folder (``--tokenizer NAME``; nothing is ever downloaded); it brings
its own special tokens, and the model's config takes its ids.

Checkpoints hold the tokenizer's files (``save_pretrained``: tokenizer.json,
tokenizer_config.json) and a small record (``spec``) of which kind it is:
``{"kind": "byte"}``, ``{"kind": "hf", "name": ...}`` or ``{"kind": "none"}``
(pre-tokenized data of unknown origin: no files, generation reads and prints token ids).
Checkpoints written before the files existed are rebuilt from the record alone.

The classes here (:class:`ByteTokenizer`, :class:`HFTokenizer`, :class:`IdTokenizer`) add
to a transformers tokenizer (``pretrained``) what training and generation need: the unit of
the loss ("byte" or "token"), the record, encoding raw bytes, and streaming decoding
(gatedfwa/text/stream_decoder.py).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from gatedfwa.errors import ConfigError
from gatedfwa.text.byte_tokenizer import BYTE_ALPHABET, build_byte_tokenizer
from gatedfwa.text.stream_decoder import StreamDecoder

__all__ = ["ByteTokenizer", "HFTokenizer", "IdTokenizer", "tokenizer_from_spec", "load_tokenizer"]


class _PretrainedTokenizer:
    """What ByteTokenizer and HFTokenizer share: a transformers tokenizer (``pretrained``,
    the one saved with checkpoints) and its special ids."""

    pretrained: PreTrainedTokenizerBase

    @property
    def vocab_size(self) -> int:
        return len(self.pretrained)

    @property
    def eos_token_id(self) -> int | None:
        return self.pretrained.eos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self.pretrained.pad_token_id

    def special_token_ids(self) -> dict:
        """``pad_token_id``, ``bos_token_id``, ``eos_token_id`` (None where the tokenizer has
        none), for the model's config."""
        return {name: getattr(self.pretrained, name) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}

    def decode(self, ids) -> str:
        return self.pretrained.decode([int(i) for i in ids])

    def stream_decoder(self) -> StreamDecoder:
        """Decodes streamed ids (see StreamDecoder)."""
        return StreamDecoder(self.decode)


class ByteTokenizer(_PretrainedTokenizer):
    """UTF-8 bytes as tokens 0..255 (``pretrained``: :func:`build_byte_tokenizer`'s, or the
    one a checkpoint saved). ``unit`` names what one token is, for reporting held-out loss
    in bits per byte."""

    unit = "byte"

    def __init__(self, pretrained: PreTrainedTokenizerBase | None = None):
        self.pretrained = build_byte_tokenizer() if pretrained is None else pretrained
        ids = self.pretrained.convert_tokens_to_ids(BYTE_ALPHABET)
        if len(self.pretrained) != 256 or ids != list(range(256)):
            raise ConfigError(
                f"the byte tokenizer must map every byte to its value, vocabulary 256; this one has "
                f"{len(self.pretrained)} entries{'' if ids == list(range(256)) else ' in another order'}"
            )

    @property
    def spec(self) -> dict:
        return {"kind": "byte"}

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``; bytes that are not UTF-8, held in ``text`` as surrogate
        escapes (``sys.argv`` does so), are recovered as they were."""
        return self.encode_bytes(text.encode("utf-8", errors="surrogateescape"))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Any bytes, valid UTF-8 or not: each byte's entry in the vocabulary."""
        return self.pretrained.convert_tokens_to_ids([BYTE_ALPHABET[byte] for byte in data])

    def stream_decoder(self) -> StreamDecoder:
        """Decodes streamed bytes: every complete character as soon as its last byte comes."""
        return StreamDecoder(self.decode, independent=True)


class HFTokenizer(_PretrainedTokenizer):
    """A Hugging Face tokenizer from the local cache or a local folder (never downloaded),
    or one a checkpoint saved (``pretrained``)."""

    unit = "token"

    def __init__(self, name: str, pretrained: PreTrainedTokenizerBase | None = None):
        self.name = name
        if pretrained is not None:
            self.pretrained = pretrained
            return
        from transformers import AutoTokenizer

        try:
            self.pretrained = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except Exception as error:  # many exception types, all meaning "not available here"
            raise ConfigError(
                f"tokenizer {name!r} is not available locally (nothing is downloaded): "
                f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            ) from None

    @property
    def spec(self) -> dict:
        return {"kind": "hf", "name": self.name}

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; bytes that are not UTF-8 (surrogate escapes) become U+FFFD."""
        return self.encode_bytes(text.encode("utf-8", errors="surrogateescape"))

    def encode_bytes(self, data: bytes) -> list[int]:
        return self.pretrained.encode(data.decode("utf-8", errors="replace"), add_special_tokens=False)


class IdTokenizer:
    """For pre-tokenized data without a named tokenizer: prompts are token ids written as
    text, and ids are printed as text. No transformers tokenizer (``pretrained`` is None),
    so checkpoints save none."""

    unit = "token"
    pretrained = None
    eos_token_id = None
    pad_token_id = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    @property
    def spec(self) -> dict:
        return {"kind": "none", "vocab_size": self.vocab_size}

    def special_token_ids(self) -> dict:
        return {"pad_token_id": None, "bos_token_id": None, "eos_token_id": None}

    def encode(self, text: str) -> list[int]:
        try:
            return [int(x) for x in text.split()]
        except ValueError:
            raise ConfigError(
                "this model was trained on pre-tokenized data without a named tokenizer: "
                "give the prompt as space-separated token ids, e.g. --prompt '17 4 99'"
            ) from None

    def encode_bytes(self, data: bytes) -> list[int]:
        return self.encode(data.decode("utf-8", errors="replace"))

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    def stream_decoder(self) -> StreamDecoder:
        """Decodes streamed ids: each as a space and its number (after the prompt's ids)."""
        return StreamDecoder(lambda ids: "".join(f" {int(i)}" for i in ids), independent=True)


def load_tokenizer(name: str | None):
    """``None`` or ``"byte"``: the byte tokenizer; anything else: a local HF tokenizer."""
    if name is None or name == "byte":
        return ByteTokenizer()
    return HFTokenizer(name)


def tokenizer_from_spec(spec: dict, pretrained: PreTrainedTokenizerBase | None = None):
    """The tokenizer a checkpoint's record names; ``pretrained``: the one loaded from the
    checkpoint's own tokenizer files, when it has them (else it is rebuilt: bytes, or the
    named tokenizer from the local cache)."""
    kind = spec.get("kind")
    if kind == "byte":
        return ByteTokenizer(pretrained)
    if kind == "hf":
        return HFTokenizer(spec["name"], pretrained)
    if kind == "none":
        return IdTokenizer(int(spec["vocab_size"]))
    raise ConfigError(f"unknown tokenizer record {spec!r} in the checkpoint")
