"""`--split-plan auto`: the end plans its own split from live measurements. At connect it asks the cloud for the
step costs the cloud measured on itself (hello) and times its own layers with its own experts; once the link
monitor has measured the link (MIN_SAMPLES exchanges on the default placement), the scheduler
(split.plan.make_split_plan) picks the cut, the experts an end layer keeps, the codec of each crossing and the
micro-batches, and connect.profile_replanner keeps re-planning when the link or the cloud's load moves.

    moetandem generate --cloud HOST:PORT --token-file TOKEN --split-plan auto --codec plan
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from moetandem.config import SplitConfig
from moetandem.split.costs import StepCosts, measure_step_costs, split_profile
from moetandem.split.link import CloudLink

log = logging.getLogger("moetandem.split")

AUTO = "auto"
#: exchanges the link monitor must have measured before the first plan (its changed() needs as many)
MIN_SAMPLES = 8


def auto_profile(model: Any, provider: Any, ckpt: Any, link: CloudLink, cfg: SplitConfig, expert_bytes: int,
                 concurrency: int = 1) -> Any:
    """The SplitProfile an auto plan is made from, the link left at a placeholder (the re-planner puts the
    measured one in): the end's per-layer costs timed here with its committee, the cloud's from its hello, the end's
    expert budget from its provider (every expert when it holds them all), the calibrated codecs with --codec plan.
    None (logged) when the cloud sent no costs (an older cloud, or none reached yet): the placement stays fixed."""
    cloud = StepCosts.from_meta(link.info or {})
    if cloud is None:
        log.warning("split: --split-plan auto: the cloud sent no step costs (not reached yet, or an older "
                    "moetandem cloud); keeping the default placement")
        return None
    p = next(model.parameters())
    args = model.args
    experts = {layer: provider for layer, moe in enumerate(args.moe_layers) if moe}
    log.info("split: --split-plan auto: timing the end's layers")
    end = measure_step_costs(model, experts, p.device, p.dtype, sizes=(1, 4))
    per_expert = expert_bytes // max(1, len(experts) * args.num_experts)
    budget = int(getattr(provider, "budget_bytes", expert_bytes))
    codecs: dict[int, dict[int, tuple[int, float]]] = {}
    if cfg.codec == "plan":
        from moetandem.split.calibration import cut_codecs
        codecs = cut_codecs(ckpt)
    wire = 2 if cfg.codec in ("fp16", "plan") else torch.finfo(p.dtype).bits // 8
    return split_profile(end, cloud, args, per_expert, budget, 1e9, 0.0, concurrency=concurrency,
                         codecs=codecs, wire_bytes=wire, cloud_head_topk=cfg.cloud_head_topk or 0,
                         cloud_decode_tokens=cfg.cloud_decode_tokens or 0)
