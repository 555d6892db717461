"""GatedFWAForCausalLM in the everyday transformers workflows, one section per workflow
(tiny models, CPU, float32)."""

import functools
import json
import logging
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import gatedfwa  # noqa: F401  (registers the Auto classes)
from gatedfwa.models import GatedFWAConfig, GatedFWAForCausalLM
from gatedfwa.models.modeling import left_padding_mask_from_pad_tokens
from gatedfwa.models.remote_code import AUTO_MAP, REMOTE_CODE_FILE
from gatedfwa.ops import use_backend
from gatedfwa.testing import output_cache
from tests.models.test_generation import sharpened
from tests.models.test_model import tiny_config


def fixed_batch(rows: int = 4, seqlen: int = 12, vocab: int = 61) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and labels [rows, seqlen] that do not depend on the test's seed; the labels
    hold -100 unevenly over the rows, so that a mean of per-row (or per-micro-batch) means
    differs from the mean over all labels."""
    generator = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (rows, seqlen), generator=generator)
    labels = ids.clone()
    labels[0, :9] = -100
    labels[3, 5:] = -100
    return ids, labels


@functools.cache
def initial_model_state() -> dict[str, torch.Tensor]:
    generator_state = torch.get_rng_state()
    torch.manual_seed(99)
    state = {name: tensor.clone() for name, tensor in GatedFWAForCausalLM(tiny_config()).state_dict().items()}
    torch.set_rng_state(generator_state)
    return state


def model_at_initial_state() -> GatedFWAForCausalLM:
    model = GatedFWAForCausalLM(tiny_config())
    model.load_state_dict(initial_model_state())
    return model


@functools.cache
def one_trainer_step(accumulation: int, gradient_checkpointing: bool = False):
    """One optimizer step of transformers' Trainer (SGD, lr 1, no clipping) over the 4 rows of
    fixed_batch, in micro-batches of 4 // accumulation rows. Returns (the logged loss, the
    change of every parameter, which is minus its gradient, and the model)."""
    ids, labels = fixed_batch()
    rows = [{"input_ids": ids[i], "labels": labels[i]} for i in range(len(ids))]
    model = model_at_initial_state()
    # Trainer(gradient_checkpointing=True), named activation_checkpointing since transformers 5.2x.
    checkpointing_name = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                          else "gradient_checkpointing")
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=len(rows) // accumulation,
            gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=1.0,
            lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, logging_steps=1,
            report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
            **{checkpointing_name: gradient_checkpointing},
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 1
    start = initial_model_state()
    change = {name: (tensor - start[name]) for name, tensor in model.state_dict().items()}
    return logged[0], change, model


# --- 1. gradient accumulation under Trainer ---------------------------------------------


def test_loss_is_transformers_causal_lm_loss_with_num_items_in_batch():
    """The loss of a whole batch is the mean over its labels; with num_items_in_batch, each
    part's loss is its sum divided by it, so the parts add up to the whole (values and
    gradients)."""
    ids, labels = fixed_batch()
    model = model_at_initial_state()
    whole = model(ids, labels=labels)
    expected = F.cross_entropy(whole.logits[:, :-1].reshape(-1, 61), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(whole.loss, expected)
    whole.loss.backward()
    whole_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    count = labels[:, 1:].ne(-100).sum()
    parts = [model(ids[rows], labels=labels[rows], num_items_in_batch=count).loss for rows in (slice(0, 1), slice(1, 4))]
    # The per-part means would weigh row 0 (3 labels) like rows 1-3 (20 labels).
    assert abs(sum(parts).item() - whole.loss.item()) < 1e-5
    sum(parts).backward()
    for grad, expected_grad in zip((p.grad for p in model.parameters()), whole_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("accumulation", [2, 4])
def test_trainer_gradient_accumulation_gives_the_full_batch_loss_and_gradients(accumulation):
    loss, change, _ = one_trainer_step(accumulation)
    reference_loss, reference_change, _ = one_trainer_step(1)
    ids, labels = fixed_batch()
    with torch.no_grad():
        full_batch_mean = model_at_initial_state()(ids, labels=labels).loss.item()
    assert abs(reference_loss - full_batch_mean) < 1e-5
    assert abs(loss - reference_loss) < 1e-5
    for name, delta in change.items():
        torch.testing.assert_close(delta, reference_change[name], rtol=1e-5, atol=1e-6, msg=name)
    assert change["lm_head.weight"].abs().max() > 1e-3  # the step did change the weights


# --- 2. gradient checkpointing ------------------------------------------------------------


def enable_checkpointing(model, use_reentrant: bool = False) -> None:
    # transformers 5.2x calls it activation checkpointing (the gradient_* names remain as
    # deprecated aliases of the same code).
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(use_reentrant):
    """With padding (the blocks run on the packed layout) and token shift; the attention
    layers run twice per step when checkpointed (the recomputation in the backward pass)."""
    config = tiny_config(token_shift=True, attention_kinds=["gatedfwa", "full"])
    ids, labels = fixed_batch()
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    labels = labels.masked_fill(mask == 0, -100)
    runs = []
    for checkpointed in (False, True):
        torch.manual_seed(5)
        model = GatedFWAForCausalLM(config).train()
        if checkpointed:
            enable_checkpointing(model, use_reentrant)
        calls = []
        for block in model.model.layers:
            block.attn.register_forward_hook(lambda *_: calls.append(1))
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}, len(calls)))
    (plain_loss, plain_grads, plain_calls), (loss, grads, calls) = runs
    assert plain_calls == 2 and calls == 4
    torch.testing.assert_close(loss, plain_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_checkpointing_builds_no_cache_in_training(caplog):
    model = GatedFWAForCausalLM(tiny_config()).train()
    enable_checkpointing(model)
    ids = torch.randint(0, 61, (2, 6))
    hf_logging.warning_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="gatedfwa.models.modeling"):
        assert output_cache(model(ids, use_cache=True)) is None
    assert "use_cache=True is ignored while gradient checkpointing" in caplog.text
    with pytest.raises(ValueError, match="decoding cache cannot be used while gradient checkpointing"):
        model(ids, cache=model.new_cache())
    with torch.no_grad():  # no backward pass, so nothing is checkpointed: decoding works
        assert output_cache(model(ids, use_cache=True)).holds_tokens
    assert model.eval().generate(ids, max_new_tokens=3, do_sample=False).shape == (2, 9)


def test_trainer_with_gradient_checkpointing_gives_the_same_step():
    loss, change, model = one_trainer_step(1, gradient_checkpointing=True)
    assert all(block.gradient_checkpointing for block in model.model.layers)
    reference_loss, reference_change, _ = one_trainer_step(1)
    assert abs(loss - reference_loss) < 1e-5
    for name, delta in change.items():
        torch.testing.assert_close(delta, reference_change[name], rtol=1e-5, atol=1e-6, msg=name)


# --- Padding-free batches (DataCollatorWithFlattening) ---------------------------------------


def flattened_examples(lengths=(5, 9, 1, 7), vocab: int = 61):
    generator = torch.Generator().manual_seed(4321)
    return [{"input_ids": torch.randint(0, vocab, (n,), generator=generator).tolist()} for n in lengths]


@pytest.mark.parametrize("boundaries", ["position_ids", "flash_kwargs", "seq_idx"])
def test_flattened_batch_attends_within_each_sequence(boundaries):
    """Sequences laid end to end in one row (transformers' DataCollatorWithFlattening) give
    each sequence's own logits and loss, read from restarting position_ids, from
    cu_seq_lens_q/k, or from seq_idx."""
    from transformers import DataCollatorWithFlattening

    model = GatedFWAForCausalLM(tiny_config(attention_kinds=["gatedfwa", "full"])).eval()
    examples = flattened_examples()
    collator = DataCollatorWithFlattening(return_position_ids=boundaries == "position_ids",
                                          return_flash_attn_kwargs=boundaries == "flash_kwargs",
                                          return_seq_idx=boundaries == "seq_idx", return_tensors="pt")
    batch = collator(examples)
    out = model(**batch)
    separate = [model(torch.tensor([e["input_ids"]])).logits[0] for e in examples]
    torch.testing.assert_close(out.logits[0], torch.cat(separate), rtol=1e-5, atol=1e-5)
    # The collator masks each sequence's first label, so the loss is the mean over the
    # sequences' own next-token predictions.
    losses = [F.cross_entropy(logits[:-1], torch.tensor(e["input_ids"][1:], dtype=torch.long),
                              reduction="sum")
              for logits, e in zip(separate, examples)]
    count = sum(len(e["input_ids"]) - 1 for e in examples)
    torch.testing.assert_close(out.loss, torch.stack(losses).sum() / count, rtol=1e-5, atol=1e-6)


def right_padded(features):
    """The collator to compare with: right padding, an attention mask, labels -100 at padding."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, f in enumerate(features):
        ids[i, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, :len(f["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def test_trainer_on_flattened_batches_matches_padded_batches():
    """One Trainer step on DataCollatorWithFlattening batches equals one on the same examples
    right-padded with an attention mask (the loss over the same predictions)."""
    from transformers import DataCollatorWithFlattening

    examples = flattened_examples(lengths=(6, 11, 3, 8))
    changes = {}
    for name, collator in {"flattened": DataCollatorWithFlattening(), "padded": right_padded}.items():
        model = model_at_initial_state()
        with tempfile.TemporaryDirectory() as output_dir:
            args = TrainingArguments(
                output_dir=output_dir, per_device_train_batch_size=len(examples), max_steps=1, optim="sgd",
                learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
                report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                remove_unused_columns=False,
            )
            Trainer(model=model, args=args, train_dataset=examples, data_collator=collator).train()
        start = initial_model_state()
        changes[name] = {key: tensor - start[key] for key, tensor in model.state_dict().items()}
    for key, delta in changes["flattened"].items():
        torch.testing.assert_close(delta, changes["padded"][key], rtol=1e-4, atol=1e-6, msg=key)


def test_flattened_batch_compiles_fullgraph_with_cu_seq_lens(device):
    """cu_seq_lens_q/k keep a torch.compile(fullgraph=True) graph whole (backend aot_eager) on
    the Triton path, whose custom ops take packed sequences as they come (the PyTorch path
    loops over the sequences in Python)."""
    from transformers import DataCollatorWithFlattening

    model = GatedFWAForCausalLM(tiny_config()).eval().to(device)
    batch = DataCollatorWithFlattening(return_position_ids=False, return_flash_attn_kwargs=True,
                                       return_tensors="pt")(flattened_examples())
    batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = torch.as_tensor(batch["cu_seq_lens_q"], dtype=torch.int32)
    batch = {name: value.to(device) if torch.is_tensor(value) else value for name, value in batch.items()}
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with use_backend("triton"):
        separate = torch.cat([model(torch.tensor([e["input_ids"]], device=device)).logits[0]
                              for e in flattened_examples()])
        torch.testing.assert_close(compiled(**batch).logits[0], separate, rtol=1e-5, atol=1e-5)


def test_flattened_batch_arguments_are_checked():
    model = GatedFWAForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 61, (1, 10))
    with pytest.raises(ValueError, match="cu_seq_lens_q and cu_seq_lens_k"):
        model(ids, cu_seq_lens_q=torch.tensor([0, 4, 10]))
    with pytest.raises(ValueError, match="cu_seq_lens must be non-decreasing offsets"):
        model(ids, cu_seq_lens_q=torch.tensor([0, 4, 9]), cu_seq_lens_k=torch.tensor([0, 4, 9]))


# --- 3. attn_implementation -----------------------------------------------------------------

COMMON_NAMES = ["sdpa", "flash_attention_2", "flex_attention"]  # "eager" is what an unset name gives


def entry_points(tmp_path: Path):
    """name -> function(attn_implementation) building a GatedFWAForCausalLM with the same
    weights through that entry point."""
    reference = GatedFWAForCausalLM(tiny_config()).eval()
    reference.save_pretrained(tmp_path)

    def constructor(name):
        model = GatedFWAForCausalLM(tiny_config(attn_implementation=name))
        model.load_state_dict(reference.state_dict())
        return model

    def from_config(name):
        model = AutoModelForCausalLM.from_config(tiny_config(), attn_implementation=name)
        model.load_state_dict(reference.state_dict())
        return model

    def set_attn_implementation(name):
        model = GatedFWAForCausalLM.from_pretrained(tmp_path)
        model.set_attn_implementation(name)
        return model

    return reference, {
        "from_pretrained": lambda name: AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=name),
        "from_config": from_config,
        "constructor": constructor,
        "set_attn_implementation": set_attn_implementation,
    }


def test_common_attn_implementations_are_accepted_and_change_nothing(tmp_path, caplog):
    reference, builders = entry_points(tmp_path)
    ids = torch.randint(0, 61, (2, 7))
    with torch.no_grad():
        expected = reference(ids).logits
    hf_logging.warning_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="gatedfwa.models.modeling"):
        for entry, build in builders.items():
            for name in COMMON_NAMES:
                model = build(name).eval()
                assert model.config._attn_implementation == "eager", (entry, name)
                with torch.no_grad():
                    assert torch.equal(model(ids).logits, expected), (entry, name)
    for name in COMMON_NAMES:
        said = [r for r in caplog.records if f"attn_implementation='{name}'" in r.getMessage()]
        assert len(said) == 1 and "gatedfwa's own kernels" in said[0].getMessage()


def test_unknown_attn_implementation_raises_at_every_entry_point(tmp_path):
    _, builders = entry_points(tmp_path)
    for entry, build in builders.items():
        with pytest.raises(ValueError, match=r"attn_implementation='sdpa2' is not an attention implementation"):
            build("sdpa2")


# --- 4. output_hidden_states, return_dict, output_attentions -------------------------------


def test_hidden_states_follow_transformers_convention():
    """num_hidden_layers + 1 states: the embeddings, each block's output, and in place of the
    last block's output the final norm's (the input of lm_head)."""
    model = GatedFWAForCausalLM(tiny_config(num_hidden_layers=3)).eval()
    ids = torch.randint(0, 61, (2, 9))
    block_outputs = []
    for block in model.model.layers:
        block.register_forward_hook(lambda module, args, output: block_outputs.append(output))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    states = out.hidden_states
    assert isinstance(states, tuple) and len(states) == 4
    torch.testing.assert_close(states[0], model.model.embed_tokens(ids))
    torch.testing.assert_close(states[1], block_outputs[0])
    torch.testing.assert_close(states[2], block_outputs[1])
    torch.testing.assert_close(states[3], model.model.norm(block_outputs[2]))
    torch.testing.assert_close(model.lm_head(states[3]), out.logits)
    with torch.no_grad():
        assert model(ids).hidden_states is None
        model.config.output_hidden_states = True  # the config's default applies too
        assert len(model(ids).hidden_states) == 4
        model.config.output_hidden_states = False
        selected = model(ids, output_hidden_states=[0, -1]).hidden_states
    assert selected[1] is None and selected[2] is None
    torch.testing.assert_close(selected[0], states[0])
    torch.testing.assert_close(selected[3], states[3])
    with pytest.raises(ValueError, match="output_hidden_states must be a bool"):
        model(ids, output_hidden_states=[4])


def test_hidden_states_of_a_padded_batch_come_back_in_the_callers_layout():
    model = GatedFWAForCausalLM(tiny_config(token_shift=True)).eval()
    rows = [torch.randint(1, 61, (n,)) for n in (6, 3)]
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, 6 - len(row):] = row
        mask[b, 6 - len(row):] = 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        for b, row in enumerate(rows):
            alone = model(row[None], output_hidden_states=True).hidden_states
            for state, expected in zip(batched, alone):
                assert state.shape == (2, 6, 32)
                torch.testing.assert_close(state[b, 6 - len(row):], expected[0], rtol=1e-5, atol=1e-5)
    for state in batched:
        assert state[mask == 0].abs().max() == 0  # padding positions hold zeros


def test_hidden_states_through_chunked_prefill_and_generate():
    model = GatedFWAForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        whole = model(ids, output_hidden_states=True).hidden_states
        chunked = model(ids, cache=model.new_static_cache(16, prefill_chunk_size=4), output_hidden_states=True)
    for state, expected in zip(chunked.hidden_states, whole):
        torch.testing.assert_close(state, expected, rtol=1e-5, atol=1e-5)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, output_hidden_states=True,
                         return_dict_in_generate=True)
    assert [len(step) for step in out.hidden_states] == [3, 3, 3]
    assert out.hidden_states[0][-1].shape == (2, 11, 32) and out.hidden_states[1][-1].shape == (2, 1, 32)
    torch.testing.assert_close(out.hidden_states[0][-1], whole[-1], rtol=1e-5, atol=1e-5)


def test_return_dict_false_returns_tuples():
    model = GatedFWAForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 61, (2, 7))
    with torch.no_grad():
        out = model(ids, labels=ids)
        loss, logits = model(ids, labels=ids, return_dict=False)
        assert torch.equal(loss, out.loss) and torch.equal(logits, out.logits)
        as_tuple = model(ids, output_hidden_states=True, use_cache=True, return_dict=False)
        assert len(as_tuple) == 3 and torch.equal(as_tuple[0], out.logits)  # logits, cache, hidden states
        assert len(as_tuple[2]) == 3
        (hidden,) = model.model(ids, return_dict=False)
        torch.testing.assert_close(model.lm_head(hidden), out.logits)
        model.config.return_dict = False
        assert isinstance(model(ids), tuple) and isinstance(model(ids, return_dict=True).logits, torch.Tensor)
        # generate() asks for dict outputs itself.
        assert model.generate(ids, max_new_tokens=2, do_sample=False).shape == (2, 9)


def test_output_attentions_raises():
    model = GatedFWAForCausalLM(tiny_config())
    ids = torch.randint(0, 61, (1, 5))
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        model(ids, output_attentions=True)
    model.config.output_attentions = True
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        model(ids)


# --- 5. generate() without an attention mask ----------------------------------------------


def test_inferred_generation_mask_marks_only_leading_pad_tokens():
    is_token = torch.tensor([[0, 0, 1, 0, 1], [1, 0, 0, 1, 1], [0, 0, 0, 0, 1]])
    assert left_padding_mask_from_pad_tokens(is_token).tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]]
    assert left_padding_mask_from_pad_tokens(torch.tensor([[0, 1, 0]])).tolist() == [[1, 1, 1]]


def test_generate_without_mask_keeps_pad_ids_inside_a_prompt():
    """pad_token_id=0 and a prompt holding byte 0 (as the CLI's byte-level prompts can): the
    0 is text, so the tokens equal those generated with an explicit mask of ones."""
    model = sharpened(GatedFWAForCausalLM(tiny_config(token_shift=True))).eval()
    prompt = torch.randint(1, 61, (1, 8))
    prompt[0, 0] = 0
    prompt[0, 4] = 0
    options = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    inferred = model.generate(prompt, **options)
    explicit = model.generate(prompt, attention_mask=torch.ones_like(prompt), **options)
    assert torch.equal(inferred, explicit)


def test_generate_without_mask_infers_left_padding_of_a_batch():
    model = sharpened(GatedFWAForCausalLM(tiny_config(token_shift=True))).eval()
    rows = [torch.randint(1, 61, (n,)) for n in (7, 4, 6)]
    rows[0][2] = 0  # a pad id inside a row's text
    rows[1][1] = 0  # ... and right after a row's first token
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, 7 - len(row):] = row
        mask[b, 7 - len(row):] = 1
    options = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    inferred = model.generate(ids, **options)
    explicit = model.generate(ids, attention_mask=mask, **options)
    assert torch.equal(inferred, explicit)


# --- 6. loading without import gatedfwa ----------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_fresh_python(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Runs script in a new interpreter where gatedfwa is importable (PYTHONPATH) but not
    imported; transformers' copies of remote code go to a folder of this test."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=tmp_path,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)


def test_saved_folder_carries_the_remote_code_module(tmp_path):
    model = GatedFWAForCausalLM(tiny_config())
    model.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    module = (tmp_path / "model" / REMOTE_CODE_FILE).read_text()
    assert "from gatedfwa.models import GatedFWAConfig, GatedFWAForCausalLM, GatedFWAModel" in module
    # The CLI's checkpoints go through model.save_pretrained too.
    from gatedfwa.train.checkpoint import save_checkpoint

    step = save_checkpoint(tmp_path / "run", 3, model, torch.optim.SGD(model.parameters(), lr=0.1),
                           {"train": {}, "tokenizer": {}}, tokens_seen=0, keep=1)
    assert (step / REMOTE_CODE_FILE).read_text() == module
    assert json.loads((step / "config.json").read_text())["auto_map"] == AUTO_MAP
    # A config saved alone carries it as well, and keeps auto_map entries of its own.
    alone = GatedFWAConfig(**{**tiny_config().to_dict(), "auto_map": {"AutoTokenizer": "x.Y"}})
    alone.save_pretrained(tmp_path / "config")
    assert json.loads((tmp_path / "config" / "config.json").read_text())["auto_map"] == {"AutoTokenizer": "x.Y", **AUTO_MAP}
    assert (tmp_path / "config" / REMOTE_CODE_FILE).is_file()


def test_fresh_process_loads_with_trust_remote_code_and_says_how_without(tmp_path):
    model = GatedFWAForCausalLM(tiny_config(attention_kinds=["gatedfwa", "swa"])).eval()
    model.save_pretrained(tmp_path / "model")
    ids = torch.randint(0, 61, (2, 7))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")
    result = run_fresh_python(
        """
        import importlib.abc, json, sys
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        def error_of(call):
            try:
                call()
            except Exception as error:
                return f"{type(error).__name__}: {error}"
            return None

        report = {}
        # Without trust_remote_code: transformers' error names the remedy.
        report["no_trust"] = error_of(lambda: AutoModelForCausalLM.from_pretrained("model"))

        # With it, where gatedfwa is not installed: the import check names the package.
        class NoGatedFWA(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "gatedfwa" or name.startswith("gatedfwa."):
                    raise ModuleNotFoundError(f"No module named {name!r}")
        sys.meta_path.insert(0, NoGatedFWA())
        report["not_installed"] = error_of(lambda: AutoConfig.from_pretrained("model", trust_remote_code=True))
        sys.meta_path.pop(0)
        report["imported_before_loading"] = "gatedfwa" in sys.modules

        config = AutoConfig.from_pretrained("model", trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained("model", trust_remote_code=True).eval()
        base = AutoModel.from_pretrained("model", trust_remote_code=True)
        import gatedfwa.models
        expected = torch.load("expected.pt")
        with torch.no_grad():
            report["same_logits"] = torch.equal(model(expected["ids"]).logits, expected["logits"])
        report["config_class"] = type(config) is gatedfwa.models.GatedFWAConfig
        report["model_class"] = type(model) is gatedfwa.models.GatedFWAForCausalLM
        report["base_class"] = type(base) is gatedfwa.models.GatedFWAModel
        # Saving again writes the same auto_map, not copies of gatedfwa's modules.
        model.save_pretrained("again")
        import os
        report["saved_again"] = sorted(os.listdir("again"))
        report["auto_map_again"] = json.load(open("again/config.json"))["auto_map"]
        print("\\nREPORT", json.dumps(report))  # after the prompt input() printed
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.rsplit("REPORT ", 1)[-1])
    assert report["no_trust"].startswith("ValueError") and "trust_remote_code=True" in report["no_trust"]
    assert report["not_installed"].startswith("ImportError") and "gatedfwa" in report["not_installed"]
    assert "pip install gatedfwa" in report["not_installed"]
    assert report["imported_before_loading"] is False
    assert report["same_logits"] and report["config_class"] and report["model_class"] and report["base_class"]
    assert report["saved_again"] == sorted(["config.json", "generation_config.json", "model.safetensors", REMOTE_CODE_FILE])
    assert report["auto_map_again"] == AUTO_MAP
