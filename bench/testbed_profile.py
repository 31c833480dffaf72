"""The test bed's measured SplitProfile (bench/testbed.py): the end's and the cloud's per-layer costs calibrated to
this run's baselines, the link from the LinkMonitor, the end's routing on the run's prompts, the codecs from the
calibration file."""
from __future__ import annotations

from typing import Any

from bench.split import prompts_for
from bench.testbed_report import END_HEAD


def measured_profile(end_costs: Any, ada: Any, base: dict[str, dict], budget: float, conc: int,
                     overlap: bool = True, head_topk: int = 0, decode_tokens: int = 0,
                     routing_freq: list[list[float]] | None = None) -> Any:
    """The SplitProfile the adaptive plan is made from, all of it measured in this run: the end's and the cloud's
    per-layer fixed + per-token costs (split.costs: the end timed here, the cloud timed by itself and sent in
    hello), calibrated to the baselines' decode steps at batch 1 and at `conc` (the end to end-only; the cloud
    to cloud-only less the end's head and the link), the link from the LinkMonitor, the codecs' bytes and
    quality from the calibration file, the memory from the budget. overlap=False: end and cloud share the cores
    (a CPU cloud on this machine), so micro-batches overlap only the link. head_topk K > 0: the plan may have the
    cloud run the LM head (the cloud is calibrated to the cloud-only run with the head on the end); decode_tokens
    k > 0: cloud-only with the head in the cloud may decode k tokens per exchange. routing_freq [L][E]: the end's
    measured routing (Trace.frequencies; None: uniform), from which the plan picks the experts an end layer keeps."""
    from moetandem.split.calibration import cut_codecs
    from moetandem.split.costs import ROW_BYTES, StepCosts, frame_overhead_bytes, split_profile
    ar, mon, L = ada.args, ada.split.link.monitor, ada.args.num_layers
    bw = mon.bandwidth_bps if mon.bandwidth_bps != float("inf") else 1e9
    rtt = mon.rtt_s

    def steps(c: str) -> list[tuple[float, float]]:
        return [(1.0, base[c]["lat_p50_ms"] / 1e3), (float(conc), base[c]["step_ms"][str(conc)] / 1e3)]
    end = end_costs.calibrated([(s, max(t, end_costs.step_s(range(L), s))) for s, t in steps("end-only")])
    cloud_raw = StepCosts.from_meta(ada.split.link.info)
    if cloud_raw is None:
        raise SystemExit("the cloud sent no step costs in hello (an older moetandem cloud?)")
    H, fb = ar.hidden_size, frame_overhead_bytes()
    raw_down = H * 4  # cloud-only runs codec "off": float32 hidden states down

    # the cloud's costs are measured under the load the cloud-only runs met (the other ends' exchanges queued
    # with ours): the profile holds them per unit of load, with that load as its queue depth, so the plan predicts
    # the measured step and the re-planner scales it by the live load over it, not by the live load again
    src = END_HEAD if head_topk and not decode_tokens else "cloud-only"  # the run the cloud is calibrated to
    q, replicas = base[src].get("cloud_queue", 0.0), base[src].get("cloud_replicas", 1)
    load = 1.0 + q / replicas

    def cloud_part(s: float, t: float) -> float:
        link = rtt + (2 * fb + s * (4 + ROW_BYTES + raw_down)) / bw
        end_head = end.step_fixed_s + end.head_fixed_s + s * end.head_token_s
        return max(0.2 * cloud_raw.step_s(range(L), s, head=False), t - link - end_head) / load
    def cloud_part_k(s: float, t: float) -> float:
        over = end.step_fixed_s + end.head_fixed_s
        floor = 0.2 * cloud_raw.step_s(range(L), s)
        return k_token_cloud_step(t, rtt, bw, 2 * fb, decode_tokens, over, floor) / load
    if decode_tokens and head_topk:
        cloud = cloud_raw.calibrated([(s, cloud_part_k(s, t)) for s, t in steps(src)])
    else:
        cloud = cloud_raw.calibrated([(s, cloud_part(s, t)) for s, t in steps(src)], head=False)
    eb = ada.store.expert_bytes(ada.dtype)
    return split_profile(end, cloud, ar, eb, int(budget * L * ar.num_experts * eb), bw, rtt,
                         concurrency=conc, codecs=cut_codecs(ada.store.ckpt), overlap=overlap,
                         cloud_head_topk=head_topk, cloud_decode_tokens=decode_tokens, cloud_queue_depth=q,
                         cloud_replicas=replicas, routing_freq=routing_freq)


def k_token_cloud_step(t: float, rtt: float, bw: float, frame_bytes: int, k: int, end_overhead: float,
                       floor: float) -> float:
    """The cloud's step in a k-token cloud-only run from its measured per-token time t, which is (the end's
    overhead + the link's RTT and bytes + k cloud steps) / k (split/plan.py), at least `floor`. Calibrating the
    cloud to this run keeps the end's contended head (in the END_HEAD run) out of the cloud's costs, which the k-token
    plan multiplies by k: the tenth session's 50 ms test bed predicted 41 tok/s for a plan that ran 168-212."""
    from moetandem.split.plan_cost import DECODE_TOKEN_BYTES, DECODE_UP_BYTES
    link = rtt + (frame_bytes + DECODE_UP_BYTES + DECODE_TOKEN_BYTES * (k + 1)) / bw
    return max(floor, t - (link + end_overhead) / k)


def prompt_ids(eng: Any) -> list[int]:
    """The run's prompts as one stream of token ids (what the end's routing is measured on)."""
    ps = prompts_for(eng)
    return [t for p in ps for t in (p if isinstance(p, list) else eng.tokenizer(p, verbose=False)["input_ids"])]
