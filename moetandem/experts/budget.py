"""How many bytes the experts of a checkpoint take: the one place the expert budget is measured against."""
from __future__ import annotations

import torch

from moetandem.experts.store import ExpertStore


def total_expert_bytes(store: ExpertStore, dtype: torch.dtype) -> int:
    """Bytes of every routed expert of every MoE layer, held in `dtype`."""
    return store.expert_bytes(dtype) * store.num_experts * len(store.layers)
