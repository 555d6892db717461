"""The transformers recipe of docs/transformers.md, end to end, on a checkpoint written by
``gatedfwa train``: load it with the Auto classes, fine-tune a LoRA adapter with Trainer
(gradient accumulation and gradient checkpointing on), merge, save, and generate from the
saved folder through ``pipeline`` with a streamer."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    TextStreamer,
    Trainer,
    TrainingArguments,
    pipeline,
)

import gatedfwa  # noqa: F401  (registers the model with the Auto classes)
from gatedfwa.train.checkpoint import latest_checkpoint

TEXTS = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n",
         "class Point:\n    x: int\n    y: int\n", "import os\nprint(os.getcwd())\n"] * 2


def test_lora_trainer_checkpointing_pipeline_on_a_cli_checkpoint(trained_run, tmp_path, capsys):
    checkpoint = latest_checkpoint(trained_run)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear"))
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    dataset = [tokenizer(text) for text in TEXTS]
    # Trainer's gradient_checkpointing, named activation_checkpointing in newer transformers.
    checkpointing = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                     else "gradient_checkpointing")
    args = TrainingArguments(
        output_dir=str(tmp_path / "lora"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        **{checkpointing: True}, max_steps=2, learning_rate=1e-2, logging_steps=1, report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    assert all(block.gradient_checkpointing for block in model.base_model.model.model.layers)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    trained = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    assert all(not torch.equal(before[name], trained[name]) for name in before if "lora_B" in name), \
        "every LoRA B matrix (zero at the start) moved"

    merged = model.merge_and_unload().eval()
    prompt = tokenizer("def ", return_tensors="pt")
    with torch.no_grad():
        merged_logits = merged(**prompt).logits
    out = tmp_path / "merged"
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**prompt).logits, merged_logits)

    generator = pipeline("text-generation", model=str(out))
    capsys.readouterr()
    result = generator("def ", max_new_tokens=6, do_sample=False, streamer=TextStreamer(generator.tokenizer))
    text = result[0]["generated_text"]
    assert text.startswith("def ") and len(text) > len("def ")
    streamed = capsys.readouterr().out
    assert streamed.rstrip("\n") == text.rstrip("\n")
