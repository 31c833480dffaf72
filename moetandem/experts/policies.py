"""What to do when the router picks an expert that is not resident, and the cost model behind it."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from moetandem.errors import InvalidRequestError
from moetandem.experts.store import flat_views
from moetandem.models.layers import expert_ffn

POLICIES = ("auto", "fetch", "host", "substitute", "skip")
BASELINES = ("lru", "static", "host-only")
FIDELITY = ("exact", "balanced", "fast")


@dataclass(frozen=True)
class MissPolicy:
    """skip_below: drop routed experts whose gate weight is below τ (renormalise the rest); applies to
    non-resident experts, and to resident ones too when skip_resident. substitute_min_sim: replace a miss by the
    most similar resident expert when their similarity is at least this (None: never substitute).
    exact: what a remaining miss gets: "fetch" (copy it in), "host" (compute on the host), "auto" (cost model)."""

    skip_below: float = 0.0
    skip_resident: bool = False
    substitute_min_sim: float | None = None
    exact: str = "auto"
    refresh: bool = True  # committee refreshed from importance (False: static / LRU baselines)
    lru: bool = False  # fetched experts evict the least recently used slot (mixtral-offloading)

    @staticmethod
    def from_fidelity(fidelity: str) -> "MissPolicy":
        if fidelity == "exact":
            return MissPolicy()
        if fidelity == "balanced":
            return MissPolicy(skip_below=0.05, substitute_min_sim=0.5)
        if fidelity == "fast":
            return MissPolicy(skip_below=0.1, skip_resident=True, substitute_min_sim=-1.0)
        raise InvalidRequestError(f"unknown fidelity {fidelity!r}; choose one of {', '.join(FIDELITY)}")

    @staticmethod
    def named(policy: str, tau: float = 0.1) -> "MissPolicy":
        """Single policies and the built-in baselines, by name."""
        table = {
            "auto": MissPolicy(), "fetch": MissPolicy(exact="fetch"), "host": MissPolicy(exact="host"),
            "substitute": MissPolicy(substitute_min_sim=-1.0), "skip": MissPolicy(skip_below=float("inf")),
            "lru": MissPolicy(exact="fetch", refresh=False, lru=True),
            "static": MissPolicy(skip_below=float("inf"), refresh=False),
            "host-only": MissPolicy(exact="host", refresh=False),
        }
        if policy not in table:
            raise InvalidRequestError(f"unknown policy {policy!r}; choose one of {', '.join(table)}")
        p = table[policy]
        if policy == "skip":  # skip misses below τ, fetch/host the rest exactly
            p = MissPolicy(skip_below=tau)
        return p


class CostModel:
    """Measured costs that pick fetch vs host compute for a miss: bytes over host->device bandwidth against
    rows × host FFN time per row (plus moving the activations)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, inter: int, hidden: int) -> None:
        self.same_memory = device.type == "cpu"
        n = 3 * inter * hidden
        host = torch.randn(n, dtype=dtype)
        if device.type == "cuda":
            host = host.pin_memory()
        dst = torch.empty(n, dtype=dtype, device=device)
        self.fetch_s = self._time(lambda: dst.copy_(host, non_blocking=True), device)
        w13, w2 = flat_views(host.float(), inter, hidden)
        x = torch.randn(1, hidden)
        self.host_row_s = self._time(lambda: expert_ffn(x, w13, w2), torch.device("cpu"))

    @staticmethod
    def _time(fn, device: torch.device, reps: int = 5) -> float:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t) / reps

    def prefer_host(self, rows: int) -> bool:
        """On a CPU box 'host' and 'device' memory are the same RAM: computing from the mapped file avoids
        evicting a resident expert, so host wins. On a GPU, compare the copy with the host FFN."""
        return self.same_memory or rows * self.host_row_s < self.fetch_s
