"""Corpus loading, the fixed held-out split, the byte tokenizer and the step-seeded sampler."""

import numpy as np
import pytest
import torch

from gatedfwa.errors import ConfigError
from gatedfwa.text.tokenizer import ByteTokenizer
from gatedfwa.train.data import HELDOUT_EVERY, WindowSampler, heldout_windows, load_corpus, stdlib_source_files


def test_byte_tokenizer_round_trip_and_streaming():
    tok = ByteTokenizer()
    text = "déf f(x):\n    return 'λ' * 2  # ünïcode"
    ids = tok.encode(text)
    assert max(ids) < 256 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    # A multi-byte character split across calls is printed whole, once.
    stream = tok.stream_decoder()
    assert "".join(stream([i]) for i in ids) == text


def test_stdlib_corpus_split_is_fixed_by_sorted_files():
    root, files = stdlib_source_files()
    assert files and all(f.suffix == ".py" for f in files)
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and not any("site-packages" in r for r in rel)
    corpus = load_corpus()
    held = [f for i, f in enumerate(files) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    expected_heldout = sum(len(b) + (not b.endswith(b"\n") and len(b) > 0) for b in (f.read_bytes() for f in held))
    assert len(corpus.heldout) == expected_heldout
    assert corpus.unit == "byte" and corpus.vocab_size == 256 and corpus.train.dtype == np.uint8
    # The held-out stream starts with the first held-out file's bytes.
    first = held[0].read_bytes()[:200]
    assert bytes(corpus.heldout[:len(first)]) == first


def test_text_folder_skips_hidden_and_binary_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 50)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("second file\n" * 50)
    (tmp_path / ".hidden").write_text("SECRET\n" * 50)
    (tmp_path / "blob.dat").write_bytes(b"\x00\x01BINARY" * 50)
    corpus = load_corpus([str(tmp_path)])
    everything = bytes(corpus.train) + bytes(corpus.heldout)
    assert b"hello world" in everything and b"second file" in everything
    assert b"SECRET" not in everything and b"BINARY" not in everything
    # Fewer than 20 files: the last 1/20 of the stream is held out.
    assert len(corpus.heldout) == len(everything) // HELDOUT_EVERY


def test_corpus_description_counts_files_in_words(tmp_path):
    (tmp_path / "one.txt").write_text("only file\n" * 100)
    assert load_corpus([str(tmp_path)]).description.startswith("1 text file from ")
    (tmp_path / "two.txt").write_text("second\n" * 100)
    assert load_corpus([str(tmp_path)]).description.startswith("2 text files from ")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("")
    with pytest.raises(ConfigError, match=r"^the corpus is empty: no text in 1 text file from "):
        load_corpus([str(tmp_path / "empty")])


def test_pretokenized_bin_uses_val_bin_beside_train_bin(tmp_path):
    train = np.arange(1000, dtype=np.uint16) % 300
    val = np.arange(200, dtype=np.uint16) % 300
    train.tofile(tmp_path / "train.bin")
    val.tofile(tmp_path / "val.bin")
    corpus = load_corpus([str(tmp_path / "train.bin")])
    assert np.array_equal(corpus.train, train) and np.array_equal(corpus.heldout, val)
    assert corpus.vocab_size == 320 and corpus.unit == "token"  # 299 + 1 rounded up to 64


@pytest.mark.parametrize("make, message", [
    (lambda p: str(p / "missing"), "no such file or folder"),
    (lambda p: (p / "empty").mkdir() or str(p / "empty"), "the corpus is empty"),
    (lambda p: (p / "e.txt").write_text("") and None or str(p / "e.txt"), "the corpus is empty"),
    (lambda p: (p / "x.bin").write_bytes(b"") and None or str(p / "x.bin"), "the corpus is empty"),
    (lambda p: (p / "odd.bin").write_bytes(b"abc") and None or str(p / "odd.bin"), "even number of bytes"),
])
def test_bad_data_paths_raise_config_error(tmp_path, make, message):
    with pytest.raises(ConfigError, match=message):
        load_corpus([make(tmp_path)])


def test_sampler_depends_only_on_step_and_splits_evenly():
    tokens = np.arange(5000, dtype=np.int64) % 256
    sampler = WindowSampler(tokens, seq_len=32, global_batch=8, seed=3)
    whole = sampler.rows(step=7, micro_step=0, micro_batch=8)
    assert torch.equal(whole, WindowSampler(tokens, 32, 8, 3).rows(7, 0, 8))  # same step, same rows
    assert not torch.equal(whole, sampler.rows(8, 0, 8))
    # 2 processes x 2 micro-steps of 2 rows cover exactly the 8 rows of one process.
    parts = [sampler.rows(7, m, 2, rank, 2) for m in range(2) for rank in range(2)]
    assert torch.equal(torch.cat(parts), whole)
    # Each row is a contiguous slice of the stream.
    starts = whole[:, 0]
    assert torch.equal(whole, torch.stack([torch.arange(s, s + 32) % 256 for s in starts.tolist()]))


def test_heldout_windows_are_fixed_and_evenly_spread():
    tokens = np.arange(1000, dtype=np.int64)
    windows = heldout_windows(tokens, seq_len=100, count=10)
    assert windows.shape == (10, 100)
    assert windows[0, 0] == 0 and windows[-1, -1] == 999
    with pytest.raises(ConfigError, match="held-out split"):
        heldout_windows(tokens[:50], seq_len=100, count=4)
