"""Local expert selection: per MoE layer, the experts that are cheap *now*.

Cheap means resident in the committee, or (within a per-step latency budget) fetchable or computable on the
host, or in split mode placed on the end device. The set follows the committee as it refreshes and the
profile as it changes: a smaller budget or a slower fetch shrinks it."""
from __future__ import annotations

import math
from typing import Any

import torch

from moetandem.gating.profile import DeviceProfile


class LocalSelector:
    """local_mask(layer) -> bool [E]. `latency_budget_s` is what one layer may spend per step on experts that
    are not resident (0: resident only); `remote` maps a layer to experts placed in the cloud (split mode),
    which are never local."""

    def __init__(self, provider: Any, num_experts: int, latency_budget_s: float = 0.0,
                 remote: dict[int, list[int]] | None = None) -> None:
        self.provider, self.E, self.latency_budget_s = provider, num_experts, latency_budget_s
        self.remote = remote or {}
        self.extra = 0  # non-resident experts per layer affordable per step (set from the profile)

    def update(self, profile: DeviceProfile) -> None:
        """Profile listener: how many non-resident experts one step may bring in (fetch or host, the cheaper)."""
        per_expert = min(profile.fetch_s, profile.expert_ffn_host_s)
        self.extra = int(math.floor(self.latency_budget_s / per_expert)) if per_expert > 0 else 0

    def resident(self, layer: int) -> torch.Tensor:
        """bool [E] on the provider's device: experts resident now (all of them for a provider that does not
        report residency, e.g. one without a budget)."""
        try:
            return self.provider.resident_mask(layer).clone()
        except (NotImplementedError, AttributeError, KeyError):
            return torch.ones(self.E, dtype=torch.bool)

    def local_mask(self, layer: int) -> torch.Tensor:
        mask = self.resident(layer)
        importance = getattr(self.provider, "importance", None)
        if self.extra > 0 and importance is not None:  # the most important non-resident experts: the ones a
            score = importance(layer).to(mask.device)  # refresh would admit next  [E]
            score[mask] = -math.inf
            n = min(self.extra, int((~mask).sum()))
            if n > 0:
                mask[torch.topk(score, n).indices] = True
        if layer in self.remote:
            mask[self.remote[layer]] = False
        return mask

    def local_fraction(self) -> float:
        layers = list(getattr(self.provider, "layers", None) or [])
        if not layers:
            return 1.0
        return sum(float(self.local_mask(l).float().mean()) for l in layers) / len(layers)
