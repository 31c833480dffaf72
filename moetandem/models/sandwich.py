"""The Gemma-4 decoder layer: RMSNorm before and after attention and the feed-forward, a dense GeGLU MLP with a
sparse MoE beside it (each output normalised, then summed), and a learned per-layer output scale. The MoE routes
on the layer's residual stream and its experts see that stream through their own RMSNorm."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from moetandem.experts.provider import ExpertProvider
from moetandem.models.components import GeGLUMLP, RMSNorm
from moetandem.models.moe import SparseMoE, run_moe

if TYPE_CHECKING:
    from moetandem.models.transformer import ArchArgs


class NormedInputMoE(SparseMoE):
    """SparseMoE whose routed experts see pre_norm(x); the router reads x itself."""

    def __init__(self, layer: int, a: "ArchArgs") -> None:
        super().__init__(layer, a.hidden_size, a.num_experts, a.top_k, a.router, a.shared_expert)
        self.pre_norm = RMSNorm(a.hidden_size, a.rms_norm_eps, "fp32")

    def expert_input(self, rows: torch.Tensor) -> torch.Tensor:
        return self.pre_norm(rows)


class SandwichLayer(nn.Module):
    def __init__(self, a: "ArchArgs", i: int) -> None:
        super().__init__()
        H, eps = a.hidden_size, a.rms_norm_eps
        self.self_attn = a.layer_attention[i].build(H, eps)
        self.window = a.sliding_windows[i]
        names = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm")
        for name in names:
            setattr(self, name, RMSNorm(H, eps, "fp32"))
        self.mlp = GeGLUMLP(H, a.dense_intermediate_size)
        self.moe = NormedInputMoE(i, a) if a.moe_layers[i] else None
        if self.moe is not None:
            self.post_feedforward_layernorm_1 = RMSNorm(H, eps, "fp32")
            self.post_feedforward_layernorm_2 = RMSNorm(H, eps, "fp32")
        self.layer_scalar = nn.Parameter(torch.ones(1), requires_grad=False)  # a checkpoint tensor, so a parameter

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: tuple[torch.Tensor, ...],
                rows: torch.Tensor | None, pos: torch.Tensor, masks: dict[int | None, torch.Tensor], kv_len: int,
                valid: torch.Tensor | None, experts: Mapping[int, ExpertProvider]) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), cos, sin, cache, rows, pos, masks[self.window], kv_len,
                             window=self.window)
        h = x + self.post_attention_layernorm(attn)  # [B, L, H]
        y = self.mlp(self.pre_feedforward_layernorm(h))  # [B, L, H]
        if self.moe is not None:
            routed = run_moe(self.moe, h, experts, valid)  # [B, L, H]
            y = self.post_feedforward_layernorm_1(y) + self.post_feedforward_layernorm_2(routed)
        return (h + self.post_feedforward_layernorm(y)) * self.layer_scalar
