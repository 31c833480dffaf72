"""All experts resident on the compute device: the provider of the engine foundation."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from moetandem.experts.provider import ExpertProvider, combine, group_by_expert
from moetandem.experts.store import ExpertStore
from moetandem.models.layers import expert_ffn

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, dims: tuple[int, ...]) -> bool:
    """CUDA grouped GEMM (sm80+) wants bf16 and 16-byte aligned rows."""
    return (_grouped_mm is not None and device.type == "cuda" and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(device)[0] >= 8 and all(d % 8 == 0 for d in dims))


def run_experts(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                w2: torch.Tensor, grouped: bool) -> torch.Tensor:
    """Σ_k w·E(x) with stacked weights w13 [E, 2I, H], w2 [E, H, I]; each expert runs once on all its rows."""
    E, I2, _ = w13.shape
    I = I2 // 2
    groups = group_by_expert(expert_ids, E)
    xs = x[groups.token]  # [T*k, H] rows sorted by expert
    if grouped:  # one launch per matrix for all experts, no host sync
        offs = groups.counts.cumsum(0, dtype=torch.int32)
        h = _grouped_mm(xs, w13.transpose(1, 2), offs=offs)  # [T*k, 2I]
        ys = _grouped_mm(F.silu(h[:, :I]) * h[:, I:], w2.transpose(1, 2), offs=offs)  # [T*k, H]
    else:
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(groups.counts.tolist()):
            if n:
                ys[start:start + n] = expert_ffn(xs[start:start + n], w13[e], w2[e])
                start += n
    return combine(ys, groups, weights)


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
        self.grouped = grouped_mm_supported(device, dtype, (I, H))
        self.graph_safe = self.grouped

    def compute(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return run_experts(x, expert_ids, weights, self.w13[layer], self.w2[layer], self.grouped)

    def expert_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.w13, self.w2) for t in d.values())
