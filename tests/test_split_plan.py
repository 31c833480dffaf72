"""The route-aware scheduler on synthetic profiles: it picks the placement the cost model says it should."""
from __future__ import annotations

import dataclasses

import pytest

from moetandem.errors import InvalidRequestError
from moetandem.split.plan import SplitProfile, make_split_plan, should_replan

L, E, K, H = 6, 16, 2, 256
EXPERT = 3 * 160 * 256 * 2  # demo expert, bf16


def zipf_freq(shift: int) -> list[float]:
    """Routing frequencies (sum K) with one hot expert per layer at a different place."""
    w = [1.0 / (1 + ((e - shift) % E)) ** 1.2 for e in range(E)]
    return [min(0.95, K * x / sum(w)) for x in w]


def profile(**kw: object) -> SplitProfile:
    base = dict(num_layers=L, num_experts=E, top_k=K, hidden_size=H, end_layer_s=[1e-4] * L,
                cloud_layer_s=[2e-5] * L, end_expert_s=5e-5, cloud_expert_s=1e-5, expert_bytes=EXPERT,
                end_expert_budget=EXPERT * E * L, routing_freq=[zipf_freq(3 * l) for l in range(L)],
                bandwidth_bps=12.5e6, rtt_s=0.01, codec_bytes={32: 34, 128: 130},
                codec_quality={32: 0.7, 128: 0.004}, end_head_s=1e-4, cloud_head_s=2e-5)
    base.update(kw)
    return SplitProfile(**base)  # type: ignore[arg-type]


def test_slow_link_keeps_everything_on_the_end() -> None:
    plan = make_split_plan(profile(bandwidth_bps=125e3, rtt_s=0.1))  # 1 Mbit/s, 100 ms
    assert plan.mode == "end-only" and plan.end_layers_head == L and plan.cloud_experts == {}
    assert plan.round_trips_per_step == 0 and plan.predicted_bytes_per_token == 0


def test_fast_link_and_weak_end_go_to_the_cloud() -> None:
    slow_end = dict(end_layer_s=[2e-3] * L, end_expert_s=1e-3, end_head_s=2e-3)
    fast = make_split_plan(profile(bandwidth_bps=125e6, rtt_s=0.001, **slow_end))
    slow = make_split_plan(profile(bandwidth_bps=125e3, rtt_s=0.1, **slow_end))
    assert len(fast.cloud_layers) == L and fast.mode == "cloud-only"
    # at 1 Gbit/s the codec's saving is inside PREFER_BASELINE: the cloud-only baseline (fp16 down) itself
    assert fast.label == "cloud-only" and fast.codec_rank_down is None
    # at 10 Mbit/s it pays: token ids up, the last hidden states down (the end runs norm + lm_head) at the best rank
    # within the bound
    mid = make_split_plan(profile(bandwidth_bps=1.25e6, rtt_s=0.001, **slow_end))
    assert mid.mode == "cloud-only" and mid.predicted_bytes_per_token == 4 + 130 and mid.codec_rank_down == 128
    assert len(slow.cloud_layers) <= len(fast.cloud_layers)
    assert slow.round_trips_per_step <= fast.round_trips_per_step


def test_tiny_end_memory_keeps_hot_experts_on_the_end() -> None:
    # the cloud is busy with its own layers (attention slow there), so layers stay on the end; experts do not fit
    p = profile(end_expert_budget=EXPERT * 24, cloud_layer_s=[5e-3] * L, rtt_s=0.001, bandwidth_bps=125e6,
                end_miss_s=5e-3)  # a committee miss reads the expert from a slow disk
    plan = make_split_plan(p)
    assert plan.end_layers_head + plan.end_layers_tail == L
    on_end = {l: sorted(set(range(E)) - set(plan.cloud_experts.get(l, []))) for l in range(L)}
    assert sum(len(v) for v in on_end.values()) <= 24 and plan.cloud_experts
    for l in range(L):
        f = p.routing_freq[l]
        if on_end[l] and plan.cloud_experts.get(l):  # every end expert is at least as hot as every cloud one
            assert min(f[e] for e in on_end[l]) >= max(f[e] for e in plan.cloud_experts[l])
    hottest = max(range(E), key=lambda e: p.routing_freq[0][e])
    assert hottest in on_end[0]


def test_throughput_uses_micro_batches() -> None:
    p = profile(concurrency=32, rtt_s=0.04, end_step_overhead_s=2e-4, cloud_step_overhead_s=2e-4,
                end_layer_s=[1e-3] * L, end_expert_s=5e-4)
    thr = make_split_plan(p, "throughput")
    lat = make_split_plan(p, "latency")
    assert thr.micro_batches > 1 and lat.micro_batches == 1
    assert thr.predicted_throughput_tok_s >= lat.predicted_throughput_tok_s


def test_codec_rank_respects_the_quality_bound() -> None:
    p = profile(bandwidth_bps=1e6, rtt_s=0.001, end_layer_s=[1e-4, 1e-4, 5e-3, 5e-3, 1e-4, 1e-4],
                cloud_layer_s=[1e-3, 1e-3, 2e-5, 2e-5, 1e-3, 1e-3])  # middle layers want the cloud
    plan = make_split_plan(p)
    assert plan.mode == "split" and plan.codec_rank == 128  # r32 breaks the 1% bound, fp16 costs more bytes
    assert plan.predicted_ppl_increase <= p.max_ppl_increase
    strict = make_split_plan(dataclasses.replace(p, max_ppl_increase=0.001))
    assert strict.codec_rank is None


def test_no_cloud_means_end_only() -> None:
    plan = make_split_plan(profile(cloud_available=False))
    assert plan.mode == "end-only" and "end-only" in plan.describe()


def test_should_replan() -> None:
    p = profile()
    assert should_replan(p, dataclasses.replace(p, bandwidth_bps=p.bandwidth_bps / 2))
    assert should_replan(p, dataclasses.replace(p, bandwidth_bps=p.bandwidth_bps * 2.5))
    assert not should_replan(p, dataclasses.replace(p, bandwidth_bps=p.bandwidth_bps * 1.1))
    assert not should_replan(p, dataclasses.replace(p, rtt_s=p.rtt_s * 0.9))
    assert should_replan(p, dataclasses.replace(p, cloud_layer_s=[x * 3 for x in p.cloud_layer_s]))
    assert should_replan(p, dataclasses.replace(p, cloud_available=False))


def test_bad_profiles_are_refused() -> None:
    with pytest.raises(InvalidRequestError, match="routing_freq"):
        profile(routing_freq=[[0.1] * E])
    with pytest.raises(InvalidRequestError, match="bandwidth"):
        profile(bandwidth_bps=0)
    with pytest.raises(InvalidRequestError, match="objective"):
        make_split_plan(profile(), "fastest")
