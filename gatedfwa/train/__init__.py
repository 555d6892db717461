"""Training: data (data.py), settings (config.py, presets.py), the loop (trainer.py),
checkpoints (checkpoint.py), the run folder (run_folder.py), the memory check (memory.py),
the CPU thread count (threads.py), multi-process plumbing (distributed.py), the device
choice (devices.py, which generation uses too) and metrics (metrics.py). The tokenizers
(gatedfwa/text/), the environment variables (gatedfwa/environment.py) and the error types
(gatedfwa/errors.py) live outside, since generation and the ops use them too.
``gatedfwa train`` (gatedfwa/cli/main.py) is the front door; it also draws loss.png after
training."""
