"""Choose and build the ExpertProvider from a CommitteeConfig (--expert-budget, --policy, --fidelity)."""
from __future__ import annotations

from dataclasses import replace

import torch

from moetandem.checkpoint import Checkpoint
from moetandem.config import CommitteeConfig, parse_budget
from moetandem.errors import InvalidRequestError
from moetandem.experts.budget import total_expert_bytes
from moetandem.experts.committee import CommitteeProvider
from moetandem.experts.formats import ExpertFormat
from moetandem.experts.plan import Plan
from moetandem.experts.policies import MissPolicy
from moetandem.experts.provider import ExpertProvider
from moetandem.experts.resident import ResidentProvider
from moetandem.experts.similarity import load_calibration, save_calibration, weight_calibration
from moetandem.experts.store import ExpertStore

def build_provider(ckpt: Checkpoint, store: ExpertStore, top_k: int, device: torch.device, dtype: torch.dtype,
                   cfg: CommitteeConfig, progress: bool = True, fmt: ExpertFormat | None = None) -> ExpertProvider:
    """All experts resident (no budget), or a Parameter Committee within cfg.budget; experts held in `fmt`
    (default bf16). A fractional budget is a fraction of the experts' bf16 (compute-dtype) bytes, so at the same
    --expert-budget a packed format holds more experts."""
    expert_budget, policy, refresh_every = cfg.budget, cfg.policy, cfg.refresh_every
    plan = cfg.plan
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
        return ResidentProvider(store, device, dtype, progress, activation=store.activation, fmt=fmt)
    budget = parse_budget(expert_budget, total_expert_bytes(store, dtype))
    if cfg.miss_format != "bf16" and fmt is not None and not fmt.dense:
        raise InvalidRequestError(f"--miss-format {cfg.miss_format} needs bf16 experts, but they are held in "
                                  f"{fmt.name}; use --expert-format bf16, or drop --miss-format (a packed format's "
                                  "misses already move its smaller bytes)")
    if (fmt is not None and not fmt.dense and policy is None and plan is None
            and budget >= total_expert_bytes(store, dtype, fmt.nbytes)):
        # every expert of the format fits the budget (int4 at 30% of the bf16 bytes): all resident, no committee
        return ResidentProvider(store, device, dtype, progress, activation=store.activation, fmt=fmt)
    tau = cfg.skip_threshold
    miss = MissPolicy.named(policy, 0.1 if tau is None else tau) if policy else MissPolicy.from_fidelity(cfg.fidelity)
    if tau is not None and policy not in ("static", "skip"):
        miss = replace(miss, skip_below=tau)
    if cfg.miss_reads is not None:
        miss = replace(miss, max_reads=cfg.miss_reads)
    calib = load_calibration(ckpt)
    if calib is None and miss.substitute_min_sim is not None:
        calib = weight_calibration(store, progress)
        save_calibration(ckpt, *calib, source="weights")
    sim, norms = calib if calib is not None else (None, None)
    miss_fmt = None if cfg.miss_format == "bf16" else ExpertFormat(
        cfg.miss_format, store.inter, store.hidden, dtype, bias=store.activation.bias, gated=store.activation.gated)
    return CommitteeProvider(store, device, dtype, int(budget), miss, top_k, similarity=sim, norms=norms,
                             slots=slots, refresh_every=refresh_every, window=cfg.window, score=cfg.score,
                             progress=progress, async_swaps=cfg.async_swaps, activation=store.activation, fmt=fmt,
                             miss_fmt=miss_fmt, miss_compute=cfg.miss_compute, miss_tier=cfg.miss_tier,
                             swap_margin=cfg.resolved_swap_margin)
