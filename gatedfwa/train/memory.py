"""Will one training micro-step fit in memory? An estimate, checked before the first step.

A batch far too large for the machine (``--batch-size 1000000``) should stop at once with a
message, not spend minutes allocating until the system kills the process. The estimate
counts what one forward + backward pass of a micro-batch keeps alive:

* the parameters, their gradients and AdamW's two moments: 16 bytes per parameter (float32;
  divided among the processes with FSDP);
* the activations the backward pass needs, per token of the micro-batch and per layer: the
  inputs and outputs of the norms, projections, rotary embedding, gate and MLP, and on the
  PyTorch attention path (the CPU) each query's window of scores, up to six copies of it
  (scaled, decay-biased, masked, centred, exponentiated and the probabilities' gradient:
  gatedfwa/ops/window_attention/torch_path.py);
* the logits: the model's, their float32 copy, the log-softmax of the loss and the gradient,
  ``4 x vocab`` float32 numbers per token.

It is meant to be a little above what training really takes (activations in float32 on the
CPU, bf16 under autocast on a GPU), so that only settings clearly beyond the machine are
refused: it is compared with the memory the machine has available now (MemAvailable from
/proc/meminfo on the CPU, free GPU memory from the driver on CUDA).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from gatedfwa.attention_kinds import attention_kind
from gatedfwa.environment import local_world_size
from gatedfwa.errors import ConfigError
from gatedfwa.ops.backend import select_backend

__all__ = ["MemoryEstimate", "estimate_training_memory", "available_memory", "check_training_memory"]

_FLOAT32 = 4
_BF16 = 2
_PER_PARAMETER = 4 * _FLOAT32  # weight, gradient, AdamW exp_avg and exp_avg_sq
_LOGIT_COPIES = 4  # logits, their float32 copy, log-softmax, gradient


@dataclass
class MemoryEstimate:
    """Bytes one process needs for one micro-step (see the module docstring)."""

    parameters: int  # weights, gradients and optimizer state
    activations: int  # saved for the backward pass, all layers
    logits: int  # logits and the loss's float32 copies

    @property
    def total(self) -> int:
        return self.parameters + self.activations + self.logits


def _attention_chunk(reach: int) -> int:
    """The query chunk of the PyTorch attention path for a window of ``reach`` keys (as in
    gatedfwa/ops/window_attention/torch_path.py: about the window, within [16, 128])."""
    chunk = 16
    while chunk < min(reach, 128):
        chunk *= 2
    return chunk


def _layer_values_per_token(config, layer: int, seq_len: int, torch_attention: bool) -> int:
    """Numbers one layer saves for the backward pass, per token."""
    hidden, inner = config.hidden_size, config.intermediate_size
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    values = 4 * hidden  # two norms: input and output each
    values += 2 * hidden  # two residual sums
    values += (heads + 2 * kv_heads) * head_dim  # q, k, v projections
    values += (heads + kv_heads) * head_dim  # rotary q, k
    values += 2 * heads  # log gates and their sums
    values += 2 * heads * head_dim + hidden  # attention output, output gate, o_proj
    values += 4 * inner + hidden  # MLP: gate, SiLU, up, product, down
    if torch_attention:
        window = config.layer_window(layer)
        # A query reads only its window where the layer's attention is the window op alone
        # (the kinds that split across ranks with a window-sized halo); NSA's compressed and
        # selected branches, like full attention, reach the whole prefix.
        window_only = window is not None and attention_kind(config.layer_kinds[layer]).supports_context_parallel
        reach = min(window, seq_len) if window_only else seq_len
        chunk = _attention_chunk(reach)
        span = chunk + reach - 1
        values += 6 * heads * span  # a query's scores, up to six copies alive at once
        values += 2 * kv_heads * head_dim * -(-span // chunk)  # key and value spans of each chunk
    return values


def estimate_training_memory(config, parameters: int, micro_batch: int, seq_len: int, device: torch.device,
                             sharded_over: int = 1) -> MemoryEstimate:
    """Bytes one process needs for a forward + backward pass of ``micro_batch`` windows of
    ``seq_len`` tokens (its context-parallel shard: the tokens it holds) with the model of
    GatedFWAConfig ``config`` (``parameters`` of them, sharded over ``sharded_over``
    processes with FSDP)."""
    tokens = micro_batch * seq_len
    torch_attention = select_backend(device) == "torch"
    per_token = config.hidden_size  # the embedding
    per_token += sum(_layer_values_per_token(config, layer, seq_len, torch_attention)
                     for layer in range(config.num_hidden_layers))
    per_token += 2 * config.hidden_size  # the final norm
    element = _BF16 if device.type == "cuda" else _FLOAT32
    return MemoryEstimate(
        parameters=_PER_PARAMETER * parameters // sharded_over,
        activations=tokens * per_token * element,
        logits=tokens * config.vocab_size * _LOGIT_COPIES * _FLOAT32,
    )


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the value is in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf or no such name on this system
        return None


def available_memory(device: torch.device) -> tuple[int, str] | None:
    """(bytes, what they are) this process can use on ``device``; None when unknown. On the
    CPU the memory other processes of this host's run (torchrun) also take is shared."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {device}"
    available = _meminfo_available()
    what = "available RAM"
    if available is None:
        available, what = _physical_memory(), "RAM"
    if available is None:
        return None
    processes = local_world_size()
    if processes > 1:
        return available // processes, f"{what} / {processes} processes"
    return available, what


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_training_memory(estimate: MemoryEstimate, device: torch.device, micro_batch: int) -> None:
    """ConfigError when ``estimate`` is more than the memory available on ``device``."""
    available = available_memory(device)
    if available is None or device.type not in ("cpu", "cuda"):
        return
    free, what = available
    if estimate.total <= free:
        return
    per_window = max(1, (estimate.activations + estimate.logits) // micro_batch)
    fits = max(0, (free - estimate.parameters) // per_window)
    advice = (f"lower --micro-batch-size (at most about {fits} windows fit; --batch-size may stay, "
              f"the rest becomes gradient accumulation)" if fits >= 1 else
              "lower --seq-len or use a smaller model")
    raise ConfigError(
        f"a micro-batch of {micro_batch} windows needs about {_gib(estimate.total)} "
        f"(activations {_gib(estimate.activations)}, logits {_gib(estimate.logits)}, weights and optimizer "
        f"{_gib(estimate.parameters)}) but {_gib(free)} is {what}: {advice}"
    )
