"""Choose and build the ExpertProvider from user options (--expert-budget, --policy, --fidelity)."""
from __future__ import annotations

import re
from dataclasses import replace

import torch

from moetandem.checkpoint import Checkpoint
from moetandem.errors import InvalidRequestError
from moetandem.experts.committee import CommitteeProvider
from moetandem.experts.plan import Plan
from moetandem.experts.policies import MissPolicy
from moetandem.experts.provider import ExpertProvider
from moetandem.experts.resident import ResidentProvider
from moetandem.experts.similarity import load_calibration, save_calibration, weight_calibration
from moetandem.experts.store import ExpertStore

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_budget(budget: str | int | float, total_bytes: int) -> int:
    """'6GiB', '512MB', 123456 (bytes) or a fraction of all expert bytes ('0.5', 0.5)."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        return int(budget * total_bytes) if 0 < budget <= 1 and isinstance(budget, float) else int(budget)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(budget))
    if not m or m.group(2).lower() not in _UNITS:
        raise InvalidRequestError(f"cannot read expert budget {budget!r}; use bytes like 6GiB / 512MB or a "
                                  "fraction of all expert bytes like 0.5")
    value, unit = float(m.group(1)), m.group(2).lower()
    if not unit and value <= 1:
        return int(value * total_bytes)
    return int(value * _UNITS[unit])


def build_provider(ckpt: Checkpoint, store: ExpertStore, top_k: int, device: torch.device, dtype: torch.dtype,
                   expert_budget: str | int | float | None = None, policy: str | None = None,
                   fidelity: str = "balanced", skip_threshold: float | None = None, refresh_every: int = 16,
                   window: int = 256, score: str = "importance", plan: str | Plan | None = None,
                   progress: bool = True, async_swaps: bool = True) -> ExpertProvider:
    slots = None
    if plan is not None:
        plan = plan if isinstance(plan, Plan) else Plan.load(plan)
        slots, refresh_every = plan.slots, plan.refresh_every
        expert_budget = expert_budget or plan.budget_bytes
        if set(slots) != set(store.layers):
            raise InvalidRequestError("the plan was made for another model (its MoE layers differ)")
    if expert_budget is None:
        if policy is not None:
            raise InvalidRequestError("--policy needs --expert-budget (with no budget every expert is resident)")
        return ResidentProvider(store, device, dtype, progress)
    total = store.expert_bytes(dtype) * store.num_experts * len(store.layers)
    budget = parse_budget(expert_budget, total)
    miss = MissPolicy.named(policy, skip_threshold or 0.1) if policy else MissPolicy.from_fidelity(fidelity)
    if skip_threshold is not None and policy not in ("static", "skip"):
        miss = replace(miss, skip_below=skip_threshold)
    calib = load_calibration(ckpt)
    if calib is None and miss.substitute_min_sim is not None:
        calib = weight_calibration(store, progress)
        save_calibration(ckpt, *calib, source="weights")
    sim, norms = calib if calib is not None else (None, None)
    return CommitteeProvider(store, device, dtype, min(budget, total), miss, top_k, similarity=sim, norms=norms,
                             slots=slots, refresh_every=refresh_every, window=window, score=score,
                             progress=progress, async_swaps=async_swaps)
