"""Parameter Committee on CPU: exactness, budgets, refresh, substitution, skipping, run-time resizing."""
from __future__ import annotations

import moetandem
import json
import subprocess
import sys

import pytest
import torch

from conftest import build_checkpoint
from moetandem import InvalidRequestError
from moetandem.experts.committee import CommitteeProvider
from moetandem.experts.policies import MissPolicy

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [1, 2, 3], [9, 9, 8, 100, 31]]


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def ckpt(request, tmp_path_factory):
    return build_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def reference(ckpt):
    return [g.token_ids for g in moetandem.load(ckpt, device="cpu", progress=False)
            .generate(PROMPTS, max_new_tokens=24)]


@pytest.mark.parametrize("policy", ["fetch", "host", "auto", "lru", "host-only"])
def test_exact_policies_reproduce_all_resident(ckpt, reference, policy):
    eng = moetandem.load(ckpt, device="cpu", progress=False, expert_budget=0.25, policy=policy)
    assert [g.token_ids for g in eng.generate(PROMPTS, max_new_tokens=24)] == reference
    s = eng.expert_stats()
    assert s["misses"] > 0 and s["hits"] > 0  # the budget really forced misses
    if policy in ("host", "host-only"):
        assert s["host_computes"] == s["misses"] and s["fetches"] == 0
    if policy in ("fetch", "lru"):
        assert s["fetches"] > 0 and s["host_computes"] < s["misses"]


def test_exact_fidelity_is_exact(ckpt, reference):
    eng = moetandem.load(ckpt, device="cpu", progress=False, expert_budget=0.5, fidelity="exact")
    assert [g.token_ids for g in eng.generate(PROMPTS, max_new_tokens=24)] == reference


def test_budget_honoured_and_resizable(ckpt, reference):
    eng = moetandem.load(ckpt, device="cpu", progress=False, expert_budget=0.5, policy="auto")
    full = eng.store.expert_bytes(torch.float32) * eng.store.num_experts * len(eng.store.layers)
    assert eng.provider.expert_bytes() <= full // 2
    eng.set_expert_budget(0.25)  # shrink: evicts
    assert eng.provider.expert_bytes() <= full // 4
    assert all(len(st.slot_of) == 2 for st in eng.provider.layers.values())
    assert [g.token_ids for g in eng.generate(PROMPTS, max_new_tokens=24)] == reference
    eng.set_expert_budget("1.0")  # grow: admits
    eng.provider.drain()
    assert all(len(st.slot_of) == eng.store.num_experts for st in eng.provider.layers.values())
    before = eng.expert_stats()["misses"]
    assert [g.token_ids for g in eng.generate(PROMPTS, max_new_tokens=24)] == reference
    assert eng.expert_stats()["misses"] == before  # everything resident: no new misses


def test_budget_below_one_token_is_an_error(ckpt):
    with pytest.raises(InvalidRequestError, match="below one token's experts"):
        moetandem.load(ckpt, device="cpu", progress=False, expert_budget="10KiB", policy="auto")


# ------------------------------------------------------------------------ provider-level behaviour
@pytest.fixture()
def engine(ckpt):
    return moetandem.load(ckpt, device="cpu", progress=False)


def _committee(engine, policy: MissPolicy, slots: int, **kw) -> CommitteeProvider:
    st = engine.store
    return CommitteeProvider(st, engine.device, engine.dtype, slots * st.expert_bytes(engine.dtype) * len(st.layers),
                             policy, engine.args.top_k, progress=False, **kw)


def test_refresh_admits_most_important(engine):
    layer = engine.store.layers[0]
    c = _committee(engine, MissPolicy(), slots=2, refresh_every=4, window=16)
    hot = [e for e in range(engine.store.num_experts) if e not in c.layers[layer].slot_of][:2]
    x = torch.randn(4, engine.args.hidden_size)
    ids = torch.tensor([hot] * 4)
    w = torch.full((4, 2), 0.5)
    for _ in range(3):
        c.compute(layer, x, ids, w)
        c.drain()
    assert set(c.layers[layer].slot_of) == set(hot)
    assert c.stats.swaps >= 2
    # the swapped-in experts compute exactly like the all-resident ones
    torch.testing.assert_close(c.compute(layer, x, ids, w), engine.provider.compute(layer, x, ids, w),
                               rtol=0, atol=0)


def test_substitution_uses_nearest_resident(engine):
    layer, E = engine.store.layers[0], engine.store.num_experts
    eye = {l: torch.eye(E) for l in engine.store.layers}
    c = _committee(engine, MissPolicy(substitute_min_sim=0.0), slots=2, refresh_every=10**9, similarity=eye)
    resident = sorted(c.layers[layer].slot_of)
    miss = next(e for e in range(E) if e not in resident)
    sim = torch.eye(E)
    sim[miss, resident[1]] = sim[resident[1], miss] = 0.9  # the calibrated nearest one
    sim[miss, resident[0]] = 0.1
    c.similarity = {l: sim for l in engine.store.layers}
    x = torch.randn(3, engine.args.hidden_size)
    ids, w = torch.tensor([[miss, resident[0]]] * 3), torch.tensor([[0.6, 0.4]] * 3)
    got = c.compute(layer, x, ids, w)
    want = engine.provider.compute(layer, x, torch.tensor([[resident[1], resident[0]]] * 3), w)
    torch.testing.assert_close(got, want)
    assert c.stats.substitutions == 3


def test_skip_respects_threshold(engine):
    layer, E = engine.store.layers[0], engine.store.num_experts
    c = _committee(engine, MissPolicy(skip_below=0.1, exact="host"), slots=2, refresh_every=10**9)
    resident = sorted(c.layers[layer].slot_of)
    miss = next(e for e in range(E) if e not in resident)
    x = torch.randn(2, engine.args.hidden_size)
    ids = torch.tensor([[resident[0], miss], [resident[0], miss]])
    w = torch.tensor([[0.95, 0.05], [0.7, 0.3]])  # row 0: below τ -> skipped; row 1: above -> computed
    got = c.compute(layer, x, ids, w)
    only = engine.provider.compute(layer, x[:1], ids[:1, :1], torch.tensor([[1.0]]))  # renormalised to the total
    torch.testing.assert_close(got[:1], only)
    torch.testing.assert_close(got[1:], engine.provider.compute(layer, x[1:], ids[1:], w[1:]))
    assert c.stats.skips == 1 and c.stats.host_computes == 1


_RSS = """
import json, sys, torch
import moetandem
def anon():
    return int(next(l for l in open('/proc/self/status') if l.startswith('RssAnon')).split()[1]) * 1024
def run(budget):
    eng = moetandem.load(sys.argv[1], device='cpu', progress=False, expert_budget=budget, policy='host')
    eng.generate([[1, 2, 3, 4], [5, 6]], max_new_tokens=16)
    return eng
warm = run('0.25')  # pays the one-time costs of the process (lazy torch init, allocator arenas)
out = []
for budget in sys.argv[2:]:
    base = anon()
    eng = run(budget)
    dense = sum(p.numel() * p.element_size() for p in eng.model.parameters())
    out.append({'budget': budget, 'grown': anon() - base, 'experts': eng.provider.expert_bytes(), 'dense': dense})
print(json.dumps(out))
"""


def test_budget_in_measured_memory(tmp_path):
    """Anonymous RSS (the mmap'd checkpoint excluded) grows by the dense weights + the budget + a small overhead
    (documented in docs/benchmarks.md), whatever the budget."""
    path = build_checkpoint("mixtral", tmp_path / "big", hidden_size=256, intermediate_size=1024,
                            num_hidden_layers=2, num_local_experts=16)
    total = 16 * 3 * 256 * 1024 * 4 * 2  # fp32 expert bytes
    rows = json.loads(subprocess.run([sys.executable, "-c", _RSS, str(path), "0.25", "0.5"], check=True,
                                     capture_output=True, text=True).stdout)
    for r in rows:
        assert r["experts"] <= float(r["budget"]) * total
        overhead = r["grown"] - r["dense"] - r["experts"]
        assert overhead < 0.05 * total, f"budget {r['budget']}: committee overhead {overhead / 2**20:.1f} MiB"


def test_plan_gives_slots_where_they_buy_hits(ckpt, tmp_path):
    from moetandem.experts.plan import Plan, make_plan, simulate_hits
    g = torch.Generator().manual_seed(0)
    N, E, k = 600, 8, 2
    narrow = torch.stack([torch.randperm(2, generator=g) for _ in range(N)])  # layer 0: 2 experts do everything
    wide = torch.stack([torch.randperm(6, generator=g)[:k] for _ in range(N)])  # layer 1: spread over 6
    w = torch.full((N, k), 0.5)
    routing = {0: (narrow, w), 1: (wide, w)}
    plan = make_plan(routing, E, k, expert_bytes=100, budget_bytes=8 * 100)
    assert plan.slots[1] > plan.slots[0] and sum(plan.slots.values()) == 8
    assert plan.predicted_hit_rate > plan.uniform_hit_rate
    assert simulate_hits(wide, w, E, E, 16)[0] == 1.0  # everything resident: every use hits
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json").slots == plan.slots
    # a plan drives the committee: per-layer slot counts as planned
    eng = moetandem.load(ckpt, device="cpu", progress=False)
    layers = eng.store.layers
    p = Plan(budget_bytes=10 * 4 * eng.store.expert_bytes(torch.float32), refresh_every=8,
             slots={l: (2 if i % 2 else 3) for i, l in enumerate(layers)}, predicted_hit_rate=0, uniform_hit_rate=0)
    p.save(tmp_path / "p.json")
    eng = moetandem.load(ckpt, device="cpu", progress=False, plan=str(tmp_path / "p.json"), policy="auto")
    assert {l: len(st.expert_of) for l, st in eng.provider.layers.items()} == p.slots


def test_fetch_with_refresh_swaps_in_flight_stays_exact(ckpt, reference):
    """On-demand fetches racing the refresh swapper (same expert twice) must keep one consistent copy."""
    from moetandem.batcher import Batcher
    eng = moetandem.load(ckpt, device="cpu", progress=False, expert_budget=0.5, policy="fetch",
                                 refresh_every=2)
    b = Batcher(eng, 4, 128)
    for n in (1, 4, 24, 24, 24):
        r = eng.make_sequence(PROMPTS[0], n)
        b.add([r])
        while b.active:
            b.step()
        assert r.out == reference[0][:n]
    for st in eng.provider.layers.values():
        assert all(st.expert_of[s] == e for e, s in st.slot_of.items())


@pytest.mark.parametrize("policy", ["host", "fetch", "skip"])
def test_grouped_slot_path_matches_loop_path(ckpt, policy):
    """The CUDA path (resident experts as one grouped GEMM over slots) computes what the per-expert path does;
    forced on the CPU, where torch's grouped_mm also runs."""
    from moetandem.experts.resident import _grouped_mm
    if _grouped_mm is None:
        pytest.skip("no grouped_mm in this torch")
    outs = []
    for grouped in (False, True):
        eng = moetandem.load(ckpt, device="cpu", progress=False, expert_budget=0.25, policy=policy,
                                     async_swaps=False)
        eng.provider.grouped = grouped
        outs.append([g.token_ids for g in eng.generate(PROMPTS, max_new_tokens=16)])
        stats = eng.expert_stats()
    assert outs[0] == outs[1]
    assert stats["misses"] > 0


def test_weight_calibration_is_the_cosine_of_flat_experts(ckpt):
    """Norms and cosine similarity of the flattened expert weights, computed from one chunked Gram matrix per
    layer, equal the direct float32 computation."""
    from moetandem.experts import similarity
    store = moetandem.load(ckpt, device="cpu", progress=False).store
    sim, norms = similarity.weight_calibration(store, progress=False)
    for layer in store.layers:
        w = torch.stack([store.read_flat(layer, e, torch.float32) for e in range(store.num_experts)])
        v = torch.nn.functional.normalize(w, dim=1)
        torch.testing.assert_close(norms[layer], w.norm(dim=1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sim[layer], v @ v.T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(similarity._gram(w, chunk=7), w @ w.T, rtol=1e-4, atol=1e-4)  # chunks add up


def test_skip_policy_keeps_a_zero_threshold(ckpt):
    """--policy skip --skip-threshold 0 skips nothing (0 is a threshold, not "unset": it was read as the default
    0.1), and an unset threshold keeps the policy's default."""
    zero = moetandem.load(ckpt, device="cpu", progress=False, expert_budget=0.5, policy="skip", skip_threshold=0.0)
    assert zero.provider.policy.skip_below == 0.0
    unset = moetandem.load(ckpt, device="cpu", progress=False, expert_budget=0.5, policy="skip")
    assert unset.provider.policy.skip_below == 0.1
