"""The cloud decodes k greedy tokens per exchange (split option cloud_decode_tokens, split/decode.py): the tokens
equal single-process generation and per-token exchanges (stop ids mid-exchange, k not dividing the length), the
link carries about ceil(new tokens / k) decode exchanges, sampled requests keep one exchange per token against a
cloud that does not sample (sampling in the cloud: test_split_decode_sample.py) and logprobs always do, a cloud
that dies mid-generation leaves the request to the end, bad values are refused, and the cost model knows it."""
from __future__ import annotations

import dataclasses
import math
import threading

import grpc
import pytest
import torch
from conftest import build_checkpoint
from test_split_head import profile
from test_split_transport import raw  # a Session stream's replies and status, same token

import moetandem
from moetandem.batcher import Batcher
from moetandem.config import CloudBatchConfig, SplitConfig
from moetandem.errors import InvalidRequestError
from moetandem.split import cloud_session
from moetandem.split.cloud import CloudServer
from moetandem.split.plan import baseline_plans, make_split_plan, predict
from moetandem.split.transport.frame import Frame, pack

TOKEN = "t0k3n-for-tests-0123456789abcdef"
PROMPTS = [[5, 17, 42, 9], [3, 1, 4, 1, 5, 9, 2, 6], [7]]
N = 10
CLOUD_ONLY = {"cloud_head_topk": 8, "head": 0, "tail": 0, "micro_batches": 1}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint("qwen2_moe", tmp_path_factory.mktemp("decode"))  # 3 layers, hidden 64, vocab 256


@pytest.fixture(scope="module")
def local(ckpt):
    return moetandem.load(ckpt, device="cpu", progress=False)


@pytest.fixture
def cloud(ckpt, monkeypatch):
    """An in-process cloud that counts the frames it answers by kind."""
    srv = CloudServer(moetandem.load(ckpt, device="cpu", progress=False), TOKEN, max_sessions=4, idle_timeout_s=60)
    srv.frames = {}
    handle = cloud_session.CloudSession.handle

    def counted(self, f):
        srv.frames[f.kind] = srv.frames.get(f.kind, 0) + 1
        return handle(self, f)
    monkeypatch.setattr(cloud_session.CloudSession, "handle", counted)
    srv.port = srv.start("127.0.0.1:0")
    yield srv
    srv.stop(0)


def end_engine(ckpt, port, **kw):
    kw = {"retry_after_s": 0.2, **CLOUD_ONLY, **kw}
    return moetandem.load(ckpt, device="cpu", progress=False, cloud=f"127.0.0.1:{port}", token=TOKEN, split=kw)


def run(eng, n=N, stop_ids=(), prompts=PROMPTS, temperature=0.0, on_step=None):
    """The batcher over `prompts` (stop_ids per prompt): the tokens of each."""
    batcher = Batcher(eng, len(prompts), 64)
    seqs = [eng.make_sequence(p, n, temperature=temperature, seed=7 + i, stop_on_eos=False,
                              stop_ids=stop_ids[i] if stop_ids else ())
            for i, p in enumerate(prompts)]
    events = batcher.add(seqs)
    order = [(seqs.index(s), t) for s, t in events]
    step = 0
    while batcher.active:
        step += 1
        if on_step is not None:
            on_step(step)
        order += [(seqs.index(s), t) for s, t in batcher.step()]
    return [s.out for s in seqs], [s.finish_reason for s in seqs], order


@pytest.mark.parametrize("k", [4, 3])
def test_k_tokens_equal_single_process_and_per_token(ckpt, local, cloud, k):
    ref, _, _ = run(local)
    at = next(i for i in range(2, N - 1) if ref[1][i] not in ref[1][:i])  # a new token mid-generation
    stop = [(), (ref[1][at],), ()]  # the second prompt stops there: inside an exchange (or at its end)
    ref_stop, why, ref_order = run(local, stop_ids=stop)
    assert len(ref_stop[1]) == at + 1 and why == ["length", "stop", "length"]
    per_token = end_engine(ckpt, cloud.port)
    assert run(per_token)[0] == ref and run(per_token, stop_ids=stop)[:2] == (ref_stop, why)
    eng = end_engine(ckpt, cloud.port, cloud_decode_tokens=k)
    assert eng.split.decode_k == k
    assert run(eng)[0] == ref
    assert run(eng, stop_ids=stop) == (ref_stop, why, ref_order)  # the same events in the same order
    s = eng.split.split_stats()
    assert s["local_forwards"] == 0 and s["fallbacks"] == 0
    assert s["decode_exchanges"] == 2 * math.ceil((N - 1) / k)  # the prefill makes the first token
    assert s["decode_tokens"] == sum(map(len, ref)) + sum(map(len, ref_stop)) - 2 * len(PROMPTS)


@pytest.mark.parametrize("rows", [64, 1], ids=["batched", "unbatched"])
def test_ends_decoding_together_share_the_cloud_steps(ckpt, local, rows):
    """Three ends in k mode at once: each decode step of an exchange goes through the cloud's batch runner with the
    other ends' steps (batching on) or alone (off); the tokens are those of one process either way."""
    srv = CloudServer(moetandem.load(ckpt, device="cpu", progress=False), TOKEN,
                      batching=CloudBatchConfig(window_ms=5.0, max_rows=rows))
    port = srv.start("127.0.0.1:0")
    try:
        ends = [end_engine(ckpt, port, cloud_decode_tokens=5) for _ in range(3)]
        out = [None] * 3

        def go(i):
            out[i] = run(ends[i], n=12)[0]
        threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert out == [run(local, n=12)[0]] * 3
        assert [e.split.stats["decode_exchanges"] for e in ends] == [3] * 3  # 11 tokens: 5 + 5 + 1
        if rows > 1:
            assert srv.batch_stats()["exchanges"] >= 3 * (1 + 11)  # the prefills and every step of every end
    finally:
        srv.stop(0)


def test_decode_exchanges_on_the_link(ckpt, cloud):
    counts = {}
    for k in (None, 4):
        eng = end_engine(ckpt, cloud.port, **({"cloud_decode_tokens": k} if k else {}))
        run(eng, prompts=PROMPTS[:2])  # the session and its cache
        mon, before = eng.split.link.monitor, eng.split.link.monitor.exchanges
        cloud.frames.clear()
        run(eng, prompts=PROMPTS[:2])
        counts[k] = mon.exchanges - before - 1  # less the prefill's exchange
        assert cloud.frames.get("decode", 0) == (0 if k is None else counts[k])
    assert counts == {None: N - 1, 4: math.ceil((N - 1) / 4)}


def test_sampled_requests_keep_per_token_exchanges_on_an_older_cloud(ckpt, local, cloud, monkeypatch):
    """A cloud whose hello lacks `decode_sample` gets no sampled rows in decode frames (greedy ones still go)."""
    hello = cloud_session.CloudSession.on_hello

    def older(self, f):
        reply = hello(self, f)
        reply.meta.pop("decode_sample")
        return reply
    monkeypatch.setattr(cloud_session.CloudSession, "on_hello", older)
    per_token = end_engine(ckpt, cloud.port)
    sampled = run(per_token, temperature=0.8)[0]
    eng = end_engine(ckpt, cloud.port, cloud_decode_tokens=4)
    assert run(eng, temperature=0.8)[0] == sampled  # the same seeds draw the same tokens
    s = eng.split.split_stats()
    assert s["decode_exchanges"] == 0 and s["cloud_forwards"] == N and s["fallbacks"] == 0
    # a batch of a greedy and a sampled sequence: every step per token, the greedy one still exact
    batcher = Batcher(eng, 2, 64)
    seqs = [eng.make_sequence(PROMPTS[0], N, stop_on_eos=False),
            eng.make_sequence(PROMPTS[1], N, temperature=0.8, seed=7, stop_on_eos=False)]
    batcher.add(seqs)
    while batcher.active:
        batcher.step()
    assert seqs[0].out == run(local)[0][0] and eng.split.stats["decode_exchanges"] == 0
    assert run(eng)[0] == run(local)[0] and eng.split.stats["decode_exchanges"] == math.ceil((N - 1) / 4)


def test_logprobs_keep_per_token_exchanges(ckpt, cloud):
    """A sequence that wants logprobs keeps its whole batch on per-token exchanges, sampled or not."""
    eng = end_engine(ckpt, cloud.port, cloud_decode_tokens=4)
    for temperature in (0.0, 0.8):
        batcher = Batcher(eng, 2, 64)
        seqs = [eng.make_sequence(p, N, temperature=temperature, seed=3, stop_on_eos=False) for p in PROMPTS[:2]]
        seqs[1].top_logprobs = 2
        batcher.add(seqs)
        while batcher.active:
            batcher.step()
        assert len(seqs[1].logprobs) == N and eng.split.stats["decode_exchanges"] == 0


def test_cloud_killed_mid_generation_finishes_on_end(ckpt, local, cloud):
    ref = run(local, n=24)[0]
    eng = end_engine(ckpt, cloud.port, cloud_decode_tokens=4)

    def on_step(step):
        if step == 3:  # after two 4-token exchanges
            cloud.stop(0)
    assert run(eng, n=24, on_step=on_step)[0] == ref
    s = eng.split.split_stats()
    assert s["decode_exchanges"] == 2 and s["local_forwards"] >= 1 and s["rebuilt_tokens"] > 0


def test_openai_server_in_k_mode(ckpt, local, cloud):
    """The server's scheduler sees several tokens of a sequence from one step: none is cut short."""
    httpx = pytest.importorskip("httpx")
    from moetandem.serve import create_app
    from moetandem.serve.server_thread import ServerThread
    eng = end_engine(ckpt, cloud.port, cloud_decode_tokens=4)
    n = 8  # the prefill's token, then exchanges of 4 and 3 tokens: the last one ends every sequence
    body = {"model": "tiny", "prompt": PROMPTS, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    with ServerThread(create_app(eng, model_id="tiny", max_batch=3)) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as http:
        r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert all(c["finish_reason"] == "length" for c in r.json()["choices"])
    assert r.json()["usage"]["completion_tokens"] == n * len(PROMPTS)
    assert [c["text"].split() for c in r.json()["choices"]] == [list(map(str, t)) for t in run(local, n=n)[0]]
    assert eng.split.stats["decode_exchanges"] > 0 and eng.split.stats["local_forwards"] == 0


def test_option_is_inert_off_the_cloud_only_plan(ckpt, cloud):
    for kw in ({"head": 1, "tail": 0}, {"head": 0, "tail": 1}, {"cloud_head_topk": None}):
        eng = end_engine(ckpt, cloud.port, cloud_decode_tokens=4, **{**CLOUD_ONLY, **kw})
        assert eng.split.decode_k == 0
        run(eng, prompts=PROMPTS[:1], n=4)
        assert eng.split.stats["decode_exchanges"] == 0 and "decode" not in cloud.frames


@pytest.mark.parametrize("k", [0, -2, True, 2.5, "4", 10**6])
def test_bad_k_is_refused(k):
    with pytest.raises(InvalidRequestError, match="--cloud-decode-tokens"):
        SplitConfig("127.0.0.1:1", token="x", cloud_decode_tokens=k)


def test_cloud_checks_decode_frames(cloud):
    hello = pack(Frame("hello", 1, {"fingerprint": cloud.fingerprint}))

    def alloc(start=0, **meta):
        return pack(Frame("alloc", 2, {"cache": 1, "rows": 2, "max_len": 16, "start": start, "end": 3,
                                       "codec": "off", "head_topk": 8, **meta}))

    def decode(k=4, **kw):
        t = {"rows": torch.tensor([0, 1]), "tok": torch.tensor([5, 7]), "pos": torch.tensor([0, 0]),
             "budget": torch.tensor([4, 2]), "stop": torch.full((2, 1), -1), **kw}
        return pack(Frame("decode", 3, {"cache": 1, "k": k}, t))
    replies, code = raw(cloud.port, [hello, alloc(), decode()])
    assert code == grpc.StatusCode.OK and replies[0].meta["decode"] == 1
    out, n = replies[2].tensors["out"], replies[2].tensors["n"]
    assert n.tolist() == [4, 2] and out.shape == (2, 4) and out[1, 2:].tolist() == [-1, -1]
    attacks = {
        "cache without every layer": [hello, alloc(start=1), decode()],
        "k zero": [hello, alloc(), decode(k=0)],
        "row twice": [hello, alloc(), decode(rows=torch.tensor([0, 0]))],
        "token past the vocabulary": [hello, alloc(), decode(tok=torch.tensor([5, 256]))],
        "past max_len": [hello, alloc(), decode(pos=torch.tensor([14, 0]))],
        "budget zero": [hello, alloc(), decode(budget=torch.tensor([0, 2]))],
        "float tokens": [hello, alloc(), decode(tok=torch.tensor([5.0, 7.0]))],
    }
    for name, frames in attacks.items():
        assert raw(cloud.port, frames)[1] == grpc.StatusCode.INVALID_ARGUMENT, name


def test_plan_amortises_the_round_trip_over_k_tokens():
    on = profile(cloud_head_topk=64, rtt_s=0.05, cloud_step_overhead_s=2e-3)
    k8 = dataclasses.replace(on, cloud_decode_tokens=8)
    one, eight = baseline_plans(on, "latency")["cloud-only"], baseline_plans(k8, "latency")["cloud-only"]
    assert one.decode_tokens == 0 and eight.decode_tokens == 8
    assert eight.predicted_latency_s < one.predicted_latency_s / 4  # the RTT is paid once per 8 tokens
    assert eight.round_trips_per_step == pytest.approx(1 / 8)
    assert eight.predicted_throughput_tok_s == pytest.approx(on.concurrency / eight.predicted_latency_s)
    # per token: (round trip + frames + 8 cloud steps) / 8 -- the cloud's step is paid per token
    assert eight.predicted_latency_s > one.predicted_latency_s - on.rtt_s
    best = make_split_plan(k8)
    assert best.decode_tokens == 8 and best.end_layers_head == 0 and best.end_layers_tail == 0
    assert make_split_plan(on).decode_tokens == 0
    again = predict(k8, best, "latency")
    assert again.decode_tokens == 8 and again.predicted_latency_s == pytest.approx(best.predicted_latency_s)
    for c in ("end-only", "naive"):  # the option changes only the cloud-only-with-cloud-head plan
        assert baseline_plans(k8, "latency")[c] == baseline_plans(on, "latency")[c]
    off = dataclasses.replace(k8, cloud_head_topk=0)  # no head in the cloud: the option is ignored
    assert baseline_plans(off, "latency")["cloud-only"].decode_tokens == 0
    with pytest.raises(InvalidRequestError):
        dataclasses.replace(on, cloud_decode_tokens=-1)


def test_cli_flag(ckpt, local, cloud, capsys, tmp_path):
    from moetandem.cli import main
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    args = ["generate", "--model", str(ckpt), "--prompt", "5 17 42", "--max-new-tokens", "6", "--device", "cpu",
            "--cloud", f"127.0.0.1:{cloud.port}", "--token-file", str(token), "--split-head", "0", "--split-tail", "0",
            "--cloud-head-topk", "8"]
    assert main(args + ["--cloud-decode-tokens", "0"]) == 2
    assert "--cloud-decode-tokens" in capsys.readouterr().err
    cloud.frames.clear()
    assert main(args + ["--cloud-decode-tokens", "4"]) == 0
    assert cloud.frames.get("decode", 0) == 2  # 5 decode tokens: 4 + 1


def test_a_k_step_exchange_waits_k_deadlines_within_the_timeout():
    """A decode exchange of k steps does k steps of the cloud's work: its deadline is k per-token deadlines (a loaded
    cloud's replies fell back to the end under the per-token one), capped by the configured timeout."""
    from types import SimpleNamespace

    from moetandem.split.end_decode import decode_deadline_s
    link = SimpleNamespace(opts=SimpleNamespace(timeout_s=2.0), deadline_s=lambda sent: 0.1 + sent / 1e6)
    assert decode_deadline_s(link, 0, 1) == pytest.approx(0.1)
    assert decode_deadline_s(link, 100_000, 8) == pytest.approx(1.6)
    assert decode_deadline_s(link, 0, 64) == 2.0
