"""Connecting an end to the cloud: the placement (which layers and experts run where), a pre-flight check that the
cloud accepts us, the SplitModel over a built model, and a re-planner from the link's live measurements."""
from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moetandem.config import SplitConfig
from moetandem.errors import CloudError, InvalidRequestError
from moetandem.graphs import PieceGraphs
from moetandem.split.auto import AUTO, MIN_SAMPLES, AutoProfile
from moetandem.split.end import SplitModel
from moetandem.split.link import CloudLink, CloudRefused, LinkOptions
from moetandem.split.transport.auth import read_token

log = logging.getLogger("moetandem.split")


@dataclass
class Placement:
    """Where things run: layers [0, head) and [L - tail, L) on the end, the rest in the cloud; in end layers,
    cloud_experts[layer] are computed in the cloud. Duck-compatible with split.plan.SplitPlan."""
    end_layers_head: int = 1
    end_layers_tail: int = 1
    cloud_experts: dict[int, list[int]] | None = None
    codec_rank: int | None = None  # codec "plan": low-rank rank of the up crossing (None: fp16)
    micro_batches: int = 2
    codec_rank_down: int | None = None  # codec "plan": the down crossing's rank (None: fp16)


def load_placement(plan: Any = None, head: int | None = None, tail: int | None = None,
                   cloud_experts: dict[int, list[int]] | None = None, codec_rank: int | None = None,
                   micro_batches: int | None = None) -> Any:
    """A plan object (split.plan.SplitPlan or Placement), a JSON file of Placement's fields, or the defaults;
    explicit arguments override the plan's fields."""
    if isinstance(plan, (str, Path)):
        try:
            raw = json.loads(Path(plan).read_text())
            plan = Placement(**{k: raw[k] for k in Placement.__dataclass_fields__ if k in raw})
        except (OSError, ValueError, TypeError) as e:
            raise InvalidRequestError(f"cannot read the split plan {plan}: {e}") from None
        plan.cloud_experts = {int(k): [int(e) for e in v] for k, v in (plan.cloud_experts or {}).items()}
    plan = copy.copy(plan) if plan is not None else Placement()
    for field, value in (("end_layers_head", head), ("end_layers_tail", tail), ("cloud_experts", cloud_experts),
                         ("codec_rank", codec_rank), ("micro_batches", micro_batches)):
        if value is not None:
            setattr(plan, field, value)
    return plan


def _connect(link: CloudLink, when_down: str) -> None:
    """Open the link now: CloudRefused (a configuration error: token, checkpoint, TLS) propagates; an outage is
    logged and left to the link's background probing."""
    try:
        link.connect()
    except CloudRefused:
        raise
    except CloudError as e:
        log.warning("split: cloud unavailable at start (%s); %s", e, when_down)


def _link(ckpt: Any, cfg: SplitConfig, request_costs: bool = False) -> CloudLink:
    token = cfg.token if cfg.token is not None else read_token(cfg.token_file)
    opts = {**cfg.link, "request_costs": True} if request_costs else cfg.link
    return CloudLink(LinkOptions(cfg.address, token, **opts), ckpt.fingerprint())


def preflight(ckpt: Any, cfg: SplitConfig) -> None:
    """Check, before any weights load, that the cloud accepts us: CloudRefused (exit 2) on a wrong token, another
    checkpoint or a TLS misconfiguration; a cloud that cannot be reached now is fine (the end starts alone)."""
    link = _link(ckpt, cfg)
    try:
        _connect(link, "the end will compute alone until it answers")
    finally:
        link.close()


def connect_split(model: Any, provider: Any, ckpt: Any, cfg: SplitConfig, pieces: PieceGraphs | None = None,
                  expert_bytes: int = 0) -> SplitModel:
    """The end side of split execution over `model` (layers [0, head) and [L - tail, L) stay here) with the cloud
    at cfg.address. The end keeps its checkpoint and committee (`provider`) for its own layers and for fallback.
    A cloud that refuses us (token, checkpoint) raises CloudError; one that cannot be reached now is retried
    later (the end computes alone meanwhile). cfg.plan "auto": the end plans its split from live measurements
    (split/auto.py; expert_bytes: all routed experts' bytes in the end's format, for the profile)."""
    auto = cfg.plan == AUTO
    link = _link(ckpt, cfg, request_costs=auto)
    placement = load_placement(None if auto else cfg.plan, cfg.head, cfg.tail, cfg.cloud_experts, cfg.codec_rank,
                               cfg.micro_batches)
    split = SplitModel(model, link, placement, cfg.codec, ckpt, provider, pieces, cfg.cloud_head_topk or 0,
                       cfg.cloud_decode_tokens or 0)
    _connect(link, "computing on the end until it answers")
    if auto:  # the first plan once the link is measured, then re-plans as it and the cloud's load move
        split.replanner = auto_replanner(AutoProfile(model, provider, ckpt, cfg, expert_bytes), link)
        split.plan_after_samples = MIN_SAMPLES
    return split


def auto_replanner(auto: AutoProfile, link: CloudLink, objective: str = "latency") -> Callable[[Any], Any]:
    """A SplitModel.replanner for --split-plan auto: profile_replanner on the auto profile, made at the first
    call from the cloud's costs in its latest hello (None until the cloud has sent them)."""
    state: dict[str, Callable[[Any], Any]] = {}

    def replan(monitor: Any) -> Any:
        if "replan" not in state:
            profile = auto.profile(link.info)
            if profile is None:
                return None
            state["replan"] = profile_replanner(profile, objective)
        return state["replan"](monitor)
    return replan


def profile_replanner(profile: Any, objective: str = "latency", current: Any = None, min_gain: float = 0.1
                      ) -> Callable[[Any], Any]:
    """A SplitModel.replanner: split.plan.make_split_plan on `profile` (a SplitProfile) with the link's measured
    bandwidth and RTT and the cloud's reported load (the monitor's smoothed queue depth and replica count: a
    loaded cloud pushes the plan toward the end, an idle one back). A new plan is returned only when it is
    predicted at least `min_gain` better than the plan in force (`current`, then the last one returned) under the
    new link and load: a noisy reading of the same link does not make the end re-allocate its cloud caches back
    and forth."""
    from dataclasses import replace

    from moetandem.split.plan import make_split_plan, predict
    state = {"plan": current}

    def better(new: Any, old: Any) -> bool:
        if objective == "latency":
            return new.predicted_latency_s * (1 + min_gain) < old.predicted_latency_s
        return new.predicted_throughput_tok_s > old.predicted_throughput_tok_s * (1 + min_gain)

    def replan(monitor: Any) -> Any:
        bw = monitor.bandwidth_bps if monitor.bandwidth_bps != float("inf") else profile.bandwidth_bps
        prof = replace(profile, bandwidth_bps=bw, rtt_s=monitor.rtt_s,
                       cloud_queue_depth=getattr(monitor, "cloud_queue_depth", profile.cloud_queue_depth),
                       cloud_replicas=getattr(monitor, "cloud_replicas", profile.cloud_replicas))
        new = make_split_plan(prof, objective)
        old = state["plan"]
        if old is not None and not better(new, predict(prof, old, objective)):
            return None
        state["plan"] = new
        return new
    return replan
