"""--miss-compute host: the handoff kernels (kernels/handoff.py; the PyTorch reference here, the Triton kernels under
Triton's interpreter: in this process with TRITON_INTERPRET=1, else in a child process that sets it), the host worker
and its wiring in the committee (forced on the CPU as the mapped-expert tests force it), config / CLI validation, and
a GPU run (skipped without CUDA)."""
from __future__ import annotations

import argparse
import importlib
import os
import threading
import time

import pytest
import torch

import moetandem
from conftest import build_checkpoint
from kernel_checks import run_interpreted
from moetandem import InvalidRequestError
from moetandem.cli.flags import add_committee_args
from moetandem.config import CommitteeConfig
from moetandem.experts.committee import CommitteeProvider
from moetandem.experts.policies import MissPolicy
from moetandem.kernels.handoff import REQ, RESP, TOKENS, collect_reference, new_channel, publish_reference

hk = importlib.import_module("moetandem.kernels.handoff")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interpret = pytest.mark.skipif(not INTERPRET or hk.triton is None, reason="needs TRITON_INTERPRET=1 and triton")
T, K, H, MAX_T = 3, 2, 40, 4


def channel(max_polls: int = 1 << 16):
    err, off = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    return new_channel(MAX_T, K, H, torch.float32, torch.device("cpu"), err, off, False, max_polls)


def answer(x: torch.Tensor, miss: torch.Tensor) -> torch.Tensor:
    """What the test worker computes for assignment (t, j): x[t] * (expert id + 1) (a stand-in expert)."""
    return x[:, None, :] * (miss[..., None].float() + 1)  # [T, k, H]


def worker(ch, steps: int = 1) -> threading.Thread:
    """A thread that answers `steps` requests of `ch` as the real worker does: reads after the request flag, writes
    the answers, then the response flag."""
    def run() -> None:
        for _ in range(steps):
            deadline = time.time() + 30
            while int(ch.flags[REQ]) == int(ch.flags[RESP]) and time.time() < deadline:
                time.sleep(0.0005)
            epoch, t = int(ch.flags[REQ]), int(ch.flags[TOKENS])
            ch.resp[:t] = answer(ch.x[:t], ch.miss[:t])
            ch.flags[RESP] = epoch
    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, out, w = torch.randn(T, H, generator=g), torch.randn(T, H, generator=g), torch.rand(T, K, generator=g)
    miss = torch.tensor([[3, -1], [-1, -1], [5, 2]], dtype=torch.int32)  # row 1 has no miss
    slots = torch.tensor([[-1, 0], [1, 0], [-1, -1]], dtype=torch.int32)
    return x, out, w, miss, slots


def want(x, out, w, miss) -> torch.Tensor:
    return out + (answer(x, miss) * (w * (miss >= 0))[..., None]).sum(1)


def impls(triton: bool):
    return (hk.publish_triton, hk.collect_triton) if triton else (publish_reference, collect_reference)


def check_handoff(triton: bool) -> None:
    publish, collect = impls(triton)
    ch = channel()
    for step in range(2):  # two steps on one layer: the second must not read the first's answer
        x, out, w, miss, slots = problem(step)
        th = worker(ch)
        hit = publish(ch, x, miss, slots, 7)
        assert hit.tolist() == [[-1, 0], [1, 0], [-1, -1]]  # the device computes the hits only
        y = collect(ch, out, w, miss)
        th.join()
        torch.testing.assert_close(y, want(x, out, w, miss), rtol=1e-6, atol=1e-6)
        assert int(ch.epoch[0]) == step + 1 and int(ch.flags[TOKENS]) == T and int(ch.err[0]) == 0


def check_timeout(triton: bool) -> None:
    """No worker: collect gives up within its bound, adds nothing for the misses, sets the error flag; a stale
    answer (the previous epoch's) is never taken; with `off` set the misses go to the mapped slots n + e."""
    publish, collect = impls(triton)
    ch = channel(max_polls=200)
    x, out, w, miss, slots = problem()
    th = worker(ch)
    publish(ch, x, miss, slots, 7)
    collect(ch, out, w, miss)
    th.join()
    x2, out2, w2, _, _ = problem(1)
    t0 = time.time()
    publish(ch, x2, miss, slots, 7)  # nobody answers this one; resp still holds step 1's answer
    y = collect(ch, out2, w2, miss)
    assert time.time() - t0 < 30
    torch.testing.assert_close(y, out2)  # nothing added, not the stale answer
    assert int(ch.err[0]) == 1
    ch.off[0] = 1
    assert publish(ch, x2, miss, slots, 7).tolist() == [[10, 0], [1, 0], [12, 9]]
    torch.testing.assert_close(collect(ch, out2, w2, miss), out2)
    assert int(ch.epoch[0]) == 2  # nothing published while off


def test_reference_handoff_adds_the_workers_answers():
    check_handoff(triton=False)


def test_reference_collect_times_out_without_a_worker():
    check_timeout(triton=False)


@interpret
def test_triton_interpreter_handoff():
    check_handoff(triton=True)


@interpret
def test_triton_interpreter_timeout():
    check_timeout(triton=True)


def test_triton_interpreter_subprocess():
    """The interpreter tests above in a child process with TRITON_INTERPRET=1."""
    if INTERPRET or hk.triton is None:
        pytest.skip("runs in this process (TRITON_INTERPRET=1) or triton is missing")
    run_interpreted(__file__, "triton_interpreter and not subprocess")


# ------------------------------------------------------------------ the committee (forced on the CPU)
@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return moetandem.load(build_checkpoint("mixtral", tmp_path_factory.mktemp("mixtral")), device="cpu",
                          progress=False)


def host_committee(engine, monkeypatch, **kw) -> CommitteeProvider:
    monkeypatch.setattr("moetandem.experts.committee.maps_experts", lambda *a: True)
    st = engine.store
    return CommitteeProvider(st, engine.device, engine.dtype, 2 * st.expert_bytes(engine.dtype) * len(st.layers),
                             MissPolicy(), engine.args.top_k, progress=False, miss_compute="host", **kw)


def routing(engine, T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    E, H = engine.store.num_experts, engine.args.hidden_size
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)])
    return x, ids, torch.softmax(torch.randn(T, 2, generator=g), -1)


def test_committee_host_misses_equal_all_resident(engine, monkeypatch):
    """Exact misses computed by the host worker give the all-resident output (the hits through the fused kernel's
    reference, the mapped experts passed as on CUDA); the worker counted them; a step longer than MAX_T keeps the
    zero-copy reads; the worker stops and starts again."""
    c = host_committee(engine, monkeypatch)
    try:
        assert c.host_misses is not None and c.host_misses.running
        layer = engine.store.layers[0]
        for seed in range(2):
            x, ids, w = routing(engine, 5, seed)
            got = c.compute(layer, x, ids, w)
            torch.testing.assert_close(got, engine.provider.compute(layer, x, ids, w), rtol=1e-5, atol=1e-5)
        s = c.stats
        assert s.misses > 0 and s.host_computes == s.misses == s.miss_reads
        x, ids, w = routing(engine, c.host_misses.max_t + 1, 3)  # prefill-sized: zero-copy, the worker idle
        got = c.compute(layer, x, ids, w)
        torch.testing.assert_close(got, engine.provider.compute(layer, x, ids, w), rtol=1e-5, atol=1e-5)
        assert c.stats.host_computes == s.host_computes and c.stats.miss_reads > s.miss_reads
    finally:
        c.close()
    assert not c.host_misses.running
    c.host_misses.start()  # restart-safe
    assert c.host_misses.running
    c.close()


def test_committee_falls_back_to_zero_copy_after_a_timeout(engine, monkeypatch, caplog):
    c = host_committee(engine, monkeypatch)
    hm = c.host_misses
    hm.close()  # nobody answers
    for ch in hm._w.channels:
        ch.max_polls = 100
    layer = engine.store.layers[0]
    x, ids, w = routing(engine, 4)
    full = engine.provider.compute(layer, x, ids, w)
    got = c.compute(layer, x, ids, w)
    assert not torch.allclose(got, full)  # the misses were left out
    with caplog.at_level("WARNING", logger="moetandem.experts"):
        c.after_step()
    assert hm.fallen_back and int(hm.off[0]) == 1 and "zero-copy" in caplog.text
    torch.testing.assert_close(c.compute(layer, x, ids, w), full, rtol=1e-5, atol=1e-5)
    # a step captured before the fallback keeps the handoff's calls: on the device they now read zero-copy
    ch = hm._w.channels[hm.index[layer]]
    miss = torch.where(ids >= 0, ids, -1).int()
    assert hm.publish(layer, x, miss, torch.full_like(miss, -1), 2).tolist() == (ids + 2).tolist()
    assert int(ch.epoch[0]) == 1


# ------------------------------------------------------------------ config, CLI
def test_config_and_cli_validation(engine, monkeypatch):
    with pytest.raises(InvalidRequestError, match="choose one of gpu, host"):
        CommitteeConfig(budget=0.5, miss_compute="cpu")
    with pytest.raises(InvalidRequestError, match="needs --expert-budget"):
        CommitteeConfig(miss_compute="host")
    for policy in ("fetch", "host", "lru", "host-only", "static"):
        with pytest.raises(InvalidRequestError, match=f"--policy {policy} decides"):
            CommitteeConfig(budget=0.5, policy=policy, miss_compute="host")
    for kw in ({"policy": "auto"}, {"fidelity": "exact"}, {"fidelity": "balanced"}):
        assert CommitteeConfig(budget=0.5, miss_compute="host", **kw).miss_compute == "host"
    p = argparse.ArgumentParser()
    add_committee_args(p)
    ns = p.parse_args(["--expert-budget", "0.5", "--miss-compute", "host"])
    assert CommitteeConfig.from_args(ns).miss_compute == "host"
    assert CommitteeConfig.from_args(p.parse_args([])).miss_compute == "gpu"
    with pytest.raises(SystemExit):
        p.parse_args(["--miss-compute", "cpu"])
    monkeypatch.setattr("moetandem.experts.committee.maps_experts", lambda *a: True)
    st = engine.store
    with pytest.raises(InvalidRequestError, match="choose gpu or host"):
        CommitteeProvider(st, engine.device, engine.dtype, 2 * st.expert_bytes(engine.dtype) * len(st.layers),
                          MissPolicy(), engine.args.top_k, progress=False, miss_compute="tpu")


def test_the_workers_thread_count_is_its_own(engine, monkeypatch):
    """The worker runs on MOETANDEM_HOST_MISS_THREADS intra-op threads; the calling thread, and threads started later
    (a server's engine thread), keep the process's count."""
    own = torch.get_num_threads()
    monkeypatch.setenv("MOETANDEM_HOST_MISS_THREADS", str(own + 1))
    c = host_committee(engine, monkeypatch)
    seen = {}
    th = threading.Thread(target=lambda: seen.setdefault("later", torch.get_num_threads()))
    th.start()
    th.join()
    layer = engine.store.layers[0]
    c.host_misses._w.act = _Spy(c.host_misses._w.act, seen)
    c.compute(layer, *routing(engine, 2))
    c.close()
    assert torch.get_num_threads() == own and seen == {"later": own, "worker": own + 1}


class _Spy:
    """An activation that records the intra-op thread count it runs with."""

    def __init__(self, act, seen: dict) -> None:
        self.act, self.seen = act, seen

    def ffn(self, *a, **k):
        self.seen["worker"] = torch.get_num_threads()
        return self.act.ffn(*a, **k)


def test_worker_threads_from_the_environment(monkeypatch):
    from moetandem.experts.host_misses import worker_threads
    monkeypatch.setenv("MOETANDEM_HOST_MISS_THREADS", "3")
    assert worker_threads() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("MOETANDEM_HOST_MISS_THREADS", bad)
        with pytest.raises(InvalidRequestError, match="number of threads >= 1"):
            worker_threads()
    monkeypatch.delenv("MOETANDEM_HOST_MISS_THREADS")
    assert worker_threads() >= 1


def test_load_passes_miss_compute(engine, tmp_path, caplog):
    """moetandem.load(miss_compute=...) reaches the committee; on the CPU nothing is mapped, so it warns and keeps
    today's miss handling."""
    path = build_checkpoint("mixtral", tmp_path / "m")
    with caplog.at_level("WARNING", logger="moetandem.experts"):
        eng = moetandem.load(path, device="cpu", progress=False, expert_budget=0.5, miss_compute="host")
    assert eng.provider.host_misses is None and "--miss-compute host: not used here" in caplog.text
    with pytest.raises(InvalidRequestError, match="--policy lru decides"):
        moetandem.load(path, device="cpu", progress=False, expert_budget=0.5, policy="lru", miss_compute="host")


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_host_misses_tokens_equal_all_resident_in_one_graph(tmp_path):
    """At half the expert bytes with --miss-compute host, 32 greedy tokens equal the all-resident run (fp32, so
    neither kernel tiling nor the CPU's sums flip a token); the decode step is a captured CUDA graph, the worker
    computed misses, and no step timed out."""
    path = build_checkpoint("olmoe", tmp_path / "olmoe")
    prompt = [5, 17, 42, 99, 3, 250, 7]
    full = moetandem.load(path, device="cuda", dtype="float32", progress=False)
    want = full.generate([prompt], max_new_tokens=32, stop_on_eos=False)[0].token_ids
    del full
    eng = moetandem.load(path, device="cuda", dtype="float32", progress=False, expert_budget=0.5, policy="auto",
                         miss_compute="host")
    hm = eng.provider.host_misses
    assert hm is not None
    assert eng.generate([prompt], max_new_tokens=32, stop_on_eos=False)[0].token_ids == want
    assert eng.graph_safe and eng.graphs is not None
    assert any(e.graph is not None for e in eng.graphs.entries.values())
    assert not hm.fallen_back and eng.expert_stats()["host_computes"] > 0


def test_the_ops_trace_into_one_graph():
    """publish -> the hits -> collect, compiled with fullgraph (the custom ops' fake shapes and declared epoch
    mutation), gives the eager result, and the traced step publishes (the epoch moves on every call)."""
    ch = channel()
    x, out, w, miss, slots = problem()

    def step(x, out, w, miss, slots):
        hit = hk.host_publish(x, miss, slots, ch.epoch, ch.key, 7)
        return hk.host_collect(out + hit.sum() * 0, w, miss, ch.epoch, ch.key)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for n in (1, 2):
        th = worker(ch)
        y = compiled(x, out, w, miss, slots)
        th.join()
        torch.testing.assert_close(y, want(x, out, w, miss), rtol=1e-6, atol=1e-6)
        assert int(ch.epoch[0]) == n


def test_a_failing_worker_answers_at_once_and_the_committee_falls_back(engine, monkeypatch, caplog):
    """An exception in the worker answers the step at once (nothing for its misses) and flags it, rather than
    leaving the device to spin out its bound."""
    c = host_committee(engine, monkeypatch)
    hm = c.host_misses
    for ch in hm._w.channels:
        ch.max_polls = 1 << 30  # a timeout would take minutes: the answer must come from the worker
    hm._w.rows = {}  # every lookup fails
    layer = engine.store.layers[0]
    x, ids, w = routing(engine, 3)
    with caplog.at_level("WARNING", logger="moetandem.experts"):
        got = c.compute(layer, x, ids, w)
        c.after_step()
    assert hm.fallen_back and "layer" in caplog.text and "failed" in caplog.text
    assert not torch.allclose(got, engine.provider.compute(layer, x, ids, w))
    c.close()


def test_generate_with_host_misses_equals_all_resident(tmp_path, monkeypatch):
    """Through moetandem.load: a committee at half the experts with --miss-compute host (forced on the CPU) decodes
    the all-resident tokens, and the worker computed misses."""
    path = build_checkpoint("mixtral", tmp_path / "m")
    prompt = [5, 17, 42, 99, 3]
    full = moetandem.load(path, device="cpu", progress=False)
    want = full.generate([prompt], max_new_tokens=8, stop_on_eos=False)[0].token_ids
    monkeypatch.setattr("moetandem.experts.committee.maps_experts", lambda *a: True)
    eng = moetandem.load(path, device="cpu", progress=False, expert_budget=0.5, policy="auto", miss_compute="host")
    assert eng.provider.host_misses is not None
    try:
        assert eng.generate([prompt], max_new_tokens=8, stop_on_eos=False)[0].token_ids == want
        assert eng.expert_stats()["host_computes"] > 0 and not eng.provider.host_misses.fallen_back
    finally:
        eng.provider.close()


def test_kernels_compile_for_sm90_with_system_scope_ordering():
    """Without a GPU: Triton's NVIDIA passes and ptxas turn publish's flag store into a release exchange at system
    scope after a CTA barrier, and collect's spin into volatile loads then one acquire load at system scope; also
    for top-1 routing (K = 1, which Triton would specialize as a constant)."""
    triton = pytest.importorskip("triton")
    if INTERPRET:
        pytest.skip("needs triton's compiler (not its interpreter)")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def compile_sm90(kern, types: dict, ce: dict) -> str:
        sig = {n: "constexpr" if n in ce else types[n] for n in kern.arg_names}
        try:
            ck = triton.compile(ASTSource(kern, sig, ce), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        except (RuntimeError, FileNotFoundError) as e:  # no bundled ptxas on this install
            if "ptxas" in str(e).lower():
                pytest.skip(f"no ptxas: {e}")
            raise
        assert ck.asm["cubin"]
        return ck.asm["ptx"]
    ptr = {"x_ptr": "*bf16", "rx_ptr": "*bf16", "out_ptr": "*bf16", "y_ptr": "*bf16", "resp_ptr": "*bf16",
           "w_ptr": "*fp32", "epoch_ptr": "*i64", "flags_ptr": "*i64"}
    types = {n: ptr.get(n, "*i32" if n.endswith("_ptr") else "i32") for n in
             set(hk._publish_kernel.arg_names) | set(hk._collect_kernel.arg_names)}
    for K in (8, 1):
        extra = {"K": 1} if K == 1 else {}
        pub = compile_sm90(hk._publish_kernel, types, {"BLOCK": 1024, "BLOCK_K": K, **extra})
        release = pub.index("atom.global.sys.release.exch.b64")
        assert "bar.sync" in pub[:release]
        col = compile_sm90(hk._collect_kernel, types, {"BLOCK_H": 256, "BLOCK_K": K, **extra})
        spin, acquire = col.index("ld.volatile.global.b64"), col.index("ld.global.sys.acquire.b64")
        assert spin < acquire and "atom.global.sys.relaxed.exch.b32" in col  # the error flag
