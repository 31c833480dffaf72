"""--miss-tier device: a --miss-format copy of every expert beside the slots, inside the budget. On the CPU the
"device" is host memory and the fused op runs its reference, so the same code path runs here as on a GPU."""
from __future__ import annotations

import argparse

import pytest
import torch

import moetandem
from conftest import build_checkpoint
from moetandem import InvalidRequestError
from moetandem.cli.flags import add_committee_args
from moetandem.config import CommitteeConfig
from moetandem.experts.committee import CommitteeProvider
from moetandem.experts.formats import ExpertFormat
from moetandem.experts.policies import MissPolicy

READ_ALL = MissPolicy(substitute_min_sim=None, graph=True)  # balanced's graph rule without skips: misses are read


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint("mixtral", tmp_path_factory.mktemp("mixtral"))


@pytest.fixture(scope="module")
def eng(ckpt):
    return moetandem.load(ckpt, device="cpu", progress=False)  # every expert resident: the reference


def committee(eng, budget: int, tier: str, slots: dict[int, int] | None = None, fmt: str = "int4"):
    st = eng.store
    miss = ExpertFormat(fmt, st.inter, st.hidden, eng.dtype)
    return CommitteeProvider(st, eng.device, eng.dtype, budget, READ_ALL, eng.args.top_k, slots=slots,
                             progress=False, miss_fmt=miss, async_swaps=False, miss_tier=tier)


def routing(eng, t: int = 6):
    torch.manual_seed(0)
    x = torch.randn(t, eng.store.hidden)
    ids = torch.stack([torch.randperm(eng.store.num_experts)[:eng.args.top_k] for _ in range(t)])
    return x, ids, torch.softmax(torch.randn(t, eng.args.top_k), -1)


def test_the_tier_counts_in_the_budget_and_the_slots_get_the_rest(eng):
    st = eng.store
    size, L = st.expert_bytes(eng.dtype), len(st.layers)
    tier_bytes = L * st.num_experts * ExpertFormat("int4", st.inter, st.hidden, eng.dtype).nbytes
    budget = tier_bytes + 3 * size * L + size // 2
    c = committee(eng, budget, "device")
    assert c.tier_bytes == tier_bytes
    assert all(s.n == 3 for s in c.layers.values())  # (budget - tier) // (size * L)
    assert c.expert_bytes() <= budget and c.expert_bytes() == tier_bytes + 3 * size * L
    with pytest.raises(InvalidRequestError, match="after the --miss-tier device copy.*or use --miss-tier host"):
        committee(eng, tier_bytes + size * L, "device")  # one slot per layer: below top-2


def test_device_tier_reads_the_same_copy_as_the_host_mapped_one_and_nothing_crosses_the_bus(eng, monkeypatch):
    """Same slots, same int4 copy: the tier's output equals the host-mapped misses' output exactly; both are int4
    close to every expert resident; the tier counts its reads but no bus bytes."""
    monkeypatch.setattr("moetandem.experts.committee.maps_experts", lambda *a: True)  # host mapping on the CPU
    layer = eng.store.layers[0]
    slots = {l: 2 for l in eng.store.layers}
    big = 10 * eng.store.expert_bytes(eng.dtype) * eng.store.num_experts * len(eng.store.layers)
    x, ids, w = routing(eng)
    out, stats = {}, {}
    for tier in ("host", "device"):
        c = committee(eng, big, tier, slots)
        c.grouped = True
        out[tier] = c.compute(layer, x, ids, w)
        stats[tier] = c.stats
        assert c.mapped[layer].shape[0] == eng.store.num_experts
    assert torch.equal(out["host"], out["device"])
    assert stats["device"].miss_reads == stats["host"].miss_reads > 0
    assert stats["device"].miss_bytes == 0 < stats["host"].miss_bytes
    want = eng.provider.compute(layer, x, ids, w)
    err = float((out["device"] - want).norm() / want.norm())
    assert 0 < err < 0.2, err  # int4 of a tiny random expert: ~0.1 relative


def test_generate_through_the_loader_honours_the_budget(ckpt):
    e = moetandem.load(ckpt, device="cpu", dtype="bfloat16", progress=False, expert_budget=0.75,
                       fidelity="balanced", miss_format="int4", miss_tier="device", async_swaps=False)
    out = e.generate([[1, 2, 3, 4]], max_new_tokens=8, stop_on_eos=False)
    assert len(out[0].token_ids) == 8
    c = e.provider
    assert c.tier and c.expert_bytes() <= c.budget_bytes
    s = c.stats
    assert s.hits + s.misses > 0 and s.miss_bytes == 0


@pytest.mark.parametrize("kw,match", [({}, "choose its format with --miss-format int4"),
                                      ({"miss_format": "int4", "miss_compute": "host"}, "--miss-compute host"),
                                      ({"miss_format": "int4", "fidelity": "exact"}, "fidelity exact never allows"),
                                      ({"miss_format": "int4", "miss_tier": "gpu"}, "choose one of host, device")])
def test_refusals_are_actionable(kw, match):
    kw = {"miss_tier": "device", **kw}
    with pytest.raises(InvalidRequestError, match=match):
        CommitteeConfig(budget=0.5, **kw)


def test_flag_reaches_the_config():
    p = argparse.ArgumentParser()
    add_committee_args(p)
    ns = p.parse_args(["--expert-budget", "0.5", "--miss-format", "int4", "--miss-tier", "device"])
    assert CommitteeConfig.from_args(ns).miss_tier == "device"
    assert CommitteeConfig.from_args(p.parse_args(["--expert-budget", "0.5"])).miss_tier == "host"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_committee_with_the_device_tier_matches_host_int4_misses_gpu(ckpt):
    """CUDA: the captured decode step reads the int4 copy from GPU memory (slot ids n + e into a device buffer)
    and predicts what the host-mapped int4 misses predict, with fewer bf16 slots; the copy and the slots stay
    within the budget on the device, and no miss byte crosses the bus."""
    from moetandem.analysis.eval import evaluate_ids
    kw = dict(device="cuda", dtype="bfloat16", progress=False, expert_budget=0.75, fidelity="balanced",
              async_swaps=False, miss_format="int4")
    tier = moetandem.load(ckpt, miss_tier="device", **kw)
    c = tier.provider
    assert c.tier and next(iter(c.mapped.values())).is_cuda and c.expert_bytes() <= c.budget_bytes
    swaps_from = next(iter(c.copies.mapped.values()))  # swaps copy bf16 rows pinned once, on the host
    assert swaps_from.is_pinned() and swaps_from.dtype == torch.bfloat16
    host = moetandem.load(ckpt, **kw)
    ids = list(range(1, 97))
    q = evaluate_ids(tier, ids, context=48, step=1, reference=host, progress=False)
    assert q.top1_agreement >= 0.9, q.top1_agreement
    st = tier.expert_stats()
    assert st["miss_reads"] > 0 and st["miss_bytes"] == 0


def test_bus_hint_names_the_tier_only_for_low_hit_rates_with_bus_reads():
    from moetandem.experts.stats import CommitteeStats, bus_hint
    low = CommitteeStats(hits=300, misses=700, miss_reads=650, miss_bytes=650 * 6 << 20)
    hint = bus_hint(low, approximate=True)
    assert hint is not None and "hit rate 0.30" in hint and "--miss-tier device" in hint and "3.8 GiB" in hint
    assert "--fidelity balanced" in bus_hint(low, approximate=False)  # exact: the tier needs an approximate policy
    assert bus_hint(CommitteeStats(hits=900, misses=100, miss_reads=100, miss_bytes=1 << 30), True) is None
    assert bus_hint(CommitteeStats(hits=30, misses=70, miss_reads=70, miss_bytes=1 << 30), True) is None  # too few
    assert bus_hint(CommitteeStats(hits=300, misses=700, miss_reads=700), True) is None  # nothing over the bus


def test_no_bus_hint_on_the_cpu_or_all_resident(ckpt, eng):
    from moetandem.experts.stats import provider_hint
    assert provider_hint(eng.provider, torch.device("cuda")) is None  # every expert resident: no committee
    c = moetandem.load(ckpt, device="cpu", progress=False, expert_budget=0.3, fidelity="balanced")
    c.generate([[1, 2, 3]], max_new_tokens=8)
    assert provider_hint(c.provider, c.device) is None  # the CPU has no host bus to spare


def test_tuning_key_tells_the_tier_from_misses_over_the_bus() -> None:
    """The fused kernel's tuned config is cached per call shape; misses read over the bus tie every config at the
    bus's speed, so the same copies in device memory (the tier) need a key of their own (bench/zero_copy.py: a
    config tuned over the bus was 1.7x slower than the best on gpt-oss int8 in HBM)."""
    import importlib
    fm = importlib.import_module("moetandem.kernels.fused_moe")
    H, I, E, k = 64, 32, 8, 2
    x = torch.zeros(1, H, dtype=torch.bfloat16)
    ids = torch.zeros(1, k, dtype=torch.long)
    w13 = torch.zeros(2, 2 * I, H, dtype=torch.bfloat16)
    on_host = (torch.zeros(E, 2 * I, H, dtype=torch.bfloat16), torch.zeros(E, H, I, dtype=torch.bfloat16))
    on_device = tuple(t.to("meta") for t in on_host)  # any non-host memory: the tier's copy
    keys = {where: fm.config_key(x, ids, w13, host, "bf16", None) for where, host in
            (("none", None), ("host", on_host), ("device", on_device))}
    assert len(set(keys.values())) == 3, keys
    assert keys["device"].endswith(",tier") or ",tier," in keys["device"]
    assert ",tier" not in keys["host"] and ",tier" not in keys["none"]
