"""Where the expert machinery (moetandem.experts, gating) finds the expert activation; the model's own layers
live in models/components/."""
from __future__ import annotations

from moetandem.models.components.mlp import MLP, expert_ffn, swiglu
from moetandem.models.components.norm import RMSNorm
from moetandem.models.components.rope import apply_rope, rope_tables

__all__ = ["MLP", "RMSNorm", "apply_rope", "expert_ffn", "rope_tables", "swiglu"]
