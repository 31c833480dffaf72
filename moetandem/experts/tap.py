"""Routing taps: a provider that records what each MoE layer is asked (routing, input rows) and hands the work
to the layer's own provider. Used through Engine.view, so the engine being observed is never modified (a split
engine keeps its cloud routing)."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from moetandem.experts.provider import ExpertProvider


class Tap(ExpertProvider):
    """Subclasses implement record(); compute() records, then runs the layer's own provider."""

    graph_safe = False  # records on the host every step

    def __init__(self, inner: Mapping[int, ExpertProvider]) -> None:
        self.inner = dict(inner)

    def record(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self.record(layer, x, expert_ids, weights)
        return self.inner[layer].compute(layer, x, expert_ids, weights)

    def after_step(self) -> None:
        for p in {id(p): p for p in self.inner.values()}.values():
            p.after_step()

    def expert_bytes(self) -> int:
        return sum(p.expert_bytes() for p in {id(p): p for p in self.inner.values()}.values())
