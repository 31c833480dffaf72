"""How many bytes the experts of a checkpoint take: the one place the expert budget is measured against."""
from __future__ import annotations

import torch

from moetandem.experts.store import ExpertStore


def total_expert_bytes(store: ExpertStore, dtype: torch.dtype, row_bytes: int | None = None) -> int:
    """Bytes of every routed expert of every MoE layer, held in `dtype`, or `row_bytes` each (a packed format's)."""
    return (row_bytes or store.expert_bytes(dtype)) * store.num_experts * len(store.layers)
