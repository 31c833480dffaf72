"""The LM head in the cloud (split option cloud_head_topk, split/logits.py): greedy tokens equal the end's own head,
the down-link carries K logits per token instead of a hidden state, fill-only catch-up frames get no head, the
cost model stops charging the end's head, and a bad K is refused with what to pass."""
from __future__ import annotations

import dataclasses
import time

import grpc
import pytest
import torch
from conftest import build_checkpoint
from test_split_transport import raw  # a Session stream's replies and status, same token

import moetandem
from moetandem.batcher import Batcher
from moetandem.errors import CloudError, InvalidRequestError
from moetandem.split import cloud_session
from moetandem.split.cloud import CloudServer
from moetandem.split.connect import Placement
from moetandem.split.logits import dense_logits, pack_topk, topk_bytes, unpack_topk
from moetandem.split.plan import SplitProfile, baseline_plans, make_split_plan, predict
from moetandem.split.transport.frame import Frame, pack

TOKEN = "t0k3n-for-tests-0123456789abcdef"
PROMPTS = [[5, 17, 42, 9], [3, 1, 4, 1, 5, 9, 2, 6], [7]]
K = 8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint("qwen2_moe", tmp_path_factory.mktemp("head"))  # 3 layers, hidden 64, vocab 256


@pytest.fixture(scope="module")
def reference(ckpt):
    eng = moetandem.load(ckpt, device="cpu", progress=False)
    return [g.token_ids for g in eng.generate(PROMPTS, max_new_tokens=10, stop_on_eos=False)]


@pytest.fixture
def cloud(ckpt, monkeypatch):
    """An in-process cloud that counts its `layers` frames by their "out" meta and its LM head's rows."""
    srv = CloudServer(moetandem.load(ckpt, device="cpu", progress=False), TOKEN, max_sessions=4, idle_timeout_s=60)
    srv.frames, srv.head_rows = {}, 0
    on_layers, pack = cloud_session.CloudSession.on_layers, cloud_session.pack_topk

    def counted(self, f):
        kind = f.meta.get("out", "hidden")
        srv.frames[kind] = srv.frames.get(kind, 0) + 1
        reply = on_layers(self, f)
        assert kind != "none" or not reply.tensors  # fill-only: nothing goes down
        return reply

    def packed(logits, k):
        srv.head_rows += logits.shape[0]
        return pack(logits, k)
    monkeypatch.setattr(cloud_session.CloudSession, "on_layers", counted)
    monkeypatch.setattr(cloud_session, "pack_topk", packed)
    srv.port = srv.start("127.0.0.1:0")
    yield srv
    srv.stop(0)


def end_engine(ckpt, port, **kw):
    kw.setdefault("retry_after_s", 0.2)
    return moetandem.load(ckpt, device="cpu", progress=False, cloud=f"127.0.0.1:{port}", token=TOKEN, split=kw)


def generate(eng, prompts=PROMPTS, n=10):
    return [g.token_ids for g in eng.generate(prompts, max_new_tokens=n, stop_on_eos=False)]


def test_topk_pack_round_trip_keeps_the_argmax_first():
    logits = torch.randn(5, 256)
    logits[1, 7] = logits[1, 200] = logits[1].max() + 1  # a tie: greedy takes the lower id
    logits[2, :] = 0.5  # every id ties: the lowest still comes first
    logits[3, 10], logits[3, 11] = 3.0, 3.0 - 1e-6  # equal once rounded to float16
    frame = pack_topk(logits, K)
    assert frame["top_v"].dtype == torch.float16 and frame["top_i"].dtype == torch.int32
    assert sum(t.numel() * t.element_size() for t in frame.values()) == 5 * topk_bytes(K) == 5 * K * 6
    dense = unpack_topk(frame, 5, K, 256, torch.float32, torch.device("cpu"))
    assert torch.equal(dense.argmax(-1), logits.argmax(-1))
    assert torch.isinf(dense).sum(-1).tolist() == [256 - K] * 5  # -inf outside the top K
    top = logits.topk(K, -1).values
    assert torch.allclose(dense.topk(K, -1).values, top, rtol=1e-3, atol=1e-3)
    valid = torch.tensor([[True], [False], [True]])
    z = dense_logits(pack_topk(logits[:2], K), valid, False, 3, K, 256, torch.float32, torch.device("cpu"))
    assert z.shape == (3, 1, 256) and torch.equal(z[1], torch.zeros(1, 256))
    with pytest.raises(Exception, match="vocabulary"):
        unpack_topk({**frame, "top_i": frame["top_i"] + 300}, 5, K, 256, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("cut", [{"head": 0, "tail": 0}, {"head": 1, "tail": 0},
                                 {"head": 2, "tail": 0, "micro_batches": 2, "codec": "fp16"}])
def test_cloud_head_greedy_equals_the_end_head(ckpt, reference, cloud, cut):
    eng = end_engine(ckpt, cloud.port, cloud_head_topk=K, **{"micro_batches": 1, **cut})
    assert eng.split.head_k == K
    assert generate(eng) == reference
    s = eng.split.split_stats()
    assert s["cloud_forwards"] == 10 and s["local_forwards"] == 0 and s["fallbacks"] == 0
    # every step sampled from the cloud's logits: one prefill row per prompt, then one row per decode token
    assert cloud.frames.get("topk", 0) >= 10 and cloud.frames.get("hidden", 0) == 0
    assert cloud.head_rows == 3 * 10


def test_option_is_inert_with_end_tail_layers(ckpt, reference, cloud):
    eng = end_engine(ckpt, cloud.port, cloud_head_topk=K, head=1, tail=1)
    assert eng.split.head_k == 0 and generate(eng) == reference
    assert cloud.frames.get("topk", 0) == 0 and cloud.head_rows == 0


def test_down_link_carries_k_logits_per_token(ckpt, cloud):
    per_token = {}
    for k in (0, K):
        eng = end_engine(ckpt, cloud.port, head=0, tail=0, micro_batches=1, **({"cloud_head_topk": k} if k else {}))
        mon = eng.split.link.monitor
        generate(eng, PROMPTS[:1], 1)  # prefill: the session and its cache
        before = mon.bytes_received
        generate(eng, PROMPTS[:1], 9)  # one prefill + 8 decode frames of one token each
        after_prefill = mon.bytes_received - before
        before = mon.bytes_received
        generate(eng, PROMPTS[:1], 1)
        per_token[k] = (after_prefill - (mon.bytes_received - before)) / 8  # the decode frames alone
    H = 64
    assert per_token[0] >= 4 * H  # float32 hidden states (codec off) + the frame's header
    frame = pack(Frame("reply", id=2**20, meta={"server_s": 1e-3},  # a 3-byte id: ours are less
                       tensors=pack_topk(torch.zeros(1, 256), K)))
    header = len(frame) - K * 6
    assert header < 64 and per_token[K] <= K * 6 + header and per_token[K] < 0.4 * per_token[0]


def test_catch_up_frames_compute_no_head(ckpt, cloud):
    """The link drops mid-generation: steps run on the end, then the cloud's K/V are refilled over several steps
    (fill-only frames, out "none": no head, nothing down) before decode moves back; the tokens stay the same."""
    ref = [g.token_ids for g in moetandem.load(ckpt, device="cpu", progress=False).generate(
        PROMPTS, max_new_tokens=40, stop_on_eos=False)]
    eng = end_engine(ckpt, cloud.port, cloud_head_topk=K, head=0, tail=0, micro_batches=1)
    split = eng.split
    split.catch_up_tokens = 6
    batcher = Batcher(eng, 3, 128)
    seqs = [eng.make_sequence(p, 40, stop_on_eos=False) for p in PROMPTS]
    batcher.add(seqs)
    step = 0
    while batcher.active:
        batcher.step()
        step += 1
        if step == 5:
            split.link.lost(CloudError("test: link dropped"))
        time.sleep(0.03)
    assert [s.out for s in seqs] == ref
    s = split.split_stats()
    assert s["local_forwards"] >= 1 and s["catch_up_steps"] >= 1 and s["cloud_forwards"] > 5
    assert cloud.frames.get("none", 0) >= 2 and cloud.frames.get("hidden", 0) == 0
    assert cloud.head_rows == 3 + 3 * (s["cloud_forwards"] - 1)  # heads only for the steps that sampled


def test_bad_k_is_refused_with_what_to_pass(ckpt, cloud, capsys, tmp_path):
    with pytest.raises(InvalidRequestError, match=r"1\.\.256"):
        end_engine(ckpt, cloud.port, cloud_head_topk=257, head=0, tail=0)
    with pytest.raises(InvalidRequestError, match="integer >= 1"):
        end_engine(ckpt, cloud.port, cloud_head_topk=0, head=0, tail=0)
    from moetandem.cli import main
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    args = ["generate", "--model", str(ckpt), "--prompt", "5 17 42", "--max-new-tokens", "3", "--device", "cpu",
            "--cloud", f"127.0.0.1:{cloud.port}", "--token-file", str(token), "--split-head", "0", "--split-tail", "0"]
    assert main(args + ["--cloud-head-topk", "100000"]) == 2
    assert "--cloud-head-topk" in capsys.readouterr().err
    assert main(args + ["--cloud-head-topk", "-3"]) == 2
    assert "--cloud-head-topk" in capsys.readouterr().err
    assert main(args + ["--cloud-head-topk", "4"]) == 0
    assert cloud.head_rows >= 3


def profile(**kw) -> SplitProfile:
    L, E = 4, 8
    base = dict(num_layers=L, num_experts=E, top_k=2, hidden_size=2048, end_layer_s=[5e-3] * L,
                cloud_layer_s=[1e-4] * L, end_expert_s=1e-3, cloud_expert_s=1e-5, expert_bytes=10**6,
                end_expert_budget=10**6 * E * L // 4, routing_freq=[[2 / E] * E for _ in range(L)],
                bandwidth_bps=12.5e6, rtt_s=0.02, end_head_s=25e-3, cloud_head_s=1e-4, frame_bytes=40,
                row_bytes=16)
    return SplitProfile(**{**base, **kw})  # type: ignore[arg-type]


def test_plan_drops_the_end_head_cost():
    off, on = profile(), profile(cloud_head_topk=64)
    b_off, b_on = baseline_plans(off, "latency"), baseline_plans(on, "latency")
    saved = b_off["cloud-only"].predicted_latency_s - b_on["cloud-only"].predicted_latency_s
    link = (2048 * 2 - 64 * 6) / off.bandwidth_bps  # fewer bytes down too
    assert saved == pytest.approx(off.end_head_s + link, rel=1e-6)  # the cloud paid its head to embed already
    # one end layer first (a = 1, b = 0): the cloud now pays its head, the end no longer
    cut = Placement(1, 0, None, None, 1)
    saved = predict(off, cut, "latency").predicted_latency_s - predict(on, cut, "latency").predicted_latency_s
    assert saved == pytest.approx(off.end_head_s - off.cloud_head_s + link, rel=1e-6)
    assert saved > 0.9 * off.end_head_s
    fixed = dataclasses.replace(on, cloud_head_fixed_s=1e-3)  # the cloud's head per step, charged only when it runs
    assert predict(fixed, cut, "latency").predicted_latency_s == pytest.approx(
        predict(on, cut, "latency").predicted_latency_s + 1e-3, rel=1e-9)
    assert baseline_plans(dataclasses.replace(off, cloud_head_fixed_s=1e-3), "latency") == b_off
    assert b_on["cloud-only"].predicted_bytes_per_token == pytest.approx(
        b_off["cloud-only"].predicted_bytes_per_token - 2048 * 2 + 64 * 6)
    # the baselines with end tail layers do not change; the search's best plan gains the head's cost
    for c in ("end-only", "naive"):
        assert b_on[c] == b_off[c]
    p_off, p_on = make_split_plan(off), make_split_plan(on)  # an end 1.2x slower than cloud-only, head 25 ms
    assert p_off.label == "cloud-only" and p_on.end_layers_tail == 0
    assert p_on.predicted_latency_s < p_off.predicted_latency_s - 0.9 * off.end_head_s
    # predict() of the same plan under the option agrees with the search
    again = predict(on, p_on, "latency")
    assert again.predicted_latency_s == pytest.approx(p_on.predicted_latency_s, rel=1e-9)
    with pytest.raises(InvalidRequestError):
        dataclasses.replace(off, cloud_head_topk=-1)


def test_cloud_checks_head_frames(cloud):
    hello = pack(Frame("hello", 1, {"fingerprint": cloud.fingerprint}))

    def alloc(end=3, **meta):
        return pack(Frame("alloc", 2, {"cache": 1, "rows": 2, "max_len": 16, "start": 2, "end": end, "codec": "off",
                                       **meta}))

    def layers(out="topk", **kw):
        return pack(Frame("layers", 3, {"cache": 1, "kv_len": 4, **({"out": out} if out else {})},
                          {"pos": torch.tensor([[3]]), "rows": torch.tensor([0]), "x": torch.randn(1, 64), **kw}))
    replies, code = raw(cloud.port, [hello, alloc(head_topk=K), layers(), layers("none"), layers(None)])
    assert code == grpc.StatusCode.OK
    assert replies[2].tensors["top_v"].shape == (1, K) and replies[2].tensors["top_i"].dtype == torch.int32
    assert not replies[3].tensors and replies[4].tensors["x"].shape == (1, 64)  # fill-only; hidden states
    attacks = {
        "head short of the last layer": [hello, alloc(end=2, head_topk=K)],
        "K past the vocabulary": [hello, alloc(head_topk=300)],
        "K not an integer": [hello, alloc(head_topk="8")],
        "topk on a cache without a head": [hello, alloc(), layers()],
        "unknown out": [hello, alloc(head_topk=K), layers("logits")],
        "last out of range": [hello, alloc(head_topk=K), layers(last=torch.tensor([1]))],
        "last without topk": [hello, alloc(head_topk=K), layers(None, last=torch.tensor([0]))],
    }
    for name, frames in attacks.items():
        assert raw(cloud.port, frames)[1] == grpc.StatusCode.INVALID_ARGUMENT, name
