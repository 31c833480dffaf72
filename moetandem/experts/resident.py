"""All experts resident on the compute device: the provider of the engine foundation. It runs on the shared
executor with expert ids as slot ids (its slot table is the identity)."""
from __future__ import annotations

import torch
from tqdm import tqdm

from moetandem.experts.executor import _grouped_mm, grouped_mm_supported, run_experts  # noqa: F401 (re-exported)
from moetandem.experts.executor import device_path_supported
from moetandem.experts.provider import ExpertProvider
from moetandem.experts.store import ExpertStore


class ResidentProvider(ExpertProvider):
    """Every expert of every MoE layer stacked on the device: w13 [E, 2I, H] (gate; up) and w2 [E, H, I]."""

    def __init__(self, store: ExpertStore, device: torch.device, dtype: torch.dtype, progress: bool = True) -> None:
        E, I, H = store.num_experts, store.inter, store.hidden
        self.w13: dict[int, torch.Tensor] = {}
        self.w2: dict[int, torch.Tensor] = {}
        for layer in tqdm(store.layers, desc="experts", unit="layer", disable=not progress, leave=False):
            w13 = torch.empty(E, 2 * I, H, device=device, dtype=dtype)
            w2 = torch.empty(E, H, I, device=device, dtype=dtype)
            for e in range(E):
                g, u, d = store.read(layer, e)
                w13[e, :I].copy_(g)
                w13[e, I:].copy_(u)
                w2[e].copy_(d)
            self.w13[layer], self.w2[layer] = w13, w2
        self.grouped = device_path_supported(device, dtype, (I, H))
        self.graph_safe = self.grouped
        self._all = torch.ones(E, dtype=torch.bool, device=device)  # [E]

    def compute(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return run_experts(x, expert_ids, weights, self.w13[layer], self.w2[layer], self.grouped)

    def expert_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.w13, self.w2) for t in d.values())

    def resident_mask(self, layer: int) -> torch.Tensor:
        return self._all
