"""Feed-forward components: the SwiGLU activation of routed experts, dense MLPs, shared experts."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moetandem.kernels.linear import decode_linear


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)); weights in nn.Linear layout [out, in] (the tuned GEMV at decode sizes on CUDA:
    dense MLPs and shared experts)."""
    return decode_linear(F.silu(decode_linear(x, w_gate)) * decode_linear(x, w_up), w_down)


def expert_ffn(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert's SwiGLU with gate and up stacked: w13 [2I, H] (gate; up), w2 [H, I]. Two matmuls, not three."""
    g, u = F.linear(x, w13).chunk(2, dim=-1)  # [T, I] each
    return F.linear(F.silu(g) * u, w2)  # [T, H]


class MLP(nn.Module):
    """Dense SwiGLU MLP (dense layers, shared experts)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


class GeGLUMLP(MLP):
    """Dense MLP with the tanh-approximated GELU in place of SiLU (Gemma)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class SharedExpert(MLP):
    """An always-resident expert every token goes through; `gated`: scaled by sigmoid(gate(x)) (Qwen2-MoE), else
    added as is (DeepSeek, GLM: n_shared_experts of them fused into one MLP of n·I)."""

    def __init__(self, hidden: int, intermediate: int, gated: bool) -> None:
        super().__init__(hidden, intermediate)
        self.gate = nn.Linear(hidden, 1, bias=False) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # [T, H]
        return y if self.gate is None else torch.sigmoid(self.gate(x)) * y


@dataclass(frozen=True)
class SharedExpertSpec:
    intermediate_size: int
    gated: bool = False

    def build(self, hidden: int) -> SharedExpert:
        return SharedExpert(hidden, self.intermediate_size, self.gated)


class ReluMLP(nn.Module):
    """Dense wo(relu(wi x)) (T5 / Switch Transformers' dense feed-forward layers)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.wi = nn.Linear(hidden, intermediate, bias=False)
        self.wo = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.relu(self.wi(x)))
