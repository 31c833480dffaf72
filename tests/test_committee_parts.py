"""The committee's parts: slot table, device scorer, graph-safe policies (no host sync in compute), the executor,
the after_step contract, budgets. CPU unless marked gpu."""
from __future__ import annotations

import collections
import contextlib

import pytest
import torch

import moetandem
from conftest import build_checkpoint
from moetandem import InvalidRequestError
from moetandem.experts.committee import CommitteeProvider
from moetandem.experts.executor import HostRows, _grouped_mm, run_experts
from moetandem.experts.policies import MissPolicy
from moetandem.experts.scorer import Scorer
from moetandem.experts.slots import LayerSlots
from moetandem.kernels import fused_moe_reference


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return moetandem.load(build_checkpoint("mixtral", tmp_path_factory.mktemp("mixtral")), device="cpu",
                          progress=False)


def _committee(engine, policy: MissPolicy, slots: int, **kw) -> CommitteeProvider:
    st = engine.store
    return CommitteeProvider(st, engine.device, engine.dtype, slots * st.expert_bytes(engine.dtype) * len(st.layers),
                             policy, engine.args.top_k, progress=False, **kw)


@contextlib.contextmanager
def no_host_sync():
    """Fail on every tensor -> host read a CUDA step would sync on (CPU stand-in for set_sync_debug_mode)."""
    def boom(name):
        def f(*a, **k):
            raise AssertionError(f"host sync in graph-safe compute: {name}")
        return f
    names = ["tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
             "unique"]
    saved = {n: getattr(torch.Tensor, n) for n in names}
    fns = {n: getattr(torch, n) for n in ("nonzero", "unique", "masked_select")}
    try:
        for n in names:
            setattr(torch.Tensor, n, boom(n))
        for n in fns:
            setattr(torch, n, boom(n))
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
        for n, f in fns.items():
            setattr(torch, n, f)


# ------------------------------------------------------------------------ slot table
def test_slot_table_publish_unpublish():
    st = LayerSlots(3, 12, 8, torch.device("cpu"), torch.float32)
    assert st.slot_table.tolist() == [-1] * 8 and st.free_slots() == [0, 1, 2]
    st.publish(1, 5)
    st.publish(0, 2)
    assert st.slot_table.tolist() == [-1, -1, 0, -1, -1, 1, -1, -1]
    assert st.slot_table[5] == 1 and st.slot_table[2] == 0 and st.slot_of == {5: 1, 2: 0}
    assert st.expert_of == [2, 5, -1] and st.resident_mask().nonzero().flatten().tolist() == [2, 5]
    assert st.unpublish(5) == 1
    assert st.slot_table[5] == -1 and st.expert_of == [2, -1, -1] and st.free_slots() == [1, 2]
    st.incoming[1] = 7  # a copy in flight: not free, not published
    assert st.free_slots() == [2] and st.busy == {1} and st.slot_table[7] == -1


def test_plan_swaps_fills_free_slots_then_replaces_while_it_gains():
    """Free slots take the best missing experts first; then the least important residents give way to more
    important newcomers, pairwise, until a newcomer is no better (unpublished in one table write)."""
    st = LayerSlots(4, 12, 10, torch.device("cpu"), torch.float32)
    for slot, expert in ((0, 0), (1, 1), (2, 2)):  # slot 3 free
        st.publish(slot, expert)
    score = torch.tensor([0.5, 0.1, 0.3, 0.0, 0.0, 0.0, 0.9, 0.8, 0.05, 0.0])
    # top 4: 6, 7, 0, 2 -> 6 into the free slot; 7 (0.8) replaces 1 (0.1); nothing else is missing
    assert st.plan_swaps(score) == [(3, 6), (1, 7)]
    assert st.slot_table.tolist()[:3] == [0, -1, 2] and st.slot_of == {0: 0, 2: 2}
    st2 = LayerSlots(2, 12, 10, torch.device("cpu"), torch.float32)
    st2.publish(0, 0)
    st2.publish(1, 1)
    score = torch.tensor([0.2, 0.6, 0.5, 0.6, 0, 0, 0, 0, 0, 0])  # top 2: 1 and 3 (0.6) -> 3 replaces 0
    assert st2.plan_swaps(score) == [(0, 3)]
    st3 = LayerSlots(2, 12, 10, torch.device("cpu"), torch.float32)
    st3.publish(0, 0)
    st3.publish(1, 1)
    tie = torch.tensor([0.5, 0.6, 0.5, 0, 0, 0, 0, 0, 0, 0])  # expert 2 ties with resident 0: no gain, no swap
    assert st3.plan_swaps(tie) == [] and st3.slot_of == {0: 0, 1: 1}


def test_plan_swaps_margin_keeps_residents_within_the_margin():
    """With a margin m a newcomer replaces a resident only when its score beats (1 + m) times the resident's;
    free slots are filled whatever the margin."""
    score = torch.tensor([0.30, 0.10, 0.0, 0.25, 0.12, 0.0])  # top 2: 0 and 3; residents 0 and 1
    for margin, want in ((0.0, [(1, 3)]), (1.0, [(1, 3)]), (1.4, [(1, 3)]), (1.5, []), (3.0, [])):
        st = LayerSlots(2, 12, 6, torch.device("cpu"), torch.float32)
        st.publish(0, 0)
        st.publish(1, 1)
        assert st.plan_swaps(score, margin) == want, margin  # at 1.5: 0.25 is not more than 2.5 * 0.10
    st = LayerSlots(3, 12, 6, torch.device("cpu"), torch.float32)
    st.publish(0, 0)
    assert st.plan_swaps(score, 10.0) == [(1, 3), (2, 4)]  # free slots: no margin
    assert set(st.slot_of) == {0}


def test_swap_margin_default_follows_the_tier_and_bad_values_raise():
    from moetandem.config import TIER_SWAP_MARGIN, CommitteeConfig
    from moetandem.errors import InvalidRequestError
    assert CommitteeConfig(budget=0.5).resolved_swap_margin == 0.0
    tier = CommitteeConfig(budget=0.5, miss_format="int4", miss_tier="device")
    assert tier.resolved_swap_margin == TIER_SWAP_MARGIN > 0
    assert CommitteeConfig(budget=0.5, miss_format="int4", miss_tier="device", swap_margin=0).resolved_swap_margin == 0
    for bad in (-0.5, float("nan"), float("inf"), "1", True):
        with pytest.raises(InvalidRequestError, match="--swap-margin"):
            CommitteeConfig(budget=0.5, swap_margin=bad)


def test_substitute_tables_follow_the_resident_set():
    E = 6
    st = LayerSlots(2, 4, E, torch.device("cpu"), torch.float32)
    sim = torch.eye(E)
    sim[0, 3], sim[0, 4] = 0.9, 0.4  # expert 0: nearest resident is 3, then 4
    sim[1, 4] = 0.2  # expert 1: only 4, below a 0.5 threshold
    st.publish(0, 3)
    st.publish(1, 4)
    st.rebuild_substitutes(sim, 0.5)
    assert st.sub_slot[0] == 0 and st.sub_slot[1] == -1  # 1's best (4, 0.2) is below the threshold
    assert st.near_slot[0] == 0 and st.near_slot[1] == 1  # ... but it is the nearest resident one
    st.unpublish(3)
    st.rebuild_substitutes(sim, 0.3)
    assert st.sub_slot[0] == 1 and st.near_slot[0] == 1  # 3 gone: 4 (0.4 >= 0.3) takes over
    st.rebuild_substitutes(None, None)  # no similarity any more: the tables empty
    assert st.sub_slot.tolist() == [-1] * E and st.near_slot.tolist() == [-1] * E


def test_substitute_tables_of_several_layers_at_once():
    """rebuild_substitutes over layers with different resident sets and similarities = each layer on its own."""
    from moetandem.experts.slots import rebuild_substitutes
    g = torch.Generator().manual_seed(5)
    E, layers, alone = 8, [], []
    for i in range(3):
        pair = []
        for _ in range(2):
            st = LayerSlots(3, 4, E, torch.device("cpu"), torch.float32)
            for slot, e in enumerate(torch.randperm(E, generator=g)[: 1 + i].tolist()):
                st.publish(slot, e)
            pair.append(st)
        layers.append(pair[0])
        alone.append(pair[1])
        pair[1].slot_table.copy_(pair[0].slot_table)
    sims = [torch.rand(E, E, generator=g) for _ in range(3)]
    rebuild_substitutes(layers, sims, 0.5)
    for st, ref, sim in zip(layers, alone, sims):
        ref.rebuild_substitutes(sim, 0.5)
        assert st.sub_slot.tolist() == ref.sub_slot.tolist() and st.near_slot.tolist() == ref.near_slot.tolist()
        assert not st.dirty and (st.near_slot >= 0).any()


# ------------------------------------------------------------------------ scorer
def _host_window(calls, E, window, norms, kind):
    """The old host deque: per call a vector, drop the oldest while the rest still holds >= window tokens."""
    dq, score, tokens = collections.deque(), torch.zeros(E), 0
    for x, ids, w in calls:
        T = x.shape[0]
        c = torch.ones_like(w) if kind == "count" else x.norm(dim=-1, keepdim=True) * w * norms[ids]
        vec = torch.zeros(E).scatter_add_(0, ids.reshape(-1), c.reshape(-1))
        dq.append((T, vec))
        score += vec
        tokens += T
        while tokens - dq[0][0] >= window and len(dq) > 1:
            t, v = dq.popleft()
            score -= v
            tokens -= t
    return score


@pytest.mark.parametrize("kind", ["importance", "count", "ema"])
@pytest.mark.parametrize("window", [1, 5, 16])
def test_scorer_matches_host_reference(kind, window):
    g = torch.Generator().manual_seed(window)
    E, k, H = 8, 2, 4
    norms = torch.rand(E, generator=g) + 0.5
    # layer 0 between two others that see other calls: every layer's state lives in one tensor
    sc = Scorer(kind, window, [3, 0, 5], E, {3: norms, 0: norms, 5: norms}, torch.device("cpu"))
    calls, ema = [], torch.zeros(E)
    for i in range(40):
        T = [1, 3, 1, 7][i % 4]
        x, w = torch.randn(T, H, generator=g), torch.rand(T, k, generator=g)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        sc.observe(0, x, ids, w)
        sc.observe(3 if i % 2 else 5, torch.randn(2, H, generator=g), ids[:1].repeat(2, 1), w[:1].repeat(2, 1))
        calls.append((x, ids, w))
        vec = torch.zeros(E).scatter_add_(0, ids.reshape(-1), (x.norm(dim=-1, keepdim=True) * w * norms[ids]).reshape(-1))
        ema = ema * (1 - 1 / window) ** T + vec
        want = ema if kind == "ema" else _host_window(calls, E, window, norms, kind)
        torch.testing.assert_close(sc.scores(0), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sc.scores_many([3, 0, 5])[1], want, rtol=1e-5, atol=1e-5)  # all layers at once
        torch.testing.assert_close(sc.scores_many([5, 0])[1], want, rtol=1e-5, atol=1e-5)  # a subset


def test_scorer_rejects_bad_settings():
    with pytest.raises(InvalidRequestError, match="unknown committee score"):
        Scorer("popularity", 8, [0], 4, {0: torch.ones(4)}, torch.device("cpu"))
    with pytest.raises(InvalidRequestError, match="window"):
        Scorer("count", 0, [0], 4, {0: torch.ones(4)}, torch.device("cpu"))


# ------------------------------------------------------------------------ policies
def test_policy_names_and_graph_safety():
    safe = {"balanced", "fast", "substitute", "skip", "static"}
    for name in ("exact", "balanced", "fast"):
        assert MissPolicy.from_fidelity(name).graph_safe == (name in safe)
    for name in ("auto", "fetch", "host", "substitute", "skip", "lru", "static", "host-only"):
        assert MissPolicy.named(name).graph_safe == (name in safe), name
    assert MissPolicy.named("skip", tau=0.3).skip_below == 0.3
    with pytest.raises(InvalidRequestError, match="unknown policy"):
        MissPolicy.named("random")
    with pytest.raises(InvalidRequestError, match="miss handling"):
        MissPolicy(exact="maybe")


def test_assign_skip_defer_and_whole_token_rule():
    E = 6
    st = LayerSlots(2, 4, E, torch.device("cpu"), torch.float32)
    st.publish(0, 1)
    st.publish(1, 2)
    st.rebuild_substitutes(None, None)
    pol = MissPolicy(skip_below=0.1, exact="defer")
    ids = torch.tensor([[1, 4], [3, 2], [5, 4]])
    w = torch.tensor([[0.6, 0.4], [0.95, 0.05], [0.7, 0.3]])
    a = pol.assign(ids, w, st)
    # row 0: 4 misses above τ -> deferred; row 1: 3 misses (deferred), 2 hits; row 2: nothing resident, no
    # similarity -> the token keeps nothing
    assert a.slots.tolist() == [[0, -1], [-1, 1], [-1, -1]] and a.exact is None
    torch.testing.assert_close(a.weights, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    assert a.counts.tolist() == [2, 4, 0, 0, 4, 0]  # hits, misses, substitutions, skips, deferred, miss reads
    exact = MissPolicy(skip_below=0.1).assign(ids, w, st)
    assert exact.exact.tolist() == [[False, True], [True, False], [True, True]]
    assert int(exact.counts[5]) == 4  # each kept miss reads its expert's host copy
    torch.testing.assert_close(exact.weights, w)


# ------------------------------------------------------------------------ executor
@pytest.mark.parametrize("grouped", [False, True])
def test_executor_ignores_empty_slots_and_zero_weights(grouped):
    if grouped and _grouped_mm is None:
        pytest.skip("no grouped_mm in this torch")
    g = torch.Generator().manual_seed(0)
    n, I, H, T = 4, 8, 16, 5
    w13, w2 = torch.randn(n, 2 * I, H, generator=g), torch.randn(n, H, I, generator=g)
    w13[3] = float("nan")  # a slot in transit may hold anything: never read by a slot −1 row's output
    x = torch.randn(T, H, generator=g)
    slots = torch.tensor([[0, 1], [2, -1], [-1, -1], [1, 0], [2, 2]], dtype=torch.int32)
    w = torch.rand(T, 2, generator=g)
    w[4, 1] = 0.0
    host = HostRows(token=torch.tensor([1]), col=torch.tensor([1]), y=torch.ones(1, H))
    try:
        got = run_experts(x, slots, w, w13, w2, grouped=grouped, host=host)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"grouped_mm unavailable on this CPU build: {e}")
    ffn = lambda s, t: (torch.nn.functional.silu(x[t] @ w13[s, :I].T) * (x[t] @ w13[s, I:].T)) @ w2[s].T
    want = torch.stack([w[0, 0] * ffn(0, 0) + w[0, 1] * ffn(1, 0), w[1, 0] * ffn(2, 1) + w[1, 1] * torch.ones(H),
                        torch.zeros(H), w[3, 0] * ffn(1, 3) + w[3, 1] * ffn(0, 3), w[4, 0] * ffn(2, 4)])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------ graph-safe compute and after_step
def _graph_ready(engine, policy, slots=2, **kw) -> CommitteeProvider:
    if _grouped_mm is None:
        pytest.skip("no grouped_mm in this torch")
    c = _committee(engine, policy, slots, **kw)
    c.grouped = True  # the executor's device path, forced on the CPU
    c.after_step()  # the engine keeps the step contract
    assert c.graph_safe
    return c


@pytest.fixture()
def in_graph(monkeypatch):
    """compute() as while a CUDA graph is captured (on the CPU)."""
    import moetandem.experts.committee as committee
    monkeypatch.setattr(committee, "_capturing", lambda x: True)


@pytest.mark.parametrize("fidelity", ["balanced", "fast", "static", "skip", "substitute"])
def test_graph_safe_compute_never_syncs(engine, fidelity, in_graph):
    E, layer = engine.store.num_experts, engine.store.layers[0]
    pol = MissPolicy.from_fidelity(fidelity) if fidelity in ("balanced", "fast") else MissPolicy.named(fidelity)
    sim = {l: torch.rand(E, E) for l in engine.store.layers}
    c = _graph_ready(engine, pol, similarity=sim if pol.substitute_min_sim is not None else None)
    x = torch.randn(5, engine.args.hidden_size)
    ids = torch.stack([torch.randperm(E)[:2] for _ in range(5)])
    w = torch.softmax(torch.randn(5, 2), -1)
    try:
        with no_host_sync():
            y = c.compute(layer, x, ids, w)
    except (RuntimeError, NotImplementedError) as e:
        if "grouped" not in str(e):
            raise
        pytest.skip(f"grouped_mm unavailable on this CPU build: {e}")
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert c.stats.hits + c.stats.misses == 10


def test_sync_detector_catches_exact_policies(engine):
    """The detector above is not vacuous: an exact policy must read the routing on the host."""
    layer, E = engine.store.layers[0], engine.store.num_experts
    c = _committee(engine, MissPolicy(exact="host"), 2)
    c.after_step()
    assert not c.graph_safe
    ids = torch.tensor([[e for e in range(E) if e not in c.layers[layer].slot_of][:2]])
    with pytest.raises(AssertionError, match="host sync"), no_host_sync():
        c.compute(layer, torch.randn(1, engine.args.hidden_size), ids, torch.tensor([[0.5, 0.5]]))


def test_after_step_drives_refresh_when_graph_safe(engine):
    layer, E = engine.store.layers[0], engine.store.num_experts
    c = _graph_ready(engine, MissPolicy.named("static"), refresh_every=4, window=16)
    c.policy = MissPolicy(skip_below=float("inf"), exact="defer")  # static, but refreshed
    hot = [e for e in range(E) if e not in c.layers[layer].slot_of][:2]
    x, ids, w = torch.randn(4, engine.args.hidden_size), torch.tensor([hot] * 4), torch.full((4, 2), 0.5)
    for _ in range(3):
        c.compute(layer, x, ids, w)
    c.drain()
    assert set(c.layers[layer].slot_of) != set(hot)  # compute never refreshes a graph-safe committee
    c.after_step()  # counts the 12 eager tokens: due
    c.drain()
    assert set(c.layers[layer].slot_of) == set(hot) and c.stats.swaps == 2
    assert (c.resident_mask(layer).nonzero().flatten().tolist()) == sorted(hot)
    for _ in range(3):  # graph replays: compute does not run; after_step counts one token each
        c.after_step()
    assert c.since_refresh[layer] == 3
    c.after_step(tokens=8)
    assert c.since_refresh[layer] == 0


@pytest.mark.parametrize("graph", [False, True])
def test_balanced_substitutes_most_similar_resident(engine, graph, monkeypatch):
    """Balanced: the most similar resident expert above 0.5 stands in for a miss; a miss with no such expert is
    computed exactly in an eager step and deferred (weight 0, renormalised) inside a CUDA graph."""
    if graph:
        import moetandem.experts.committee as committee
        monkeypatch.setattr(committee, "_capturing", lambda x: True)
    layer, E = engine.store.layers[0], engine.store.num_experts
    sim = torch.eye(E)
    c = _graph_ready(engine, MissPolicy.from_fidelity("balanced"), similarity={l: sim for l in engine.store.layers})
    resident = sorted(c.layers[layer].slot_of)
    miss, far = [e for e in range(E) if e not in resident][:2]
    sim[miss, resident[1]], sim[miss, resident[0]] = 0.8, 0.6  # both above 0.5: the most similar wins
    sim[far, resident[0]] = 0.3  # below balanced's 0.5: no substitute
    c.similarity = {l: sim for l in engine.store.layers}
    c.after_step()  # tables rebuilt between steps
    x = torch.randn(3, engine.args.hidden_size)
    ids, w = torch.tensor([[miss, resident[0]], [far, resident[0]], [resident[1], far]]), \
        torch.tensor([[0.6, 0.4]] * 3)
    got = c.compute(layer, x, ids, w)
    ref = engine.provider
    torch.testing.assert_close(got[0], ref.compute(layer, x[:1], torch.tensor([[resident[1], resident[0]]]),
                                                   w[:1])[0], rtol=1e-5, atol=1e-5)
    s = c.stats
    assert s.substitutions == 1 and s.hits == 3 and s.misses == 3
    if graph:
        one = torch.tensor([[1.0]])
        torch.testing.assert_close(got[1], ref.compute(layer, x[1:2], torch.tensor([[resident[0]]]), one)[0])
        torch.testing.assert_close(got[2], ref.compute(layer, x[2:], torch.tensor([[resident[1]]]), one)[0])
        assert s.deferred == 2 and s.host_computes + s.fetches == 0
    else:
        torch.testing.assert_close(got[1:], ref.compute(layer, x[1:], ids[1:], w[1:]), rtol=1e-5, atol=1e-5)
        assert s.deferred == 0 and s.host_computes + s.fetches >= 1


def test_budget_honoured_and_live_resize(engine):
    st, E, layer = engine.store, engine.store.num_experts, engine.store.layers[0]
    per = st.expert_bytes(engine.dtype) * len(st.layers)
    c = _committee(engine, MissPolicy.from_fidelity("fast"), 4, similarity={l: torch.eye(E) for l in st.layers})
    assert c.expert_bytes() <= 4 * per
    x, ids = torch.randn(6, engine.args.hidden_size), torch.randint(0, E, (6, 2))
    w = torch.softmax(torch.randn(6, 2), -1)
    c.compute(layer, x, ids, w)
    for slots in (2, 6, 3):
        c.set_budget(slots * per + per // 2)  # not a whole slot more: still `slots` per layer
        assert c.expert_bytes() <= slots * per + per // 2
        for l, ls in c.layers.items():
            assert ls.n == slots and len(ls.slot_of) == slots
            table = ls.slot_table.tolist()
            assert all(table[e] == s for e, s in ls.slot_of.items()) and sum(t >= 0 for t in table) == slots
        assert torch.isfinite(c.compute(layer, x, ids, w)).all()
    with pytest.raises(InvalidRequestError, match="below one token's experts"):
        c.set_budget(per)


def test_substitution_without_similarity_is_an_error(engine):
    with pytest.raises(InvalidRequestError, match="calibrate"):
        _committee(engine, MissPolicy.from_fidelity("balanced"), 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_safe_committee_captures_and_replays_on_cuda(tmp_path):
    """A balanced committee's compute captured into a CUDA graph (sync debug mode "error"), replayed after a refresh
    changed the resident set, equals the eager computation of the same step (misses not substituted are read
    zero-copy from pinned host memory in both)."""
    path = build_checkpoint("olmoe", tmp_path / "m")
    eng = moetandem.load(path, device="cuda", dtype="bfloat16", progress=False, expert_budget=0.5,
                                 fidelity="balanced", refresh_every=1)
    c, layer, E = eng.provider, eng.store.layers[0], eng.args.num_experts
    if not c.grouped:
        pytest.skip("no grouped GEMM on this GPU")
    c.after_step()
    assert c.graph_safe
    x = torch.randn(4, eng.args.hidden_size, device="cuda", dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(E, device="cuda")[:2] for _ in range(4)])
    w = torch.softmax(torch.randn(4, 2, device="cuda"), -1).to(torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        c.compute(layer, x, ids, w)  # warm-up, eager (as graphs.py does)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            y = c.compute(layer, x, ids, w)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for _ in range(3):
        graph.replay()
        c.after_step()
        c.drain()
    graph.replay()
    assert c.mapped is not None  # exact misses: zero-copy, also inside the graph
    torch.testing.assert_close(y, c.compute(layer, x, ids, w), rtol=2e-2, atol=2e-2)
    assert c.stats.hits + c.stats.misses > 0


def test_mapped_exact_misses_equal_all_resident_without_host_sync(engine, monkeypatch, in_graph):
    """Exact misses read from the pinned host copy of every expert (slot n + e in the fused kernel) give the
    all-resident output, with no host round trip, so exact policies are graph-safe too (forced on the CPU)."""
    monkeypatch.setattr("moetandem.experts.committee.maps_experts",
                        lambda dev, dt, act, policy, total: policy.exact == "auto")
    layer, E, H = engine.store.layers[0], engine.store.num_experts, engine.args.hidden_size
    c = _committee(engine, MissPolicy(), 2)
    assert c.mapped is not None and c.mapped[layer].shape == (E, engine.store.expert_numel())
    c.grouped = True
    c.after_step()
    assert c.graph_safe  # exact, yet graph-safe
    x = torch.randn(6, H)
    ids = torch.stack([torch.randperm(E)[:2] for _ in range(6)])
    w = torch.softmax(torch.randn(6, 2), -1)
    import moetandem.experts.executor as executor
    calls = []
    monkeypatch.setattr(executor, "fused_moe_op", lambda *a: calls.append(a) or torch.zeros_like(a[0]))
    with no_host_sync():  # the committee's part of the step: routing -> slots, all on the device
        c.compute(layer, x, ids, w)
    got = fused_moe_reference(*calls[0][:6], host=calls[0][7:9])  # what the kernel computes from those inputs
    monkeypatch.undo()
    want = engine.provider.compute(layer, x, ids, w)  # every expert resident
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    s = c.stats
    assert s.misses > 0 and s.substitutions == 0 and s.skips == 0  # misses were served, exactly
    assert c.host_flat(layer, 3).data_ptr() == c.mapped[layer][3].data_ptr()  # swaps copy from the same pinned copy
    lru = _committee(engine, MissPolicy.named("lru"), 2)
    assert lru.mapped is None  # the baselines keep their own miss handling


def test_compiled_routing_rule_falls_back_to_eager(monkeypatch):
    """Where inductor cannot compile, the committee's routing rule runs eagerly with the same result."""
    from moetandem.experts import policies

    def broken(*args):
        raise RuntimeError("no compiler here")
    monkeypatch.setitem(policies._fast, "fn", broken)
    res = torch.tensor([[0, -1], [-1, -1]], dtype=torch.int32)
    sub, near = torch.full_like(res, -1), torch.tensor([-1, 1], dtype=torch.int32)
    w = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
    got = policies._general_fast(res, sub, near, w, 0.05, False, True)
    want = policies._general(res, sub, near, w, 0.05, False, True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert policies._fast["fn"] is policies._general  # compiled once, failed once: eager from then on
