"""The byte tokenizer as a transformers tokenizer: ids are byte values, any bytes round-trip,
multi-byte characters stream whole through transformers' streamers, and the corpus the
trainer reads tokenizes the same way."""

import random

import pytest
import torch
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, TextIteratorStreamer

from gatedfwa.errors import ConfigError
from gatedfwa.text.byte_tokenizer import BYTE_ALPHABET
from gatedfwa.text.stream_decoder import StreamDecoder
from gatedfwa.text.tokenizer import ByteTokenizer, tokenizer_from_spec
from gatedfwa.train.checkpoint import load_checkpoint_tokenizer
from gatedfwa.train.data import load_corpus

# ASCII, 2-, 3- and 4-byte characters, NUL (the pad byte) and U+0100 (the pad's vocabulary entry).
TEXTS = ["def f(x):\n    return x  # done\n", "déjà vu, ünïcode λ → ∞", "中文字符 and 😀 emoji",
         "\x00NUL\x00 Ā ā", "", " leading and trailing spaces  ", "tab\tcarriage\rreturn\r\n"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The byte tokenizer written by save_pretrained and read back by AutoTokenizer."""
    folder = tmp_path_factory.mktemp("byte-tokenizer")
    ByteTokenizer().pretrained.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def _random_bytes(rng: random.Random, n: int) -> bytes:
    # Mostly bytes around multi-byte UTF-8 (lead bytes, continuation bytes), so that valid,
    # cut-short and invalid sequences all occur.
    pool = [rng.randrange(256), rng.randrange(0x80, 0xC0), rng.choice([0xC3, 0xE4, 0xED, 0xF0, 0xF4, 0xFF])]
    return bytes(rng.choice(pool) if rng.random() < 0.6 else rng.randrange(0x20, 0x7F) for _ in range(n))


def test_alphabet_is_the_byte_level_one():
    assert len(BYTE_ALPHABET) == 256 == len(set(BYTE_ALPHABET))
    assert set(BYTE_ALPHABET) == set(pre_tokenizers.ByteLevel.alphabet())
    assert [BYTE_ALPHABET[b] for b in b"Az~"] == ["A", "z", "~"] and BYTE_ALPHABET[0] == "\u0100"


def test_saved_tokenizer_is_a_transformers_tokenizer_with_byte_ids(saved):
    assert isinstance(saved, PreTrainedTokenizerFast) and len(saved) == 256
    assert (saved.pad_token_id, saved.bos_token_id, saved.eos_token_id) == (0, None, None)
    assert saved.padding_side == "left"
    byte = ByteTokenizer(saved)  # the checks of the wrapper accept what a checkpoint holds
    assert byte.special_token_ids() == {"pad_token_id": 0, "bos_token_id": None, "eos_token_id": None}
    for text in TEXTS:
        expected = list(text.encode("utf-8"))  # what the byte tokenizer always gave
        assert saved(text)["input_ids"] == expected, text
        assert saved.encode(text) == expected  # no bos/eos added
        assert byte.encode(text) == expected and ByteTokenizer().encode(text) == expected
        assert saved.decode(expected) == text
    batch = saved(["ab", "abcd"], padding=True)
    assert batch["input_ids"] == [[0, 0, 97, 98], [97, 98, 99, 100]]
    assert batch["attention_mask"] == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_every_byte_string_round_trips(saved):
    byte = ByteTokenizer(saved)
    every_byte = bytes(range(256))
    assert byte.encode_bytes(every_byte) == list(range(256))
    assert saved.convert_ids_to_tokens(list(range(256))) == BYTE_ALPHABET
    rng = random.Random(0)
    for data in [every_byte, every_byte[::-1]] + [_random_bytes(rng, rng.randrange(1, 40)) for _ in range(300)]:
        ids = byte.encode_bytes(data)
        assert bytes(ids) == data
        # Bytes that are not UTF-8, held in text as surrogate escapes (as sys.argv holds them).
        assert byte.encode(data.decode("utf-8", errors="surrogateescape")) == ids
        # Decoding replaces invalid UTF-8 as Python does.
        assert saved.decode(ids) == byte.decode(ids) == data.decode("utf-8", errors="replace")


def test_stream_decoder_prints_each_character_once():
    byte = ByteTokenizer()
    rng = random.Random(1)
    for data in [t.encode() for t in TEXTS] + [_random_bytes(rng, 30) for _ in range(100)]:
        stream = byte.stream_decoder()
        pieces = [stream([b]) for b in data]
        assert "".join(pieces) + stream.flush() == data.decode("utf-8", errors="replace")
    # A character cut short at the end is held back until the end, then shown as U+FFFD.
    stream = byte.stream_decoder()
    assert stream(list("a中".encode())[:-1]) == "" and stream.flush() == "a\ufffd"
    # Sequences restart after a newline when pieces do not decode alone.
    stream = StreamDecoder(lambda ids: "".join(chr(i) for i in ids))
    assert stream([104, 10]) == "h\n" and stream([105]) == "i" and stream.flush() == ""


@pytest.mark.parametrize("step", [1, 2, 3])
def test_transformers_streamer_prints_multibyte_characters_whole(saved, step):
    text = "".join(TEXTS)
    ids = saved.encode(text)
    streamer = TextIteratorStreamer(saved)
    for start in range(0, len(ids), step):  # as generate() hands them over
        streamer.put(torch.tensor([ids[start:start + step]]))
    streamer.end()
    pieces = list(streamer)
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_byte_corpus_tokenizes_as_the_tokenizer_does(tmp_path):
    texts = ["print('héllo')\n", "# 中文\nx = 1\n", "no final newline"]
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.py").write_text(text, encoding="utf-8")
    corpus = load_corpus([str(tmp_path)])
    stream = list(corpus.train) + list(corpus.heldout)
    # Files in sorted order; a newline is added where a file has none.
    expected = ByteTokenizer().pretrained("".join(t if t.endswith("\n") else t + "\n" for t in texts))["input_ids"]
    assert stream == expected
    assert corpus.vocab_size == 256 and corpus.unit == "byte"
    assert tokenizer_from_spec(corpus.tokenizer_spec).unit == "byte"


def _two_words() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="b")))


def test_a_tokenizer_that_is_not_bytes_is_refused_as_one():
    with pytest.raises(ConfigError, match="must map every byte to its value, vocabulary 256; this one has 2 entries"):
        ByteTokenizer(_two_words())


def test_checkpoint_tokenizer_files_that_cannot_serve_are_named(tmp_path):
    record = {"tokenizer": {"kind": "byte"}}
    assert load_checkpoint_tokenizer(tmp_path, record).unit == "byte"  # no files: rebuilt from the record
    ByteTokenizer().pretrained.save_pretrained(tmp_path)
    assert load_checkpoint_tokenizer(tmp_path, record).encode("é") == [0xC3, 0xA9]
    _two_words().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=f"^--ckpt: the tokenizer in {tmp_path}: the byte tokenizer must map"):
        load_checkpoint_tokenizer(tmp_path, record)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')  # cut short
    with pytest.raises(ConfigError, match=f"^--ckpt: cannot load the tokenizer in {tmp_path}: "):
        load_checkpoint_tokenizer(tmp_path, record)
