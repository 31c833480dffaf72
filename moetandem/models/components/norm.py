"""RMSNorm, as every supported family computes it (normalise in fp32, scale in the input dtype); the zero-centred
variant (Qwen3-Next / Qwen3.5: scale by 1 + w in fp32, then cast); the gated norm of linear-attention outputs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # zero-centred weight: (h · (1 + w)) in fp32, then the input dtype
            return (h * (1.0 + self.weight.float())).to(dtype)
        return self.weight * h.to(dtype)


class GatedRMSNorm(RMSNorm):
    """RMSNorm(x) · silu(z) (Gated DeltaNet output norm): normalise first, then gate in fp32."""

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        dtype = x.dtype
        h = x.float()
        h = self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        return (h * F.silu(z.float())).to(dtype)
