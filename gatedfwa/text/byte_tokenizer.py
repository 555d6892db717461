"""The byte tokenizer as a ``transformers`` tokenizer: the one saved with every checkpoint of
a byte model, so that it loads with ``AutoTokenizer.from_pretrained`` and
``pipeline("text-generation", model=...)``.

Token id = byte value (0..255) of the UTF-8 text, vocabulary 256, nothing to download or
train, and held-out loss per token is loss per byte. :func:`build_byte_tokenizer` builds it
as a ``PreTrainedTokenizerFast`` around a ``tokenizers.Tokenizer``; its pieces:

* vocabulary: one entry per byte, id = byte value. ``tokenizers`` works on text, so each
  byte is written as one printable character (:data:`BYTE_ALPHABET`: the printable Latin-1
  bytes stand for themselves, the other 68 bytes for the characters from U+0100 on, in byte
  order; the alphabet ``tokenizers``' ``ByteLevel`` steps use), and the byte-level
  pre-tokenizer turns text into the characters of its UTF-8 bytes;
* model: BPE without merges, so every byte stays one token;
* decoder: byte-level, characters back to bytes, then UTF-8 with invalid bytes replaced
  by U+FFFD (as ``bytes.decode("utf-8", errors="replace")`` does).

Bytes that are not valid UTF-8 are valid input for a byte model (a prompt given on the
command line as raw bytes, for instance): ``ByteTokenizer.encode_bytes``
(gatedfwa/text/tokenizer.py) looks every byte up in the vocabulary.

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
``special_token_ids()`` (gatedfwa/text/tokenizer.py, called by gatedfwa/train/trainer.py).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

__all__ = ["BYTE_ALPHABET", "BYTE_PAD_TOKEN_ID", "build_byte_tokenizer"]

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
