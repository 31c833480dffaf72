"""The sparse MoE block: router -> top-k -> ExpertProvider (+ optional gated shared expert)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moetandem.experts.provider import ExpertProvider
from moetandem.models.layers import MLP


class SparseMoE(nn.Module):
    def __init__(self, layer: int, hidden: int, num_experts: int, top_k: int, norm_topk_prob: bool,
                 shared_intermediate: int = 0) -> None:
        super().__init__()
        self.layer, self.num_experts, self.top_k, self.norm_topk_prob = layer, num_experts, top_k, norm_topk_prob
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.shared_expert = MLP(hidden, shared_intermediate) if shared_intermediate else None
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False) if shared_intermediate else None
        #: routing hook (moetandem.gating): (block, x [T, H], logits [T, E]) -> ids [T, k], weights [T, k];
        #: None routes with the original router exactly
        self.router: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> expert ids [T, k], weights [T, k] (x's dtype)."""
        logits = self.gate(x)  # [T, E]
        if self.router is not None:
            return self.router(self, x, logits)
        probs = F.softmax(logits.float(), dim=-1)  # [T, E]
        weights, ids = torch.topk(probs, self.top_k, dim=-1)  # [T, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights.to(x.dtype)

    def forward(self, x: torch.Tensor, provider: ExpertProvider, valid: torch.Tensor | None = None) -> torch.Tensor:
        # x [B, L, H]; valid [B, L] bool marks real (non-padding) tokens, None = all real
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [T, H]
        rows = flat if valid is None else flat[valid.reshape(-1)]
        ids, w = self.route(rows)
        y = provider.compute(self.layer, rows, ids, w)  # [T', H]
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(rows)) * self.shared_expert(rows)
        if valid is not None:
            y = torch.zeros_like(flat).index_put_((valid.reshape(-1),), y)
        return y.view(shape)
