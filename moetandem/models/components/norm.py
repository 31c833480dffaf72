"""RMSNorm in the ways families scale it, all normalising in fp32: "cast" (most: cast, then scale in the input
dtype), "offset" (Qwen3-Next / Qwen3.5: zero-centred weight, h · (1 + w) in fp32, then cast), "fp32" (Gemma: h · w
in fp32, then cast), "none" (no weight: Gemma's value and router norms); and the gated norm of linear-attention
outputs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, kind: str = "cast") -> None:
        super().__init__()
        if kind not in ("cast", "offset", "fp32", "none"):
            raise ValueError(f"unknown RMSNorm kind {kind!r}")
        if kind != "none":
            self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.kind = eps, kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.kind == "cast":
            return self.weight * h.to(dtype)
        if self.kind == "offset":
            return (h * (1.0 + self.weight.float())).to(dtype)
        if self.kind == "fp32":
            return (h * self.weight.float()).to(dtype)
        return h.to(dtype)


class GatedRMSNorm(RMSNorm):
    """RMSNorm(x) · silu(z) (Gated DeltaNet output norm): normalise first, then gate in fp32."""

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        dtype = x.dtype
        h = x.float()
        h = self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        return (h * F.silu(z.float())).to(dtype)
