"""The sparse MoE block: router -> top-k -> ExpertProvider (+ an always-resident shared expert)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moetandem.errors import MoetandemError, UnsupportedModelError
from moetandem.experts.provider import ExpertProvider
from moetandem.models.components.mlp import SharedExpertSpec
from moetandem.models.components.routers import RouterSpec


class SparseMoE(nn.Module):
    """Only the routed experts go through the provider (and so can live off the device); the router and the
    shared expert are ordinary parameters of the block."""

    def __init__(self, layer: int, hidden: int, num_experts: int, top_k: int, router: RouterSpec,
                 shared: SharedExpertSpec | None = None) -> None:
        super().__init__()
        self.layer, self.num_experts, self.top_k = layer, num_experts, top_k
        self.gate = router.build(hidden, num_experts, top_k)
        self.norm_topk_prob = self.gate.norm_topk_prob
        self.shared_expert = shared.build(hidden) if shared is not None else None
        #: routing hook (moetandem.gating): (block, x [T, H], logits [T, E]) -> ids [T, k], weights [T, k];
        #: None routes with the original router exactly
        self.router: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
        #: set with a hook that folds its own projection into the router's matmul: [E + r, H], the router's rows
        #: first; the hook then gets logits [T, E + r] and reads the router's from the first E columns
        self.router_weight: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> expert ids [T, k], weights [T, k] (x's dtype)."""
        if self.router is None:
            _, ids, w = self.gate.route(x, x.dtype)  # logits [T, E] (one launch with the top-k where it can be)
            return ids, w
        if not self.gate.softmax_logits:
            raise UnsupportedModelError(f"routing hooks (--gate) assume softmax routing; this model routes with "
                                        f"{type(self.gate).__name__}: run it with --gate off")
        if self.router_weight is not None:
            logits = F.linear(x.to(self.router_weight.dtype), self.router_weight)  # [T, E + r]
        else:
            logits = self.gate(x)  # [T, E]
        return self.router(self, x, logits)

    def expert_input(self, rows: torch.Tensor) -> torch.Tensor:
        """What the routed experts see of the routed rows [T, H] (Gemma-4 normalises them first)."""
        return rows

    def forward(self, x: torch.Tensor, provider: ExpertProvider, valid: torch.Tensor | None = None) -> torch.Tensor:
        # x [B, L, H]; valid [B, L] bool marks real (non-padding) tokens, None = all real
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [T, H]
        rows = flat if valid is None else flat[valid.reshape(-1)]  # [T', H]
        ids, w = self.route(rows)  # [T', k] each
        y = provider.compute(self.layer, self.expert_input(rows), ids, w)  # [T', H]
        if self.shared_expert is not None:
            y = y + self.shared_expert(rows)
        if valid is not None:
            y = torch.zeros_like(flat).index_put_((valid.reshape(-1),), y)
        return y.view(shape)


def run_moe(block: SparseMoE, x: torch.Tensor, experts: Mapping[int, ExpertProvider],
            valid: torch.Tensor | None) -> torch.Tensor:
    """block(x) with the provider the engine passed for its layer."""
    provider = experts.get(block.layer)
    if provider is None:
        raise MoetandemError(f"no expert provider for MoE layer {block.layer}; build the engine with "
                             "moetandem.load() / moetandem.runtime.build_engine()")
    return block(x, provider, valid)
