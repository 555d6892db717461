"""Training: data (data.py; the tokenizers are in gatedfwa/tokenizer.py), settings (config.py, presets.py), the
loop (trainer.py), checkpoints (checkpoint.py), multi-process plumbing (distributed.py) and
metrics (metrics.py). ``gatedfwa train`` (gatedfwa/cli/main.py) is the front door."""
