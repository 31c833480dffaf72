"""The cloud batches exchanges across ends: decode steps of several sessions on one shared KV cache run as one
forward (rows of different lengths), and each session gets what it would get alone; a failing or cancelled
exchange touches no other; queue depth is still reported; the flags are validated."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import build_checkpoint

import moetandem
from moetandem.cli import main
from moetandem.config import CloudBatchConfig
from moetandem.errors import InvalidRequestError
from moetandem.split.cloud import CloudServer
from moetandem.split.cloud_batch import BatchRunner, Job
from moetandem.split.cloud_cache import CachePools
from moetandem.split.cloud_session import CloudSession
from moetandem.split.transport.frame import Frame

TOKEN = "t0k3n-for-tests-0123456789abcdef"
OFF = CloudBatchConfig(max_rows=1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint("qwen2_moe", tmp_path_factory.mktemp("cloudbatch"))


@pytest.fixture(scope="module")
def engine(ckpt: Path):
    return moetandem.load(ckpt, device="cpu", progress=False)


def cloud(engine, batching: CloudBatchConfig) -> CloudServer:
    return CloudServer(engine, TOKEN, max_sessions=8, idle_timeout_s=60, batching=batching)


def open_session(srv: CloudServer, rows: int, max_len: int, start: int = 1, end: int = 3) -> CloudSession:
    s = CloudSession(srv, "Session")
    s.handle(Frame("hello", meta={"fingerprint": srv.fingerprint}))
    s.handle(Frame("alloc", meta={"cache": 1, "rows": rows, "max_len": max_len, "start": start, "end": end}))
    return s


def layers(pos: torch.Tensor, rows: torch.Tensor, x: torch.Tensor, kv_len: int) -> Frame:
    return Frame("layers", meta={"cache": 1, "kv_len": kv_len}, tensors={"pos": pos, "rows": rows, "x": x})


def concurrently(calls: list) -> list:
    out: list = [None] * len(calls)

    def one(i: int) -> None:
        out[i] = calls[i]()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_decode_steps_of_sessions_run_as_one_forward_and_equal_alone(ckpt: Path, engine, device: str) -> None:
    """Three sessions (2, 1 and 2 rows; prompts of 3, 5 and 7 tokens; kv_len their own) prefill alone, then
    decode together: the cloud runs each step of all three as one forward (the window waits for all sessions of
    the cache) and every reply equals the unbatched cloud's. A fourth session with another max_len has a cache of
    its own and still answers right. On CUDA (bf16, the decode-attention kernel over the shared cache's rows):
    equal within bf16 rounding."""
    tol = 1e-5
    if device == "cuda":
        engine, tol = moetandem.load(ckpt, device="cuda", dtype="bfloat16", progress=False), 2e-2
    H = engine.args.hidden_size
    on, off = cloud(engine, CloudBatchConfig(window_ms=100, max_rows=64)), cloud(engine, OFF)
    shapes = [(2, 3), (1, 5), (2, 7), (1, 4)]  # (rows, prompt length)
    max_lens = [32, 32, 32, 16]
    torch.manual_seed(0)
    sessions = {srv: [open_session(srv, r, m) for (r, _), m in zip(shapes, max_lens)] for srv in (on, off)}
    prompts = [torch.randn(r * n, H) for r, n in shapes]
    steps = [[torch.randn(r, H) for r, _ in shapes] for _ in range(4)]
    got: dict[CloudServer, list[list[torch.Tensor]]] = {}
    for srv, ss in sessions.items():
        got[srv] = []
        for s, (r, n), x in zip(ss, shapes, prompts):  # prefills: alone
            s.handle(layers(torch.arange(n).expand(r, n).contiguous(), torch.arange(r).flip(0), x, n))
        for t, xs in enumerate(steps):
            frames = [layers(torch.full((r, 1), n + t), torch.arange(r).flip(0), x, n + t + 1)
                      for (r, n), x in zip(shapes, xs)]
            got[srv].append([f.tensors["x"] for f in concurrently(
                [lambda s=s, f=f: s.handle(f) for s, f in zip(ss, frames)])])
    for a_step, b_step in zip(got[on], got[off]):
        for a, b in zip(a_step, b_step):
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
    stats = on.batch_stats()
    assert stats["max_exchanges"] == 3 and stats["batched_forwards"] == 4  # each decode step: one forward of 3
    assert stats["rows_leased"] == 6 and off.batch_stats() == {}
    for srv, ss in sessions.items():
        for s in ss:
            s.free_all()
    assert on.batch_stats()["rows_leased"] == 0  # the pools went with their last session
    on.stop(0)


def test_concurrent_ends_get_the_tokens_of_one_process(ckpt: Path, engine) -> None:
    """Four ends (split 1 head + 1 tail layer) generate at once against one batching cloud: each gets the tokens
    of one process, and the cloud ran exchanges of several ends in one forward."""
    prompts = [[5, 17, 42, 9], [3, 1, 4, 1, 5, 9, 2, 6], [7], [2, 7, 1, 8, 2]]
    reference = [engine.generate([p], max_new_tokens=12, stop_on_eos=False)[0].token_ids for p in prompts]
    srv = cloud(engine, CloudBatchConfig(window_ms=20, max_rows=64))
    port = srv.start("127.0.0.1:0")
    ends = [moetandem.load(ckpt, device="cpu", progress=False, cloud=f"127.0.0.1:{port}", token=TOKEN,
                           split={"head": 1, "tail": 1, "retry_after_s": 0.2}) for _ in prompts]
    try:
        out = concurrently([lambda e=e, p=p: e.generate([p], max_new_tokens=12, stop_on_eos=False)[0].token_ids
                            for e, p in zip(ends, prompts)])
        assert out == reference
        assert all(e.split.split_stats()["local_forwards"] == 0 for e in ends)
        stats = srv.batch_stats()
        assert stats["batched_forwards"] > 0 and stats["max_exchanges"] > 1, stats
    finally:
        for e in ends:
            e.split.link.close()
        srv.stop(0)


def test_a_failing_exchange_fails_alone() -> None:
    """A batch that raises runs again job by job: the bad job's stream gets the error, the others their result."""
    runner = BatchRunner(0.2, 64, threading.Lock, threading.Lock)

    def run(jobs: list[Job]) -> list[int]:
        if any(j.payload < 0 for j in jobs):
            raise ValueError("negative")
        return [j.payload * 10 for j in jobs]

    jobs = [Job("k", 1, run, p, peers=3) for p in (1, -1, 2)]
    out = concurrently([lambda j=j: _result(runner, j) for j in jobs])
    assert out == [10, "ValueError", 20]
    assert runner.snapshot()["max_exchanges"] == 3  # they were one batch first
    runner.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        runner.submit(Job("k", 1, run, 1))


def _result(runner: BatchRunner, job: Job) -> object:
    try:
        return runner.submit(job)
    except ValueError as e:
        return type(e).__name__


def test_cancelled_session_keeps_its_rows_until_its_exchange_is_done(engine) -> None:
    """A stream closed while its exchange computes returns its rows only when the exchange is done; a later
    lease of the same rows starts from zeros, and the others' rows are untouched."""
    pools = CachePools(engine.args, torch.device("cpu"), torch.float32, shared=True)
    a, b = pools.lease(1, 3, 8, 2, owner="a"), pools.lease(1, 3, 8, 1, owner="b")
    assert a.pool is b.pool and a.slots.tolist() == [0, 1] and b.slots.tolist() == [2]
    assert pools.peers(a) == 2
    k = a.pool.cache.layers[1][0]  # [rows, max_len, nKV, D]
    k.fill_(1.0)
    with pools.hold(a):
        pools.release(a)  # the stream went away mid-exchange
        c = pools.lease(1, 3, 8, 2, owner="c")
        assert set(c.slots.tolist()).isdisjoint(a.slots.tolist())  # grew instead
    assert pools.peers(b) == 2
    d = pools.lease(1, 3, 8, 2, owner="d")  # now a's rows are free again
    assert sorted(d.slots.tolist()) == [0, 1]
    k = d.pool.cache.layers[1][0]
    assert bool((k[d.slots] == 0).all()) and bool((k[b.slots] == 1).all())  # zeroed for d, b's kept (grown copy)


def test_queue_depth_counts_exchanges_waiting_for_a_batch(engine) -> None:
    """While the compute lock is held, three sessions' decode steps wait in one batch: the queue is 3 and each
    reply reports how many were ahead of it."""
    H = engine.args.hidden_size
    srv = cloud(engine, CloudBatchConfig(window_ms=0, max_rows=64))
    srv.compute_lock = threading.Lock()  # as a committee cloud: the batch runner takes it
    ss = [open_session(srv, 1, 16) for _ in range(3)]
    for s in ss:
        s.handle(layers(torch.arange(2)[None], torch.tensor([0]), torch.randn(2, H), 2))
    with srv.compute_lock:
        replies: list = []
        threads = [threading.Thread(target=lambda s=s: replies.append(s.handle(
            layers(torch.tensor([[2]]), torch.tensor([0]), torch.randn(1, H), 3)))) for s in ss]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while srv.queue_depth < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.queue_depth == 3
    for t in threads:
        t.join(timeout=30)
    assert sorted(r.meta.get("queue", 0) for r in replies) == [0, 1, 2]
    assert srv.queue_depth == 0
    srv.stop(0)


def test_expert_calls_of_one_layer_queued_together_run_as_one(engine) -> None:
    """Experts frames of three ends that queue while the cloud is busy run as one expert call, each reply the
    provider's result for its own rows."""
    H, E = engine.args.hidden_size, engine.args.num_experts
    srv = cloud(engine, CloudBatchConfig(window_ms=0, max_rows=64))
    srv.compute_lock = threading.Lock()
    ss = [CloudSession(srv, "Experts") for _ in range(3)]
    torch.manual_seed(1)
    frames = []
    for s, T in zip(ss, (3, 1, 5)):
        s.handle(Frame("hello", meta={"fingerprint": srv.fingerprint}))
        ids = torch.stack([torch.randperm(E)[:2] for _ in range(T)])  # [T, 2]
        frames.append(Frame("experts", meta={"layer": 0}, tensors={"x": torch.randn(T, H), "ids": ids,
                                                                    "w": torch.rand(T, 2)}))
    with srv.compute_lock:
        replies: list = [None] * 3
        threads = [threading.Thread(target=lambda i=i: replies.__setitem__(i, ss[i].handle(frames[i])))
                   for i in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while srv.runner.queued() < 2 and time.monotonic() < deadline:  # one is taken, blocked on the lock
            time.sleep(0.01)
    for t in threads:
        t.join(timeout=30)
    with torch.inference_mode():
        for f, r in zip(frames, replies):
            want = engine.provider.compute(0, f.tensors["x"], f.tensors["ids"], f.tensors["w"])
            torch.testing.assert_close(r.tensors["y"], want, rtol=1e-5, atol=1e-5)
    assert srv.batch_stats()["max_exchanges"] >= 2
    srv.stop(0)


def test_batching_flags_are_validated(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    assert main(["cloud", "--token-file", str(token), "--batch-max-rows", "0"]) == 2
    assert "--batch-max-rows" in capsys.readouterr().err
    assert main(["cloud", "--token-file", str(token), "--batch-window-ms", "500"]) == 2
    assert "--batch-window-ms 500" in capsys.readouterr().err
    with pytest.raises(InvalidRequestError, match="--batch-window-ms"):
        CloudBatchConfig(window_ms=-1)
    assert not CloudBatchConfig(max_rows=1).enabled and CloudBatchConfig().enabled
