"""nn.Modules built on the ops: the GatedFWA and NSA attention layers and their helpers."""

from gatedfwa.layers.attention import GatedFWAttention, gate_bias_init
from gatedfwa.layers.norm import RMSNorm
from gatedfwa.layers.nsa_attention import NSAttention
from gatedfwa.layers.rotary import apply_rotary, rotary_angles

__all__ = ["GatedFWAttention", "NSAttention", "gate_bias_init", "RMSNorm", "apply_rotary", "rotary_angles"]
