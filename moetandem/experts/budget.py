"""How many bytes the experts of a checkpoint take, and how many slots per layer a committee's budget holds: the
one place the expert budget is measured against."""
from __future__ import annotations

import torch

from moetandem.errors import InvalidRequestError
from moetandem.experts.store import ExpertStore


def total_expert_bytes(store: ExpertStore, dtype: torch.dtype, row_bytes: int | None = None) -> int:
    """Bytes of every routed expert of every MoE layer, held in `dtype`, or `row_bytes` each (a packed format's)."""
    return (row_bytes or store.expert_bytes(dtype)) * store.num_experts * len(store.layers)


def slot_plan(budget_bytes: int, layers: list[int], num_experts: int, top_k: int, slot_bytes: int,
              tier_bytes: int = 0, tier_fmt: str | None = None) -> dict[int, int]:
    """A committee's slots per MoE layer under `budget_bytes`: as many as fit, the same in every layer, at most
    every expert; refused below one token's experts (top_k per layer). tier_bytes: what a --miss-tier device copy
    (in the format tier_fmt; None: no tier) takes from the budget first."""
    per_layer = max(0, budget_bytes - tier_bytes) // (slot_bytes * len(layers))
    need = top_k * slot_bytes * len(layers)
    if per_layer < top_k:
        tier = (f" after the --miss-tier device copy's {tier_bytes / 2**20:.1f} MiB "
                f"({tier_fmt}, every expert)" if tier_fmt is not None else "")
        raise InvalidRequestError(
            f"expert budget {budget_bytes / 2**20:.1f} MiB{tier} is below one token's experts "
            f"({top_k} per layer × {len(layers)} layers × {slot_bytes / 2**20:.2f} MiB = "
            f"{need / 2**20:.1f} MiB); raise --expert-budget" + (", or use --miss-tier host" if tier else ""))
    return {l: min(num_experts, per_layer) for l in layers}


def check_plan(plan: dict[int, int], budget_bytes: int, slot_bytes: int, tier_bytes: int = 0) -> None:
    """Refuse a slot plan (slots per layer) whose slots, beside a --miss-tier device copy of tier_bytes, need more
    than `budget_bytes`."""
    if sum(plan.values()) * slot_bytes + tier_bytes > budget_bytes:
        tier = f" beside the --miss-tier device copy ({tier_bytes / 2**20:.1f} MiB)" if tier_bytes else ""
        raise InvalidRequestError(f"the slot plan needs more bytes than the expert budget{tier}")
