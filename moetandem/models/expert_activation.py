"""How a routed expert turns its gate/up rows into the down projection's input, and whether its projections carry
biases: the one description every expert path (executor loop, fused kernel, host misses) follows."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moetandem.models.components.mlp import expert_ffn

#: act(g) · u activations, and gpt-oss's clamped SwiGLU ((clamp(u) + 1) · g' σ(α g'), g' = min(g, limit))
KINDS = ("silu", "gelu", "gelu_tanh", "clamped_swiglu")


@dataclass(frozen=True)
class ExpertActivation:
    kind: str = "silu"
    #: per-expert gate/up bias [2I] and down bias [H] (the flat expert buffer ends with [b_gate | b_up | b_down])
    bias: bool = False
    alpha: float = 1.702  # clamped_swiglu only
    limit: float = 7.0  # clamped_swiglu only

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"expert activation {self.kind!r}: have {', '.join(KINDS)}")

    def bias_numel(self, inter: int, hidden: int) -> int:
        return 2 * inter + hidden if self.bias else 0

    def glu(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """g, u [T, I] (gate and up, biases added) -> the down projection's input [T, I]."""
        if self.kind == "clamped_swiglu":
            g = g.clamp(max=self.limit)
            u = u.clamp(min=-self.limit, max=self.limit)
            return (u + 1) * (g * torch.sigmoid(g * self.alpha))
        if self.kind == "silu":
            return F.silu(g) * u
        return F.gelu(g, approximate="tanh" if self.kind == "gelu_tanh" else "none") * u

    def ffn(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, b13: torch.Tensor | None = None,
            b2: torch.Tensor | None = None) -> torch.Tensor:
        """One expert on rows x [T, H]: w13 [2I, H] (gate; up), w2 [H, I], b13 [2I], b2 [H] -> [T, H]."""
        if self.kind == "silu" and b13 is None and b2 is None:
            return expert_ffn(x, w13, w2)  # the SwiGLU families' path, unchanged
        g, u = F.linear(x, w13, b13).chunk(2, dim=-1)  # [T, I] each
        return F.linear(self.glu(g, u), w2, b2)  # [T, H]


SWIGLU = ExpertActivation()
