"""Tokenizers the trainer and the generator share, and the one saved with every checkpoint.

The default is the **byte tokenizer**: token id = byte value (0..255) of the UTF-8 text,
vocabulary 256, nothing to download or train, and held-out loss per token is loss per byte.
It is a real ``transformers`` tokenizer (:func:`build_byte_tokenizer`, a
``PreTrainedTokenizerFast`` around a ``tokenizers.Tokenizer``), so a checkpoint written by
``gatedfwa train`` loads with ``AutoTokenizer.from_pretrained`` and
``pipeline("text-generation", model=...)``. Its pieces:

* vocabulary: one entry per byte, id = byte value. ``tokenizers`` works on text, so each
  byte is written as one printable character (:data:`BYTE_ALPHABET`: the printable Latin-1
  bytes stand for themselves, the other 68 bytes for the characters from U+0100 on, in byte
  order; the alphabet ``tokenizers``' ``ByteLevel`` steps use), and the byte-level
  pre-tokenizer turns text into the characters of its UTF-8 bytes;
* model: BPE without merges, so every byte stays one token;
* decoder: byte-level, characters back to bytes, then UTF-8 with invalid bytes replaced
  by U+FFFD (as ``bytes.decode("utf-8", errors="replace")`` does).

Bytes that are not valid UTF-8 are valid input for a byte model (a prompt given on the
command line as raw bytes, for instance): :meth:`ByteTokenizer.encode_bytes` looks every
byte up in the vocabulary, and :meth:`ByteTokenizer.encode` takes text that carries such
bytes as surrogate escapes (Python's ``surrogateescape``, how ``sys.argv`` holds them).

Special tokens. The 256 ids are all bytes, so no id is free for a special token, and
adding one would change the vocabulary (and the embedding rows of every checkpoint) and
break "loss per token = loss per byte". Hence:

* no ``bos`` and no ``eos``: the model never saw either. Training reads windows at arbitrary
  offsets of one stream of concatenated files (gatedfwa/train/data.py), so no sequence
  starts with a marker and none ends with one; generation runs for ``max_new_tokens``.
* ``pad`` = byte 0 (NUL), vocabulary entry "Ā" (U+0100, the stand-in of byte 0). Padded
  positions are masked out by the attention mask, so any id would do; NUL is the one that
  text does not contain (the data loader skips files with a NUL byte near their start as
  binary). Two consequences: ``decode(..., skip_special_tokens=True)`` drops NUL bytes, and
  a NUL byte in a prompt is a real token that only the attention mask tells apart from
  padding (the tokenizer returns one; pass it to ``generate``). The text "Ā" is not the pad
  token: it encodes to its two UTF-8 bytes like any text (``split_special_tokens``).

Padding is on the left, as batched prompts of a causal LM need. The model's config gets the
same three ids (``pad_token_id`` 0, ``bos_token_id`` and ``eos_token_id`` None) from
``special_token_ids()`` (gatedfwa/train/trainer.py).

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
the loss ("byte" or "token"), the record, encoding raw bytes, and streaming decoding.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from gatedfwa.errors import ConfigError

__all__ = [
    "BYTE_ALPHABET", "BYTE_PAD_TOKEN_ID", "build_byte_tokenizer", "ByteTokenizer", "HFTokenizer", "IdTokenizer",
    "StreamDecoder", "tokenizer_from_spec", "load_tokenizer",
]

BYTE_PAD_TOKEN_ID = 0


def _byte_alphabet() -> list[str]:
    """The character that stands for each byte value (index = byte), as ``tokenizers``'
    byte-level steps write bytes: printable Latin-1 bytes ("!".."~", "¡".."¬", "®".."ÿ") are
    their own character; the others (controls, space, DEL, NBSP, soft hyphen) take U+0100,
    U+0101, ... in byte order."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    alphabet, next_stand_in = [], 0x100
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(next_stand_in))
            next_stand_in += 1
    return alphabet


BYTE_ALPHABET: list[str] = _byte_alphabet()


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """The byte tokenizer as a transformers tokenizer (see the module docstring): ids are
    the UTF-8 bytes of the text, pad = 0, no bos or eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    backend = Tokenizer(models.BPE(vocab={char: byte for byte, char in enumerate(BYTE_ALPHABET)}, merges=[]))
    # No regex split: without merges, words would only cost time.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=BYTE_ALPHABET[BYTE_PAD_TOKEN_ID],
        split_special_tokens=True,  # "Ā" in text is two bytes of text, not the pad token
        clean_up_tokenization_spaces=False,  # decoding gives the bytes back, spaces included
        padding_side="left",
    )


class StreamDecoder:
    """Text of ids that arrive a few at a time (a streamer's ``put``): each call returns
    only the new text. The ids since the last restart are decoded together (tokens of a
    Hugging Face tokenizer may merge with their neighbours when decoded), and text that
    ends in U+FFFD waits for the next ids: a character whose bytes are split across tokens
    is printed whole, once. :meth:`flush` returns what is left at the end (an incomplete
    character as U+FFFD).

    ``decode``: list of ids -> str. ``independent``: True when text decoded piece by piece,
    cut after any complete character, equals the text decoded at once (bytes, ids printed as
    numbers); then every call starts afresh. Otherwise the ids start afresh after a newline,
    so decoding stays short."""

    def __init__(self, decode, independent: bool = False):
        self._decode = decode
        self._independent = independent
        self._ids: list[int] = []
        self._printed = 0  # characters of decode(self._ids) already returned

    def __call__(self, ids) -> str:
        self._ids.extend(int(i) for i in ids)
        text = self._decode(self._ids)
        if text.endswith("\ufffd"):  # an incomplete character, or an invalid byte: wait for more
            return ""
        new = text[self._printed:]
        if self._independent or text.endswith("\n"):
            self._ids, self._printed = [], 0
        else:
            self._printed = len(text)
        return new

    def flush(self) -> str:
        new = self._decode(self._ids)[self._printed:]
        self._ids, self._printed = [], 0
        return new


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
