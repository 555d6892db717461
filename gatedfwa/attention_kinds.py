"""The attention kinds a GatedFWA model layer can be: the one list of them.

GatedFWAConfig (gatedfwa/models/configuration.py) checks ``attention_kinds`` against it and
reads from it which layers use the gate and the window; the trainer's checks and the
command line's help read it too. It lives in a module of its own, importing nothing, so that
``gatedfwa train --help`` can list the kinds without loading transformers and torch.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["ATTENTION_KINDS", "AttentionKind"]


class AttentionKind(NamedTuple):
    uses_gate: bool  # adds the GatedFWA decay (the gate) to the logits
    uses_window: bool  # attends to the last window_size keys only (NSA: its sliding branch does)
    description: str
    uses_nsa: bool = False  # Native Sparse Attention: compressed + selected blocks + sliding window


ATTENTION_KINDS: dict[str, AttentionKind] = {
    "gatedfwa": AttentionKind(True, True, "gated sliding window"),
    "swa": AttentionKind(False, True, "sliding window, no gate"),
    "full": AttentionKind(False, False, "full causal softmax"),
    "forgetting": AttentionKind(True, False, "gate, no window"),
    "nsa": AttentionKind(False, True, "NSA, plain sliding branch", uses_nsa=True),
    "nsa-gatedfwa": AttentionKind(True, True, "NSA, gated sliding branch", uses_nsa=True),
}
