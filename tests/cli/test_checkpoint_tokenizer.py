"""The tokenizer saved with every checkpoint of ``gatedfwa train``: transformers loads it
(AutoTokenizer, pipeline, streamers), ``gatedfwa generate`` uses it (and rebuilds it for
older checkpoints without its files), and byte prompts need not be UTF-8."""

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, TextStreamer, pipeline

import gatedfwa  # noqa: F401 - registers model_type "gatedfwa" with transformers

from .conftest import FAST

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _last_checkpoint(run):
    return sorted((run / "checkpoints").iterdir())[-1]


def test_checkpoint_loads_with_auto_tokenizer_and_pipeline(trained_run, capsys):
    ckpt = _last_checkpoint(trained_run)
    assert all((ckpt / name).is_file() for name in TOKENIZER_FILES)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    assert isinstance(tokenizer, PreTrainedTokenizerFast) and len(tokenizer) == 256
    prompt = "def héllo"
    assert tokenizer(prompt)["input_ids"] == list(prompt.encode("utf-8"))
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    special = ("pad_token_id", "bos_token_id", "eos_token_id")
    assert [getattr(model.config, name) for name in special] == [getattr(tokenizer, name) for name in special] \
        == [0, None, None]

    generator = pipeline("text-generation", model=str(ckpt))
    text = generator(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    # Tokens are bytes: the prompt and 8 bytes of text.
    assert text.startswith(prompt) and len(text.encode("utf-8")) == len(prompt.encode("utf-8")) + 8

    capsys.readouterr()
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=8, do_sample=False, streamer=TextStreamer(tokenizer, skip_prompt=True))
    assert capsys.readouterr().out == text[len(prompt):] + "\n"  # the streamer ends the line


def test_generate_takes_a_prompt_that_is_not_utf8(cli, trained_run):
    # sys.argv holds the bytes of $'\xff\xfe bad' as surrogate escapes.
    prompt = b"\xff\xfe bad".decode("utf-8", errors="surrogateescape")
    status, out, err = cli(["generate", "--ckpt", trained_run, "--prompt", prompt, "--max-new-tokens", 4,
                            "--temperature", 0])
    assert status == 0, err
    # Echoed with U+FFFD for the two bytes; tokenized as the 6 bytes themselves.
    assert out.startswith("\ufffd\ufffd bad") and "after a 6-token prompt" in err


def test_checkpoint_from_before_tokenizer_files_generates_and_resumes(cli, trained_run, tmp_path):
    # Checkpoints written before the tokenizer was saved: no tokenizer files, no special ids
    # in the model's config. generate rebuilds the tokenizer from train_config.json.
    ckpt = _last_checkpoint(trained_run)
    old = shutil.copytree(ckpt, tmp_path / ckpt.name)
    for name in TOKENIZER_FILES:
        (old / name).unlink()
    for name in ("config.json", "generation_config.json"):
        settings = json.loads((old / name).read_text())
        (old / name).write_text(json.dumps({k: v for k, v in settings.items() if not k.endswith("_token_id")}))
    args = ["--prompt", "import o", "--max-new-tokens", 6, "--temperature", 0]
    status, expected, err = cli(["generate", "--ckpt", ckpt, *args])
    assert status == 0, err
    status, out, err = cli(["generate", "--ckpt", old, *args])
    assert status == 0, err
    assert out == expected and out.startswith("import o")
    # Resuming one writes checkpoints with the tokenizer and the ids.
    status, _, err = cli(["train", "--resume", old, "--out", tmp_path / "resumed", "--max-steps", 3, "--no-progress",
                          "--no-plot"])
    assert status == 0, err
    resumed = _last_checkpoint(tmp_path / "resumed")
    assert AutoTokenizer.from_pretrained(resumed).pad_token_id == 0
    assert AutoModelForCausalLM.from_pretrained(resumed).config.pad_token_id == 0


def _word_tokenizer(folder, text_corpus):
    """A small BPE tokenizer with an end-of-text token, saved as a local folder (what
    ``--tokenizer NAME`` accepts besides names in the local cache)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train([str(p) for p in sorted(text_corpus.iterdir())], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def test_named_tokenizer_is_saved_and_pre_tokenized_data_saves_none(cli, text_corpus, tmp_path):
    named = _word_tokenizer(tmp_path / "tok", text_corpus)
    run = tmp_path / "hf"
    status, _, err = cli(["train", *FAST, "--data", text_corpus, "--tokenizer", tmp_path / "tok", "--out", run,
                          "--max-steps", 1, "--eval-interval", 0])
    assert status == 0, err
    ckpt = _last_checkpoint(run)
    saved = AutoTokenizer.from_pretrained(ckpt)
    assert saved.get_vocab() == named.get_vocab() and saved.eos_token_id == named.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert (model.config.vocab_size, model.config.eos_token_id, model.config.pad_token_id) == \
        (len(named), named.eos_token_id, None)
    status, out, err = cli(["generate", "--ckpt", run, "--prompt", "import os", "--max-new-tokens", 4])
    assert status == 0, err
    assert out.startswith("import os") and f"after a {len(named('import os')['input_ids'])}-token prompt" in err

    # Pre-tokenized ids of no named tokenizer: no tokenizer files; prompts and output are ids.
    np.random.default_rng(0).integers(0, 100, 4000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    run = tmp_path / "ids"
    status, _, err = cli(["train", *FAST, "--data", tmp_path / "train.bin", "--out", run, "--max-steps", 1,
                          "--eval-interval", 0])
    assert status == 0, err
    assert not any((_last_checkpoint(run) / name).exists() for name in TOKENIZER_FILES)
    assert AutoModelForCausalLM.from_pretrained(_last_checkpoint(run)).config.pad_token_id is None
    status, out, err = cli(["generate", "--ckpt", run, "--prompt", "17 4 99", "--max-new-tokens", 3])
    assert status == 0, err
    ids = out.split()
    assert ids[:3] == ["17", "4", "99"] and len(ids) == 6 and all(0 <= int(i) < 128 for i in ids)


@pytest.mark.parametrize("prompt", [b"\x00\x00def", b"caf\xc3"])
def test_generate_api_takes_bytes(trained_run, prompt):
    import io

    from gatedfwa.cli.generate import generate_text

    out = io.StringIO()
    report = generate_text(trained_run, prompt, max_new_tokens=3, temperature=0, device="cpu", out=out)
    assert report.prompt_tokens == len(prompt) and report.new_tokens == 3
    assert out.getvalue().startswith(prompt.decode("utf-8", errors="replace"))
