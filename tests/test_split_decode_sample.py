"""Sampled sequences in k-token decode exchanges (split/decode.py): the cloud draws each seeded row's tokens as the
end would from its top-K reply, with the row's generator state shipped up and back, so the tokens (and the
generators' final states) equal per-token exchanges, also across a fallback mid-generation; unseeded rows use the
cloud's RNG; bad sampling tensors are refused."""
from __future__ import annotations

import math

import grpc
import pytest
import torch
from conftest import build_checkpoint
from test_split_decode import PROMPTS, TOKEN, end_engine
from test_split_transport import raw  # a Session stream's replies and status, same token

import moetandem
from moetandem.batcher import Batcher
from moetandem.split.cloud import CloudServer
from moetandem.split.decode import generator_state_bytes, read_reply_states
from moetandem.split.transport.frame import Frame, FrameError, pack

N = 14
#: one greedy row and two seeded sampled rows of other prompt lengths
MIXED = [dict(), dict(temperature=0.8, top_p=0.9, seed=11), dict(temperature=0.8, top_p=0.9, seed=12)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint("qwen2_moe", tmp_path_factory.mktemp("sample"))  # 3 layers, hidden 64, vocab 256


def start_cloud(ckpt):
    srv = CloudServer(moetandem.load(ckpt, device="cpu", progress=False), TOKEN, max_sessions=4, idle_timeout_s=60)
    srv.port = srv.start("127.0.0.1:0")
    return srv


@pytest.fixture
def cloud(ckpt):
    srv = start_cloud(ckpt)
    yield srv
    srv.stop(0)


def run(eng, kinds=MIXED, n=N, stop_ids=(), on_step=None):
    """The batcher over PROMPTS, sequence i sampled as kinds[i]: (tokens, finish reasons, generator states)."""
    batcher = Batcher(eng, len(PROMPTS), 64)
    seqs = [eng.make_sequence(p, n, stop_on_eos=False, stop_ids=stop_ids[i] if stop_ids else (), **kinds[i])
            for i, p in enumerate(PROMPTS)]
    batcher.add(seqs)
    step = 0
    while batcher.active:
        step += 1
        if on_step is not None:
            on_step(step)
        batcher.step()
    states = [None if s.generator is None else s.generator.get_state() for s in seqs]
    return [s.out for s in seqs], [s.finish_reason for s in seqs], states


def same_states(a, b):
    return all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("k", [4, 3])
def test_seeded_sampling_in_k_token_exchanges_equals_per_token(ckpt, cloud, k):
    per_token = end_engine(ckpt, cloud.port)
    ref, _, ref_states = run(per_token)
    greedy = run(per_token, kinds=[dict()] * 3)[0]
    assert ref[0] == greedy[0] and ref[1] != greedy[1] and ref[2] != greedy[2]  # the sampling shows
    eng = end_engine(ckpt, cloud.port, cloud_decode_tokens=k)
    out, _, states = run(eng)
    assert out == ref and same_states(states, ref_states)  # the streams went on where the cloud left them
    s = eng.split.split_stats()
    assert s["decode_exchanges"] == math.ceil((N - 1) / k) and s["decode_tokens"] == 3 * (N - 1)
    assert s["cloud_forwards"] == 1 and s["local_forwards"] == 0 and s["fallbacks"] == 0  # only the prefill
    # a sampled row stops at a stop id inside an exchange, the others go on
    at = next(i for i in range(2, N - 1) if ref[1][i] not in ref[1][:i])
    stop = [(), (ref[1][at],), ()]
    ref_stop = run(per_token, stop_ids=stop)
    assert ref_stop[1] == ["length", "stop", "length"] and len(ref_stop[0][1]) == at + 1
    got = run(eng, stop_ids=stop)
    assert got[:2] == ref_stop[:2] and same_states(got[2], ref_stop[2])


def test_unseeded_rows_sample_in_the_cloud(ckpt, cloud):
    eng = end_engine(ckpt, cloud.port, cloud_decode_tokens=4)
    out, why, _ = run(eng, kinds=[dict(temperature=1.0)] * 3)
    assert why == ["length"] * 3 and all(len(t) == N and all(0 <= x < 256 for x in t) for t in out)
    assert eng.split.split_stats()["decode_exchanges"] == math.ceil((N - 1) / 4)


def test_fallback_mid_generation_keeps_the_per_token_stream(ckpt):
    """The cloud dies after 9 tokens of each sequence: the end goes on from the generator states of the last
    exchange received, as per-token exchanges whose cloud died at the same token do."""
    def killed(k, at_step):
        srv = start_cloud(ckpt)
        try:
            eng = end_engine(ckpt, srv.port, **({"cloud_decode_tokens": k} if k else {}))
            got = run(eng, n=24, on_step=lambda step: step == at_step and srv.stop(0))
            return got, eng.split.split_stats()
        finally:
            srv.stop(0)
    ref, _ = killed(None, 9)  # the prefill's token and 8 single steps
    got, s = killed(4, 3)  # the prefill's token and two 4-token exchanges
    assert got[0] == ref[0] and got[1] == ["length"] * 3 and same_states(got[2], ref[2])
    assert s["decode_exchanges"] == 2 and s["local_forwards"] >= 1 and s["rebuilt_tokens"] > 0


def test_cloud_checks_sampling_tensors(cloud):
    hello = pack(Frame("hello", 1, {"fingerprint": cloud.fingerprint}))
    alloc = pack(Frame("alloc", 2, {"cache": 1, "rows": 2, "max_len": 16, "start": 0, "end": 3, "codec": "off",
                                    "head_topk": 8}))
    state = torch.Generator().manual_seed(5).get_state()

    def decode(meta=None, **kw):
        t = {"rows": torch.tensor([0, 1]), "tok": torch.tensor([5, 7]), "pos": torch.tensor([0, 0]),
             "budget": torch.tensor([4, 2]), "stop": torch.full((2, 1), -1),
             "temp": torch.tensor([0.8, 0.0], dtype=torch.float64),
             "top_p": torch.tensor([0.9, 1.0], dtype=torch.float64),
             "gen_at": torch.tensor([0]), "gen": state[None], **kw}
        m = {"cache": 1, "k": 4, "dtype": "float32", **(meta or {})}
        return pack(Frame("decode", 3, {n: v for n, v in m.items() if v is not None},
                          {n: v for n, v in t.items() if v is not None}))
    replies, code = raw(cloud.port, [hello, alloc, decode()])
    assert code == grpc.StatusCode.OK and replies[0].meta["decode_sample"] == generator_state_bytes()
    r = replies[2].tensors
    assert r["n"].tolist() == [4, 2] and r["gen"].shape == (1, state.numel()) and r["gen"].dtype == torch.uint8
    assert not torch.equal(r["gen"][0], state)  # four draws later
    bad = {
        "negative temperature": decode(temp=torch.tensor([-0.5, 0.0], dtype=torch.float64)),
        "NaN temperature": decode(temp=torch.tensor([math.nan, 0.0], dtype=torch.float64)),
        "infinite temperature": decode(temp=torch.tensor([math.inf, 0.0], dtype=torch.float64)),
        "top_p zero": decode(top_p=torch.tensor([0.0, 1.0], dtype=torch.float64)),
        "top_p above one": decode(top_p=torch.tensor([1.5, 1.0], dtype=torch.float64)),
        "temp per row missing": decode(temp=torch.tensor([0.8], dtype=torch.float64)),
        "integer temperatures": decode(temp=torch.tensor([1, 0])),
        "top_p missing": decode(top_p=None),
        "state too short": decode(gen=state[None, :-1]),
        "state not uint8": decode(gen=state[None].to(torch.int16)),
        "state without its row": decode(gen_at=None),
        "row index past the frame": decode(gen_at=torch.tensor([2])),
        "two states, one row": decode(gen_at=torch.tensor([0, 0]), gen=torch.stack([state, state])),
        "not a generator state": decode(gen=torch.zeros(1, state.numel(), dtype=torch.uint8)),
        "no logits dtype": decode(meta={"dtype": None}),
        "logits dtype not allowed": decode(meta={"dtype": "int8"}),
    }
    for name, frame in bad.items():
        assert raw(cloud.port, [hello, alloc, frame])[1] == grpc.StatusCode.INVALID_ARGUMENT, name


def test_end_checks_the_states_it_gets_back():
    """A reply's states are all loadable before the end sets any (a bad one: FrameError, the step falls back)."""
    good = torch.Generator().manual_seed(1).get_state()
    reply = Frame("reply", tensors={"gen": torch.stack([good, good])})
    assert all(torch.equal(s, good) for s in read_reply_states(reply, 2)) and read_reply_states(Frame("reply"), 0) == []
    for gen in (None, good[None], torch.stack([good, good])[:, :-1], torch.stack([good, torch.zeros_like(good)])):
        with pytest.raises(FrameError):
            read_reply_states(Frame("reply", tensors={} if gen is None else {"gen": gen}), 2)
