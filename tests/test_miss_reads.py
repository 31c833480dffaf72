"""--miss-reads N (MissPolicy.max_reads): per token and layer, at most N of the misses an approximate policy would
read exactly stay exact (largest gate weight first); the others are deferred. Refused with exact policies."""
from __future__ import annotations

import argparse
from dataclasses import replace

import pytest
import torch

import moetandem
from conftest import build_checkpoint
from moetandem import InvalidRequestError
from moetandem.cli import main
from moetandem.cli.flags import add_committee_args
from moetandem.config import CommitteeConfig
from moetandem.experts import policies
from moetandem.experts.committee import CommitteeProvider
from moetandem.experts.policies import MissPolicy
from moetandem.experts.slots import LayerSlots

BALANCED = MissPolicy.from_fidelity("balanced")


def table(E: int = 10) -> LayerSlots:
    """Experts 0 and 1 resident (slots 0, 1); expert 7's substitute is slot 1."""
    st = LayerSlots(2, 4, E, torch.device("cpu"), torch.float32)
    st.publish(0, 0)
    st.publish(1, 1)
    st.rebuild_substitutes(None, None)
    st.sub_slot[7] = 1
    return st


def test_keeps_the_largest_misses_exact_and_defers_the_rest():
    # a hit (0), a substitute (7 -> slot 1), a skip (3: below τ=0.05) and five misses 2, 4, 5, 6, 8 for the exact path
    ids = torch.tensor([[0, 7, 3, 2, 4, 5, 6, 8]])
    w = torch.tensor([[0.25, 0.1, 0.03, 0.12, 0.08, 0.2, 0.06, 0.16]])
    a = replace(BALANCED, max_reads=2).assign(ids, w, table())
    assert a.exact.tolist() == [[False, False, False, False, False, True, False, True]]  # experts 5 (0.2), 8 (0.16)
    assert a.slots.tolist() == [[0, 1, -1, -1, -1, -1, -1, -1]]
    kept = torch.tensor([[0.25, 0.1, 0, 0, 0, 0.2, 0, 0.16]])
    torch.testing.assert_close(a.weights, kept / 0.71)  # renormalised to the token's original total, 1
    # hits, misses, substitutions, skips, deferred, miss reads
    assert a.counts.tolist() == [1, 7, 1, 1, 3, 2]
    uncapped = BALANCED.assign(ids, w, table())
    assert uncapped.counts.tolist() == [1, 7, 1, 1, 0, 5]
    assert uncapped.exact.sum() == 5


def test_ties_go_to_the_earlier_column_and_a_large_cap_changes_nothing():
    ids = torch.tensor([[2, 4, 5, 6]])
    w = torch.tensor([[0.3, 0.2, 0.3, 0.2]])
    pol = MissPolicy.named("skip", tau=0.01)
    assert replace(pol, max_reads=3).assign(ids, w, table()).exact.tolist() == [[True, True, True, False]]
    torch.manual_seed(0)
    ids = torch.stack([torch.randperm(10)[:4] for _ in range(32)])
    w = torch.softmax(torch.randn(32, 4), -1)
    free, capped = BALANCED.assign(ids, w, table()), replace(BALANCED, max_reads=4).assign(ids, w, table())
    assert all(torch.equal(x, y) for x, y in zip((free.slots, free.weights, free.exact, free.counts),
                                                 (capped.slots, capped.weights, capped.exact, capped.counts)))


def test_zero_defers_every_miss_but_keeps_a_tokens_top_assignment():
    st = table()
    ids = torch.tensor([[2, 4, 5, 6], [0, 2, 4, 5]])  # row 0: nothing resident; row 1: its top expert is resident
    w = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]])
    a = replace(MissPolicy.named("skip", tau=0.01), max_reads=0).assign(ids, w, st)
    assert a.exact.tolist() == [[True, False, False, False], [False] * 4]  # row 0's top comes back from the host
    assert a.slots.tolist() == [[-1, -1, -1, -1], [0, -1, -1, -1]]
    torch.testing.assert_close(a.weights, torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]]))
    assert a.counts.tolist() == [1, 7, 0, 0, 6, 1]
    st.near_slot[2] = 1  # inside a graph (deferring), the top comes back from the nearest resident expert
    g = replace(MissPolicy.named("skip", tau=0.01), max_reads=0).assign(ids, w, st, in_graph=True)
    assert g.exact is None and g.slots[0].tolist() == [1, -1, -1, -1] and g.counts.tolist() == [1, 7, 1, 0, 6, 0]


def test_compiled_rule_takes_the_cap(monkeypatch):
    """The fused (CUDA) entry passes the cap through: the same result as the eager rule."""
    res = torch.tensor([[-1, -1, -1, 0]], dtype=torch.int32)
    sub, near = torch.full_like(res, -1), torch.tensor([-1], dtype=torch.int32)
    w = torch.tensor([[0.1, 0.4, 0.3, 0.2]])
    monkeypatch.setitem(policies._fast, "fn", policies._general)
    got = policies._general_fast(res, sub, near, w, 0.0, False, False, 1)
    assert got[2].tolist() == [[False, True, False, False]] and got[3].tolist() == [1, 3, 0, 0, 2, 1]


def test_capped_rule_traces_as_one_graph():
    """No host sync and no data-dependent shape: dynamo traces the capped rule whole (fullgraph), as inductor needs
    on CUDA (`_general_fast`); the traced rule gives the eager result for every cap."""
    torch._dynamo.reset()
    fn = torch.compile(policies._general, backend="aot_eager", fullgraph=True)
    torch.manual_seed(1)
    res = torch.where(torch.rand(16, 6) < 0.4, torch.randint(0, 4, (16, 6)), -1).int()
    sub = torch.where(torch.rand(16, 6) < 0.2, 1, -1).int()
    near = torch.full((16,), -1, dtype=torch.int32)
    w = torch.softmax(torch.randn(16, 6), -1)
    for cap in (None, 0, 1, 3):
        want = policies._general(res, sub, near, w, 0.05, False, False, cap)
        assert all(torch.equal(a, b) for a, b in zip(fn(res, sub, near, w, 0.05, False, False, cap), want)), cap


def test_only_approximate_policies_take_a_cap():
    for name in ("auto", "fetch", "host", "lru", "static", "host-only"):
        with pytest.raises(InvalidRequestError, match="exact policies and the baselines"):
            replace(MissPolicy.named(name), max_reads=1)
    with pytest.raises(InvalidRequestError, match="exact policies"):
        replace(MissPolicy.from_fidelity("exact"), max_reads=1)
    with pytest.raises(InvalidRequestError, match=">= 0"):
        replace(BALANCED, max_reads=-1)
    for name in ("substitute", "skip"):
        assert replace(MissPolicy.named(name), max_reads=0).max_reads == 0
    assert replace(MissPolicy.from_fidelity("fast"), max_reads=2).max_reads == 2


@pytest.mark.parametrize("kw,match", [({"fidelity": "exact"}, "--fidelity exact never allows"),
                                      ({"policy": "auto"}, "--policy auto never allows"),
                                      ({"policy": "lru"}, "--policy lru never allows")])
def test_config_refuses_exact(kw, match):
    with pytest.raises(InvalidRequestError, match=match):
        CommitteeConfig(budget=0.5, miss_reads=1, **kw)


def test_config_and_flag():
    with pytest.raises(InvalidRequestError, match="needs --expert-budget"):
        CommitteeConfig(miss_reads=1)
    with pytest.raises(InvalidRequestError, match="integer >= 0"):
        CommitteeConfig(budget=0.5, miss_reads=-1)
    CommitteeConfig(budget=0.5, policy="skip", miss_reads=0)
    p = argparse.ArgumentParser()
    add_committee_args(p)
    assert CommitteeConfig.from_args(p.parse_args(["--expert-budget", "0.5", "--miss-reads", "2"])).miss_reads == 2
    assert CommitteeConfig.from_args(p.parse_args([])).miss_reads is None
    with pytest.raises(SystemExit):
        p.parse_args(["--miss-reads", "-1"])
    ns = p.parse_args(["--expert-budget", "0.5", "--fidelity", "exact", "--miss-reads", "1"])
    with pytest.raises(InvalidRequestError, match="--miss-reads 1 defers"):
        CommitteeConfig.from_args(ns)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe"))  # 8 experts, top-3


def test_cli_refuses_exact_fidelity(ckpt, capsys):
    rc = main(["generate", "--device", "cpu", "--model", str(ckpt), "--prompt", "1 2", "--expert-budget", "0.5",
               "--fidelity", "exact", "--miss-reads", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "--fidelity exact never allows" in err and "Traceback" not in err


def test_end_to_end_cap_bounds_the_reads(ckpt, monkeypatch):
    """Through the loader: with miss_reads=1 no token reads more than one miss per layer, and fewer in all."""
    seen = []
    assign = MissPolicy.assign

    def spy(self, *a, **k):
        out = assign(self, *a, **k)
        seen.append((self.max_reads, out.exact))
        return out
    monkeypatch.setattr(MissPolicy, "assign", spy)
    prompt = [(7 * i + 3) % 250 + 1 for i in range(24)]
    stats = {}
    for cap in (None, 1):
        eng = moetandem.load(ckpt, device="cpu", progress=False, expert_budget=0.5, fidelity="balanced",
                             async_swaps=False, miss_reads=cap)
        assert eng.provider.policy.max_reads == cap
        eng.generate([prompt], max_new_tokens=8, stop_on_eos=False)
        stats[cap] = eng.expert_stats()
    k = 3
    capped, free = stats[1], stats[None]
    token_layers = (capped["hits"] + capped["misses"]) // k
    assert 0 < capped["miss_reads"] <= token_layers, capped
    assert capped["miss_reads"] < free["miss_reads"] and capped["deferred"] > 0 and free["deferred"] == 0
    assert free["hits"] + free["misses"] == capped["hits"] + capped["misses"]  # the same tokens were routed
    rows = [ex.sum(dim=1) for cap, ex in seen if cap == 1 and ex is not None]
    assert rows and max(int(r.max()) for r in rows) <= 1  # per token and layer, prefill and decode alike
    assert max(int(ex.sum(dim=1).max()) for cap, ex in seen if cap is None and ex is not None) > 1


def test_mapped_step_reads_at_most_the_cap(monkeypatch, tmp_path):
    """A mapped committee (the zero-copy path that is graph-captured on CUDA, forced on the CPU) hands the fused
    kernel at most N host experts per token: the cap holds on the in-graph path, not only on eager steps."""
    monkeypatch.setattr("moetandem.experts.committee.maps_experts", lambda *a: True)
    eng = moetandem.load(build_checkpoint("mixtral", tmp_path), device="cpu", progress=False)
    st, layer, E = eng.store, eng.store.layers[0], eng.store.num_experts
    pol = replace(MissPolicy.named("skip", tau=0.01), max_reads=1)
    c = CommitteeProvider(st, eng.device, eng.dtype, 2 * st.expert_bytes(eng.dtype) * len(st.layers), pol,
                          eng.args.top_k, progress=False)
    assert c.mapped is not None
    c.grouped = True
    import moetandem.experts.executor as executor
    calls = []
    monkeypatch.setattr(executor, "fused_moe_op", lambda *a: calls.append(a) or torch.zeros_like(a[0]))
    resident = set(c.layers[layer].slot_of)
    missing = [e for e in range(E) if e not in resident]
    ids = torch.tensor([missing[:2]] * 4)  # both of each token's experts are misses
    w = torch.tensor([[0.6, 0.4]] * 4)
    c.compute(layer, torch.randn(4, eng.args.hidden_size), ids, w)
    slots = calls[0][1].view(4, 2)  # host experts are keys >= n
    n = c.layers[layer].n
    assert (slots >= n).sum(dim=1).tolist() == [1] * 4 and (slots[:, 0] >= n).all()
    assert c.stats.miss_reads == 4 and c.stats.deferred == 4
    score = c.importance(layer)
    assert score[missing[1]] > 0  # a deferred expert still counts for importance: a refresh can bring it in



@pytest.mark.parametrize("scale", [1.0, 0.02, 2.5])
def test_skip_threshold_is_a_share_of_the_tokens_routed_weight(scale):
    """τ compares each weight with the token's top-k total, so scaling the weights (a router that does not
    renormalise, DeepSeek-V3's routed_scaling_factor, Gemma-4's per-expert scale) skips the same experts; an
    absolute τ = 0.05 skipped every miss at scale 0.02."""
    ids = torch.tensor([[0, 7, 3, 2, 4, 5, 6, 8]])
    w = torch.tensor([[0.25, 0.1, 0.03, 0.12, 0.08, 0.2, 0.06, 0.16]]) * scale  # sum 1 before scaling
    a = BALANCED.assign(ids, w, table())
    assert a.counts.tolist() == [1, 7, 1, 1, 0, 5]  # only expert 3 (3% of the total) is skipped
    torch.testing.assert_close(a.weights.sum(), w.sum())  # renormalised to the original total
