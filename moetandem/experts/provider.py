"""The ExpertProvider interface: the MoE layer hands it token rows and routing and gets outputs back.

The model never knows where an expert lives. All-resident, budgeted committee, miss policies and the
cloud are providers (or compositions of them)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ExpertGroups:
    """Routing assignments sorted by expert, so each expert runs once on all its rows."""

    order: torch.Tensor  # [T*k] assignment indices, sorted by expert
    token: torch.Tensor  # [T*k] token row of each sorted assignment
    counts: torch.Tensor  # [E] assignments per expert (on the routing device)


def group_by_expert(expert_ids: torch.Tensor, num_experts: int) -> ExpertGroups:
    """expert_ids [T, k] -> assignments sorted by expert. No host sync (CUDA-graph safe)."""
    flat = expert_ids.reshape(-1)  # [T*k]
    order = torch.argsort(flat, stable=True)
    token = order // expert_ids.shape[1]
    counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    return ExpertGroups(order=order, token=token, counts=counts)


def combine(y_sorted: torch.Tensor, groups: ExpertGroups, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of sorted expert outputs back into token rows. y_sorted [T*k, H] -> [T, H].
    Deterministic (no atomics): un-sort, then sum over k."""
    T, k = weights.shape
    y = torch.empty_like(y_sorted)
    y[groups.order] = y_sorted
    y = y.view(T, k, -1) * weights.to(y.dtype)[..., None]  # [T, k, H]
    return y.sum(dim=1)


class ExpertProvider(ABC):
    """Computes Σ_j w_j · E_{id_j}(x) for routed experts of one MoE layer.

    Step contract (the engine keeps it): `after_step()` is called once after every forward (prefill, eager
    decode, or CUDA-graph replay), outside any graph. When `graph_safe` is True, `compute()` may be captured into
    a CUDA graph: it then runs in Python only at capture time, so per-step host bookkeeping (step counters,
    periodic refresh, publishing finished copies, reading device counters) belongs in `after_step()`.
    Wrappers (recorders, the cloud provider) should delegate all four members below to the provider they wrap."""

    #: True when compute() never waits on the host, so a decode step may be captured in a CUDA graph
    #: (a plain attribute or a property: it may change between steps, e.g. a committee once after_step is seen).
    graph_safe: bool = False

    #: counters with `as_dict()` (a committee's CommitteeStats), or None when there is nothing to count;
    #: reading it may sync with the device, so read it between steps.
    stats: Any = None

    @abstractmethod
    def compute(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H]; expert_ids [T, k] (long); weights [T, k] -> [T, H] in x's dtype."""

    def expert_bytes(self) -> int:
        """Bytes of expert weights this provider holds on the compute device."""
        return 0

    def resident_mask(self, layer: int) -> torch.Tensor:
        """bool [E] on the compute device: experts of `layer` computed on the device without a miss now."""
        raise NotImplementedError(f"{type(self).__name__} does not report which experts are resident")

    def after_step(self) -> None:
        """Per-step host bookkeeping, called by the engine after every forward, outside any graph."""
