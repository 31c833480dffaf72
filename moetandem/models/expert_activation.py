"""How a routed expert turns its gate/up rows into the down projection's input, and whether its projections carry
biases: the one description every expert path (executor loop, fused kernel, host misses) follows. A gated expert
(the GLU kinds) holds gate, up and down; a plain one ("relu": Switch Transformers' wi / wo) holds an input
projection [I, H] in the place of gate; up, and down; `rows(I)` says how many rows that first projection has."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moetandem.models.components.mlp import expert_ffn

#: act(g) · u activations, and gpt-oss's clamped SwiGLU ((clamp(u) + 1) · g' σ(α g'), g' = min(g, limit))
KINDS = ("silu", "gelu", "gelu_tanh", "clamped_swiglu", "relu")
#: kinds with no gate: down(act(in x)), the first projection is [I, H]
PLAIN = ("relu",)


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

    @property
    def gated(self) -> bool:
        return self.kind not in PLAIN

    def rows(self, inter: int) -> int:
        """Rows of the first projection: gate and up (2I), or the plain input projection (I)."""
        return 2 * inter if self.gated else inter

    def bias_numel(self, inter: int, hidden: int) -> int:
        return self.rows(inter) + hidden if self.bias else 0

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        """The first projection's output h [T, rows(I)] (biases added) -> the down projection's input [T, I]."""
        if not self.gated:
            return F.relu(h)
        g, u = h.chunk(2, dim=-1)  # [T, I] each
        return self.glu(g, u)

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
        """One expert on rows x [T, H]: w13 [rows(I), H] (gate; up, or the plain input projection), w2 [H, I],
        b13 [rows(I)], b2 [H] -> [T, H]."""
        if self.kind == "silu" and b13 is None and b2 is None:
            return expert_ffn(x, w13, w2)  # the SwiGLU families' path, unchanged
        return F.linear(self.hidden(F.linear(x, w13, b13)), w2, b2)  # [T, H]


SWIGLU = ExpertActivation()
