"""--miss-format: balanced / fast misses read a lower-precision host copy of the expert (int8 / int4), never with
fidelity exact. CPU: the eager committee host-computes from the copy (dequantized on use) and counts the bytes it
read; GPU: the graph-captured committee reads the copy zero-copy in the fused kernel."""
from __future__ import annotations

import argparse

import pytest
import torch

import moetandem
from conftest import build_checkpoint
from moetandem import InvalidRequestError
from moetandem.analysis.eval import evaluate_ids
from moetandem.cli.flags import add_committee_args
from moetandem.config import CommitteeConfig
from moetandem.experts.misses import fetch_miss, miss_row

IDS = [(7 * i + 3) % 250 + 1 for i in range(96)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint("mixtral", tmp_path_factory.mktemp("mixtral"))


def engine(ckpt, miss_format: str = "bf16", **kw) -> moetandem.Engine:
    return moetandem.load(ckpt, device="cpu", dtype="bfloat16", progress=False, expert_budget=0.5,
                          fidelity=kw.pop("fidelity", "balanced"), async_swaps=False, miss_format=miss_format, **kw)


def test_int8_misses_match_bf16_misses_and_read_half_the_bytes(ckpt):
    ref = engine(ckpt)
    q = evaluate_ids(engine(ckpt, "int8"), IDS, context=48, step=1, reference=ref, progress=False)
    base = ref.expert_stats()
    st = q.expert_stats
    assert st["host_computes"] > 0 and base["host_computes"] == st["host_computes"]  # the same misses ...
    assert q.top1_agreement >= 0.95 and q.mean_kl < 0.02, (q.top1_agreement, q.mean_kl)  # ... computed closely
    ratio = st["miss_bytes"] / base["miss_bytes"]  # ... from about half the bytes (int8 + per-channel scales)
    assert 0.45 < ratio < 0.56, ratio
    assert st["miss_reads"] == base["miss_reads"] > 0


def test_int4_copy_is_dequantized_on_use(ckpt):
    eng = engine(ckpt, "int4")
    c = eng.provider
    assert c.miss_fmt.name == "int4" and c.mapped is None and c.miss_rows is not None
    w13, w2, _, _ = c.host_fmt.unpack(miss_row(c, c.store.layers[0], 1))
    g, u, d = c.store.read(c.store.layers[0], 1)
    dense = torch.cat([g, u]).float()
    err = (w13.float() - dense).norm() / dense.norm()
    assert 0 < err < 0.2, err  # a quantized copy of this expert, not another one and not the exact one
    assert c.cost.fetch_s > 0  # timed on the int4 row's bytes


def test_fetched_miss_is_lossy_until_the_next_refresh(ckpt):
    eng = engine(ckpt, "int8")
    c = eng.provider
    layer = c.store.layers[0]
    st = c.layers[layer]
    missing = next(e for e in range(c.E) if e not in st.slot_of)
    victim = next(iter(st.slot_of.values()))
    st.unpublish(st.expert_of[victim])
    before = c.stats.bytes_moved
    fetch_miss(c, layer, victim, missing)
    assert st.slot_of[missing] == victim and st.lossy == {victim}
    assert c.stats.bytes_moved - before == c.miss_fmt.nbytes < c.expert_size
    assert not torch.equal(st.buf[victim], c.host_flat(layer, missing, pin=False))  # dequantized int8
    score = torch.rand(c.E)
    score[missing] = 2.0  # still wanted
    c.refresh(layer, score)  # frees the lossy slot first; a swap brings the exact copy back
    c.drain()
    assert not st.lossy and missing in st.slot_of
    assert torch.equal(st.buf[st.slot_of[missing]], c.host_flat(layer, missing, pin=False))


def test_mapped_misses_read_the_copy_in_its_format(ckpt, monkeypatch):
    """The CUDA wiring, forced on the CPU (the fused op runs its reference there): the pinned mirror holds int8
    rows, the kernel gets them with host_fmt, swaps still copy bf16 rows, and each miss read counts int8 bytes."""
    from moetandem.experts.committee import CommitteeProvider
    from moetandem.experts.formats import ExpertFormat
    from moetandem.experts.policies import MissPolicy
    monkeypatch.setattr("moetandem.experts.committee.maps_experts", lambda *a: True)
    eng = moetandem.load(ckpt, device="cpu", progress=False)
    st, layer = eng.store, eng.store.layers[0]
    pol = MissPolicy(substitute_min_sim=None, graph=True)  # balanced's graph rule, no skips: every miss is read
    outs = {}
    for name in ("bf16", "int8"):
        miss = ExpertFormat(name, st.inter, st.hidden, eng.dtype)
        c = CommitteeProvider(st, eng.device, eng.dtype, 2 * st.expert_bytes(eng.dtype) * len(st.layers), pol,
                              eng.args.top_k, progress=False, miss_fmt=miss, async_swaps=False)
        c.grouped = True
        torch.manual_seed(0)
        x = torch.randn(6, st.hidden)
        ids = torch.stack([torch.randperm(st.num_experts)[:2] for _ in range(6)])
        w = torch.softmax(torch.randn(6, 2), -1)
        outs[name] = c.compute(layer, x, ids, w)
        s = c.stats
        assert s.miss_reads > 0 and s.miss_bytes == s.miss_reads * c.host_fmt.nbytes
    assert c.mapped[layer].dtype == torch.uint8 and c.mapped[layer].shape == (st.num_experts, miss.nbytes)
    # swaps copy bf16 rows, from their own buffer pinned beside the int8 mirror (not pinned one by one on use)
    assert c.copies.mapped[layer].shape == (st.num_experts, c.fmt.nbytes // c.copies.mapped[layer].element_size())
    assert c.host_flat(layer, 3).numel() == c.fmt.row_numel
    torch.testing.assert_close(c.copies.get(layer, 3).view(-1), c.copies.mapped[layer][3])
    want = eng.provider.compute(layer, x, ids, w)  # every expert resident: bf16 misses are exact
    torch.testing.assert_close(outs["bf16"], want, rtol=1e-4, atol=1e-4)
    err = float((outs["int8"] - want).norm() / want.norm())
    assert 0 < err < 0.02, err


def test_swap_sources_fall_back_to_pinning_on_use_past_the_cap(ckpt, monkeypatch, caplog):
    """Mapped int8 misses and bf16 slot copies that do not both fit the pinned cap: swaps pin on use (with a
    warning that says how to allow more), and the misses stay mapped."""
    from moetandem.experts.committee import CommitteeProvider
    from moetandem.experts.formats import ExpertFormat
    from moetandem.experts.policies import MissPolicy
    monkeypatch.setattr("moetandem.experts.committee.maps_experts", lambda *a: True)
    eng = moetandem.load(ckpt, device="cpu", progress=False)
    st = eng.store
    bf16, int8 = (ExpertFormat(n, st.inter, st.hidden, eng.dtype) for n in ("bf16", "int8"))
    both = len(st.layers) * st.num_experts * (bf16.nbytes + int8.nbytes)
    monkeypatch.setenv("MOETANDEM_PINNED_BYTES", str(both - 1))
    with caplog.at_level("WARNING", logger="moetandem.experts"):
        c = CommitteeProvider(st, eng.device, eng.dtype, 2 * st.expert_bytes(eng.dtype) * len(st.layers),
                              MissPolicy(substitute_min_sim=None, graph=True), eng.args.top_k, progress=False,
                              miss_fmt=int8, async_swaps=False)
    assert c.mapped is not None and c.copies.mapped is None
    assert "MOETANDEM_PINNED_BYTES" in caplog.text
    monkeypatch.setenv("MOETANDEM_PINNED_BYTES", str(both))
    c = CommitteeProvider(st, eng.device, eng.dtype, 2 * st.expert_bytes(eng.dtype) * len(st.layers),
                          MissPolicy(substitute_min_sim=None, graph=True), eng.args.top_k, progress=False,
                          miss_fmt=int8, async_swaps=False)
    assert c.copies.mapped is not None


@pytest.mark.parametrize("kw,match", [({"fidelity": "exact"}, "fidelity exact never allows"),
                                      ({"policy": "auto"}, "--policy auto never allows"),
                                      ({"policy": "host-only"}, "--policy host-only never allows")])
def test_exact_is_refused(kw, match):
    with pytest.raises(InvalidRequestError, match=match):
        CommitteeConfig(budget=0.5, miss_format="int8", **kw)


def test_refusals_are_actionable(ckpt):
    with pytest.raises(InvalidRequestError, match="needs --expert-budget"):
        CommitteeConfig(miss_format="int4")
    with pytest.raises(InvalidRequestError, match="--miss-format 'fp8'"):
        CommitteeConfig(budget=0.5, miss_format="fp8")
    with pytest.raises(InvalidRequestError, match="use --expert-format bf16"):
        moetandem.load(ckpt, device="cpu", progress=False, expert_budget=0.5, miss_format="int8",
                       expert_format="int8")
    with pytest.raises(InvalidRequestError, match="fidelity exact"):
        engine(ckpt, "int8", fidelity="exact")
    CommitteeConfig(budget=0.5, policy="skip", miss_format="int8")  # approximate policies take it


def test_flag_is_declared_once_with_the_committee_flags():
    p = argparse.ArgumentParser()
    add_committee_args(p)
    ns = p.parse_args(["--expert-budget", "0.5", "--miss-format", "int4"])
    assert CommitteeConfig.from_args(ns).miss_format == "int4"
    assert CommitteeConfig.from_args(p.parse_args([])).miss_format == "bf16"
    with pytest.raises(SystemExit):
        p.parse_args(["--miss-format", "mxfp4"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_committee_with_int4_misses_matches_eager_gpu(ckpt):
    """CUDA: the captured decode step reads int4 misses zero-copy (two launches per GEMM: bf16 slots, int4 host)
    and agrees with the same committee run eagerly (no graphs), and with bf16 misses closely."""
    kw = dict(device="cuda", dtype="bfloat16", progress=False, expert_budget=0.5, fidelity="balanced",
              async_swaps=False)
    graph = moetandem.load(ckpt, miss_format="int4", **kw)
    eager = moetandem.load(ckpt, miss_format="int4", use_graphs=False, **kw)
    assert graph.provider.mapped is not None and graph.provider.host_fmt.name == "int4"
    q = evaluate_ids(graph, IDS, context=48, step=1, reference=eager, progress=False)
    assert q.top1_agreement >= 0.97 and q.mean_kl < 0.01, (q.top1_agreement, q.mean_kl)
    st = graph.expert_stats()
    assert st["miss_reads"] > 0 and st["miss_bytes"] == st["miss_reads"] * graph.provider.host_fmt.nbytes
    bf16 = moetandem.load(ckpt, **kw)
    q = evaluate_ids(graph, IDS, context=48, step=1, reference=bf16, progress=False)
    assert q.top1_agreement >= 0.9, q.top1_agreement
