"""`--split-plan auto`: the end plans its own split from live measurements. At connect it times its own layers with
its own experts; the cloud sends the step costs it measured on itself in `hello` (read when the first plan is made,
so a cloud reached only later still counts); once the link monitor has measured the link (MIN_SAMPLES exchanges on
the default placement), the scheduler (split.plan.make_split_plan) picks the cut, the experts an end layer keeps,
the codec of each crossing and the micro-batches, and connect.profile_replanner keeps re-planning when the link or
the cloud's load moves.

    moetandem generate --cloud HOST:PORT --token-file TOKEN --split-plan auto --codec plan
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from moetandem.config import SplitConfig
from moetandem.errors import InvalidRequestError
from moetandem.split.costs import StepCosts, measure_step_costs, split_profile

log = logging.getLogger("moetandem.split")

AUTO = "auto"
#: exchanges the link monitor must have measured before the first plan (its changed() needs as many)
MIN_SAMPLES = 8


class AutoProfile:
    """The end's half of an auto plan's SplitProfile, measured at construction: its per-layer costs timed with its
    committee, its expert budget (every expert's bytes when it holds them all), the calibrated codecs with --codec
    plan. `profile(cloud_meta)` adds the cloud's costs from a hello reply; the link stays a placeholder that the
    re-planner replaces with the measured one."""

    def __init__(self, model: Any, provider: Any, ckpt: Any, cfg: SplitConfig, expert_bytes: int,
                 concurrency: int = 1) -> None:
        if expert_bytes <= 0:
            raise InvalidRequestError(f"--split-plan auto needs the routed experts' bytes, got {expert_bytes}")
        p = next(model.parameters())
        self.args, self.cfg, self.concurrency = model.args, cfg, concurrency
        experts = {layer: provider for layer, moe in enumerate(self.args.moe_layers) if moe}
        log.info("split: --split-plan auto: timing the end's layers")
        self.end = measure_step_costs(model, experts, p.device, p.dtype, sizes=(1, 4))
        self.per_expert = expert_bytes // max(1, len(experts) * self.args.num_experts)
        self.budget = int(getattr(provider, "budget_bytes", expert_bytes))
        self.codecs: dict[int, dict[int, tuple[int, float]]] = {}
        if cfg.codec == "plan":
            from moetandem.split.calibration import cut_codecs
            self.codecs = cut_codecs(ckpt)
        self.wire = 2 if cfg.codec in ("fp16", "plan") else torch.finfo(p.dtype).bits // 8
        self._warned = False

    def profile(self, cloud_meta: dict[str, Any] | None) -> Any:
        """The SplitProfile, or None (warned once) while the cloud has sent no costs (not reached yet, or an
        older moetandem cloud): the placement in force stays."""
        cloud = StepCosts.from_meta(cloud_meta or {})
        if cloud is None:
            if not self._warned:
                log.warning("split: --split-plan auto: the cloud sent no step costs (not reached yet, or an older "
                            "moetandem cloud); keeping the placement in force")
                self._warned = True
            return None
        c = self.cfg
        return split_profile(self.end, cloud, self.args, self.per_expert, self.budget, 1e9, 0.0,
                             concurrency=self.concurrency, codecs=self.codecs, wire_bytes=self.wire,
                             cloud_head_topk=c.cloud_head_topk or 0, cloud_decode_tokens=c.cloud_decode_tokens or 0)
