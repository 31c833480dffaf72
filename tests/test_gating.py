"""Hardware-aware gating: live profile, local expert selection, the group gate against masked gating."""
from __future__ import annotations

import moetandem
import json
import time
from pathlib import Path

import pytest
import torch

from moetandem import Engine
from moetandem.assets import demo_model_path
from moetandem.errors import InvalidRequestError
from moetandem.gating import LocalSelector, ProfileMonitor, measure_profile
from moetandem.gating.group_gate import GroupGate, gate_path, load_gates, masked_route, save_gates
from moetandem.gating.profile import probe_link
from moetandem.gating.train import train_gates

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _demo(**kw) -> Engine:
    return moetandem.load(demo_model_path(), device="cpu", progress=False, **kw)


def test_profile_is_positive_and_follows_the_budget(tmp_path):
    big = _demo(expert_budget=0.75, policy="auto")
    p = measure_profile(big, reps=2)
    for v in (p.free_memory_bytes, p.total_memory_bytes, p.expert_bytes, p.expert_ffn_device_s,
              p.expert_ffn_host_s, p.fetch_s, p.h2d_bytes_per_s, p.resident_experts, p.committee_bytes):
        assert v > 0
    assert p.free_memory_bytes <= p.total_memory_bytes
    big.set_expert_budget(0.25)
    q = measure_profile(big, reps=2)
    assert q.resident_experts < p.resident_experts and q.committee_bytes < p.committee_bytes
    p.save(tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text())["resident_experts"] == p.resident_experts


def test_link_probe_sees_a_throttled_link():
    def link(bytes_per_s: float, rtt: float):
        return lambda payload: time.sleep(rtt + len(payload) / bytes_per_s)
    fast_bw, fast_rtt = probe_link(link(50e6, 0.001), reps=2)
    slow_bw, slow_rtt = probe_link(link(5e6, 0.02), reps=2)
    assert fast_bw > 3 * slow_bw and slow_rtt > 3 * fast_rtt
    assert 2e6 < slow_bw < 8e6 and 0.015 < slow_rtt < 0.05


def test_monitor_refreshes_listeners_at_bounded_cost():
    eng = _demo(expert_budget=0.5, policy="auto")

    class Link:
        bandwidth_bps, rtt_s = 12.5e6, 0.04
    mon = ProfileMonitor(eng, link=Link(), every_s=0.3, max_share=0.5)
    seen = []
    mon.on_update(seen.append)
    assert seen[0].link_bandwidth_bps == 12.5e6
    Link.bandwidth_bps = 1.25e6  # throttled
    time.sleep(0.35)
    prof = mon.maybe_refresh()
    assert len(seen) == 2 and prof.link_bandwidth_bps == 1.25e6
    assert mon.maybe_refresh() is prof  # within every_s: no new measurement
    with pytest.raises(InvalidRequestError):
        ProfileMonitor(eng, every_s=0)


def test_local_set_shrinks_with_memory_and_grows_with_latency_budget():
    eng = _demo(expert_budget=0.75, policy="auto")
    sel = LocalSelector(eng.provider, eng.args.num_experts)
    layer = eng.store.layers[0]
    before = int(sel.local_mask(layer).sum())
    eng.set_expert_budget(0.25)
    after = int(sel.local_mask(layer).sum())
    assert after < before and after == len(eng.provider.layers[layer].slot_of)
    prof = measure_profile(eng, reps=2)
    roomy = LocalSelector(eng.provider, eng.args.num_experts, latency_budget_s=3 * max(prof.fetch_s,
                                                                                          prof.expert_ffn_host_s))
    roomy.update(prof)
    assert int(roomy.local_mask(layer).sum()) > after
    remote = LocalSelector(eng.provider, eng.args.num_experts, remote={layer: list(range(eng.args.num_experts))})
    assert not remote.local_mask(layer).any()


def test_gate_off_is_the_original_router_exactly():
    ref = _demo(expert_budget=0.5, policy="auto", async_swaps=False)
    ids = list(range(5, 69))
    want = ref.generate([ids], max_new_tokens=24)[0].token_ids
    eng = _demo(expert_budget=0.5, policy="auto", async_swaps=False, gate="masked")
    masked = eng.generate([ids], max_new_tokens=24)[0].token_ids
    assert eng.gate is not None and all(b.router is eng.gate for b in eng.model.moe_blocks())
    eng2 = _demo(expert_budget=0.5, policy="auto", async_swaps=False, gate="off")
    assert eng2.gate is None and all(b.router is None for b in eng2.model.moe_blocks())
    assert eng2.generate([ids], max_new_tokens=24)[0].token_ids == want
    assert eng2.provider.external_observe is False
    assert masked != want or eng.expert_stats()["misses"] == 0  # the mask only changes routing on a miss


def test_masked_gating_keeps_hits_and_only_uses_local_experts():
    logits = torch.randn(50, 16)
    allowed = torch.zeros(16, dtype=torch.bool)
    allowed[:6] = True
    ids, w = masked_route(logits, allowed[None].expand(50, -1), 2, True)
    assert allowed[ids].all() and torch.allclose(w.sum(-1), torch.ones(50))
    g = GroupGate(32, 16, rank=4)
    p = torch.softmax(logits, -1)
    w0, ids0 = torch.topk(p, 2)
    w0 = w0 / w0.sum(-1, keepdim=True)
    x = torch.randn(50, 32)
    gids, gw = g.route(x, logits, allowed[None].expand(50, -1), ids0, w0)
    hit = allowed[ids0].all(-1)
    assert torch.equal(gids[hit], ids0[hit]) and torch.allclose(gw[hit], w0[hit])
    assert allowed[gids[~hit]].all()


def test_errors_are_actionable(tmp_path):
    with pytest.raises(InvalidRequestError, match="expert-budget"):
        _demo(gate="masked")
    with pytest.raises(InvalidRequestError, match="unknown gate"):
        _demo(expert_budget=0.5, gate="wild")
    with pytest.raises(InvalidRequestError, match="cost"):
        _demo(expert_budget=0.5, gate="masked", gate_cost=-1.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A gate trained on a slice of the demo's training text, in a writable copy of the demo checkpoint."""
    import shutil
    root = tmp_path_factory.mktemp("demo") / "demo-moe"
    shutil.copytree(demo_model_path(), root, ignore=shutil.ignore_patterns("moetandem-group-gate*"))
    ref = moetandem.load(root, device="cpu", progress=False)
    text = SHARED / "train/tinyshakespeare.txt"
    if not text.is_file():
        pytest.skip("../shared/data is not beside the checkout")
    ids = ref.encode(text.read_text()[:120_000])
    texts = [ref.decode_text(ids[i:i + 256]) for i in range(0, len(ids), 256)]
    gates, reports = train_gates(ref, texts, rows=2048, steps=300, progress=False)
    save_gates(ref.store.ckpt, gates)
    return root, ref, reports


def test_group_gate_trains_saves_and_loads(trained):
    root, ref, reports = trained
    assert gate_path(ref.store.ckpt).is_file()
    assert sum(r.gate_error for r in reports) < sum(r.masked_error for r in reports)
    gates = load_gates(ref.store.ckpt, ref.args.hidden_size, ref.args.num_experts, torch.device("cpu"))
    assert set(gates) == set(ref.store.layers)
    layer_params = ref.args.num_experts * 3 * ref.args.hidden_size * ref.args.moe_intermediate_size
    assert sum(p.numel() for p in gates[0].parameters()) < 0.01 * layer_params


def test_cli_profile_and_gate_flags(tmp_path, capsys):
    from moetandem.cli import main
    out = tmp_path / "prof.json"
    assert main(["profile", "--expert-budget", "0.5", "--json", str(out), "--reps", "2"]) == 0
    assert json.loads(out.read_text())["resident_experts"] > 0
    assert "expert FFN, host" in capsys.readouterr().out
    assert main(["generate", "--max-new-tokens", "4", "--expert-budget", "0.5", "--gate", "masked"]) == 0
    assert main(["generate", "--max-new-tokens", "4", "--gate", "masked"]) == 2
    assert main(["calibrate", "--group-gate"]) == 2  # needs --data
    assert main(["calibrate", "--group-gate", "--data", str(tmp_path / "t.txt"), "--gate-tokens", "10"]) == 2


def test_fused_gate_routes_as_the_unfused_one():
    from moetandem.gating.group_gate import GatedRouter
    from moetandem.models.components.routers import SoftmaxTopK
    from moetandem.models.moe import SparseMoE
    torch.manual_seed(0)
    H, E, T = 48, 12, 80
    block = SparseMoE(3, H, E, 2, SoftmaxTopK(norm_topk_prob=True))
    torch.nn.init.normal_(block.gate.weight, std=0.3)
    gate = GroupGate(H, E, rank=6)
    with torch.no_grad():
        for p in gate.parameters():
            p.add_(0.2 * torch.randn_like(p))
    local = torch.zeros(E, dtype=torch.bool)
    local[::2] = True
    router = GatedRouter(lambda layer: local, {3: gate})
    weight = router.fold(block)
    assert weight.shape == (E + 6, H) and torch.equal(weight[:E], block.gate.weight)
    x = torch.randn(T, H)
    with torch.no_grad():
        fused_ids, fused_w = router(block, x, torch.nn.functional.linear(x, weight))  # [T, E + r] logits
        ids, w = router(block, x, block.gate(x))  # [T, E]: the unfused GroupGate
        block.router, block.router_weight = router, weight
        hook_ids, _ = block.route(x)  # the block's one matmul
    assert torch.equal(fused_ids, ids) and torch.equal(hook_ids, ids)
    assert torch.allclose(fused_w, w, atol=1e-5) and local[ids].all()
    assert not torch.equal(ids, torch.topk(block.gate(x), 2).indices)  # the gate did re-route the misses


def test_group_gate_engine_routes_with_one_router_matmul():
    eng = _demo(expert_budget=0.5, policy="auto", async_swaps=False, gate="group")  # the demo ships its gates
    E, H = eng.args.num_experts, eng.args.hidden_size
    blocks = eng.model.moe_blocks()
    assert all(b.router_weight is not None and b.router_weight.shape[0] > E and b.router_weight.shape[1] == H
               for b in blocks)
    assert all(torch.equal(b.router_weight[:E], b.gate.weight) for b in blocks)
    out = eng.generate([list(range(5, 40))], max_new_tokens=8)[0].token_ids
    assert len(out) == 8 and eng.gate.local_share == 1.0  # cost ∞: only local experts computed


def test_next_token_distillation_lowers_kl_against_masked_gating():
    from moetandem.gating.distil import distil_gates
    text = SHARED / "train/tinyshakespeare.txt"
    if not text.is_file():
        pytest.skip("../shared/data is not beside the checkout")
    eng = _demo()
    ids = eng.encode(text.read_text()[:24_000])[:4096]
    grads = [p.requires_grad for p in eng.model.parameters()]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: one thread is several times faster than two on a busy 2-core box
    try:
        gates, rep = distil_gates(eng, ids, rank=8, steps=20, window=32, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert set(gates) == set(eng.store.layers) and rep.steps == 20
    assert rep.masked_kl > 0.05  # the replayed local sets do cost quality
    assert rep.gate_kl < 0.95 * rep.masked_kl  # held-out windows, not trained on
    assert [p.requires_grad for p in eng.model.parameters()] == grads  # the model is handed back as it was
    assert all(b.router is None for b in eng.model.moe_blocks())
    with pytest.raises(InvalidRequestError, match="more calibration text"):
        distil_gates(eng, ids[:200], steps=1, progress=False)
