"""Split execution end to end: an in-process (or subprocess) cloud on 127.0.0.1, ends attached to it."""
from __future__ import annotations

import time

import pytest
import torch
from cloud_process import kill_cloud, start_cloud
from conftest import build_checkpoint

import moetandem
from moetandem.batcher import Batcher
from moetandem.models import KVCache
from moetandem.split.cloud import CloudServer

TOKEN = "t0k3n-for-tests-0123456789abcdef"
PROMPTS = [[5, 17, 42, 9], [3, 1, 4, 1, 5, 9, 2, 6], [7]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # qwen2_moe: shared expert, a dense layer (1) between MoE layers 0 and 2
    return build_checkpoint("qwen2_moe", tmp_path_factory.mktemp("split"))


@pytest.fixture(scope="module")
def reference(ckpt):
    eng = moetandem.load(ckpt, device="cpu", progress=False)
    return [g.token_ids for g in eng.generate(PROMPTS, max_new_tokens=10, stop_on_eos=False)]


@pytest.fixture
def cloud(ckpt):
    srv = CloudServer(moetandem.load(ckpt, device="cpu", progress=False), TOKEN, max_sessions=4,
                      idle_timeout_s=60)
    srv.port = srv.start("127.0.0.1:0")
    yield srv
    srv.stop(0)


def end_engine(ckpt, port, **kw):
    kw.setdefault("retry_after_s", 0.2)
    eng = moetandem.load(ckpt, device="cpu", progress=False, cloud=f"127.0.0.1:{port}", token=TOKEN, split=kw)
    return eng, eng.split


def generate(eng, **kw):
    return [g.token_ids for g in eng.generate(PROMPTS, max_new_tokens=10, stop_on_eos=False, **kw)]


def test_layer_pieces_equal_forward(ckpt):
    eng = moetandem.load(ckpt, device="cpu", progress=False)
    m, L = eng.model, eng.args.num_layers
    ids = torch.tensor([[5, 17, 42, 9], [3, 1, 0, 0]])
    pos = torch.arange(4).expand(2, 4)
    valid = torch.tensor([[True] * 4, [True, True, False, False]])
    rows = torch.tensor([2, 0])
    with torch.inference_mode():
        want = m(ids, pos, KVCache(m.args, 3, 16, torch.device("cpu"), torch.float32), 4, eng.experts, valid,
                 rows=rows)
        cache = KVCache(m.args, 3, 16, torch.device("cpu"), torch.float32)
        x = m.embed(ids)
        for a, b in [(0, 1), (1, 2), (2, L)]:
            x = m.forward_layers(x, pos, cache, 4, a, b, eng.experts, valid, rows)
        got = m.head(x)
    assert torch.equal(want, got)


@pytest.mark.parametrize("cut", [{"head": 1, "tail": 1}, {"head": 0, "tail": 0}, {"head": 2, "tail": 0},
                                 {"head": 0, "tail": 1, "micro_batches": 1},
                                 {"head": 1, "tail": 1, "cloud_experts": {0: [0, 1, 2, 3], 2: [5, 6, 7]}},
                                 {"head": 3, "tail": 0, "cloud_experts": {0: [1, 3, 5, 7], 2: [0, 2]}}])
def test_split_equals_single_process(ckpt, reference, cloud, cut):
    eng, split = end_engine(ckpt, cloud.port, micro_batches=cut.pop("micro_batches", 2), **cut)
    assert generate(eng) == reference
    s = split.split_stats()
    assert s["fallbacks"] == 0 and s["link_losses"] == 0
    if split.start < split.end:
        assert s["cloud_forwards"] == 10 and s["local_forwards"] == 0
    if split.experts.remote:
        assert s["expert_rows_cloud"] > 0
    assert s["bytes_sent"] == cloud.stats.bytes_in and s["bytes_received"] == cloud.stats.bytes_out


def test_serve_stack_runs_on_split(ckpt, reference, cloud):
    eng, split = end_engine(ckpt, cloud.port)
    batcher = Batcher(eng, 2, 64)  # continuous batching: rows reused, sequences join while others decode
    seqs = [eng.make_sequence(p, 10, stop_on_eos=False) for p in PROMPTS]
    batcher.add(seqs[:2])
    while batcher.active or seqs[2].slot < 0:
        if seqs[2].slot < 0 and batcher.free_slots():
            batcher.add([seqs[2]])
        batcher.step()
    assert [s.out for s in seqs] == reference
    assert split.stats["local_forwards"] == 0


def test_cloud_killed_mid_generation_finishes_on_end(ckpt, reference, cloud):
    eng, split = end_engine(ckpt, cloud.port, head=1, tail=1)
    n = 0

    def on_token(i, tok):
        nonlocal n
        n += 1
        if n == 9:  # third decode step
            cloud.stop(0)
    assert generate(eng, on_token=on_token) == reference
    s = split.split_stats()
    assert s["cloud_forwards"] >= 2 and s["local_forwards"] >= 1 and s["rebuilt_tokens"] > 0


def test_cloud_process_killed(ckpt, reference, tmp_path):
    token = tmp_path / "token"
    token.write_text(TOKEN)
    proc, info = start_cloud(ckpt, token)
    try:
        port = info["listening"]
        eng, split = end_engine(ckpt, port, head=1, tail=1, cloud_experts={2: [0, 1, 2, 3]})
        n = 0

        def on_token(i, tok):
            nonlocal n
            n += 1
            if n == 12:
                proc.kill()
                proc.wait()
        assert generate(eng, on_token=on_token) == reference
        assert split.stats["local_forwards"] >= 1 and split.link.losses >= 1
    finally:
        kill_cloud(proc)


def test_idle_session_expires_and_end_reconnects(ckpt, reference):
    srv = CloudServer(moetandem.load(ckpt, device="cpu", progress=False), TOKEN, idle_timeout_s=1.0)
    port = srv.start("127.0.0.1:0")
    try:
        eng, split = end_engine(ckpt, port)
        assert generate(eng) == reference and srv.active_sessions >= 1
        deadline = time.monotonic() + 10
        while srv.active_sessions and time.monotonic() < deadline:
            time.sleep(0.1)
        assert srv.active_sessions == 0  # session state freed
        before = split.stats["cloud_forwards"]
        assert generate(eng) == reference
        assert split.link.epoch >= 2 and split.stats["cloud_forwards"] >= before + 9  # a new session served it
    finally:
        srv.stop(0)


def test_session_limits(ckpt, reference):
    from moetandem.errors import CloudError
    from moetandem.split.link import CloudLink, LinkOptions
    srv = CloudServer(moetandem.load(ckpt, device="cpu", progress=False), TOKEN, max_sessions=1,
                      max_session_bytes=1000)  # too small for any KV cache: every alloc is refused
    port = srv.start("127.0.0.1:0")
    links = [CloudLink(LinkOptions(f"127.0.0.1:{port}", TOKEN, retries=1), srv.fingerprint) for _ in range(2)]
    try:
        links[0].connect()
        with pytest.raises(CloudError, match="RESOURCE_EXHAUSTED"):
            links[1].connect()  # one session at most
        links[0].close()
        deadline = time.monotonic() + 10
        while srv.active_sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        links[1].connect()
        links[1].close()
        while srv.active_sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        eng, split = end_engine(ckpt, port, retries=1)
        assert generate(eng) == reference  # KV refused -> computed on the end, nothing lost
        assert split.stats["cloud_forwards"] == 0 and split.stats["fallbacks"] >= 1
    finally:
        srv.stop(0)


def test_pipelining_overlaps_micro_batches(ckpt, cloud):
    one_way = 0.5  # emulated on the end's sends only (the cloud fixture adds none)
    eng, split = end_engine(ckpt, cloud.port, micro_batches=2, emulate_rtt_ms=2e3 * one_way)
    t = time.perf_counter()
    eng.generate(PROMPTS[:2], max_new_tokens=3, stop_on_eos=False)  # 3 forwards, 2 micro-batches each
    took = time.perf_counter() - t
    assert split.stats["cloud_forwards"] == 3 and split.link.session().max_in_flight == 2
    # both micro-batches travel together: ~1 delay per forward, where one after the other would pay 2
    assert 3 * one_way <= took < 3 * 2 * one_way


def test_fp16_codec_halves_bytes(ckpt, cloud):
    sent = {}
    for codec in ("off", "fp16"):
        eng, split = end_engine(ckpt, cloud.port, codec=codec)
        generate(eng)
        sent[codec] = split.link.monitor.bytes_sent
    assert sent["fp16"] < 0.75 * sent["off"]


def test_replan_hook_on_link_change(ckpt, cloud):
    from moetandem.split.connect import Placement
    eng, split = end_engine(ckpt, cloud.port)
    calls = []
    split.replanner = lambda mon: calls.append(mon.rtt_s) or Placement(0, 2)
    mon = split.link.monitor
    for _ in range(8):
        mon.record(1000, 1000, 0.001, 0.0)
    assert not mon.changed()  # baseline
    for _ in range(64):
        mon.record(1000, 1000, 0.050, 0.0)
    assert generate(eng) is not None  # RTT 1 ms -> 50 ms: re-planned (and back when live traffic shows 1 ms)
    assert calls[0] == pytest.approx(0.05) and split.stats["replans"] >= 1
    assert (split.start, split.end) == (0, 1)


def test_cli_generate_with_cloud(ckpt, reference, cloud, tmp_path, capsys):
    from moetandem.cli import main
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    prompt = " ".join(map(str, PROMPTS[0]))
    assert main(["generate", "--model", str(ckpt), "--prompt", prompt, "--max-new-tokens", "10", "--device", "cpu",
                 "--cloud", f"127.0.0.1:{cloud.port}", "--token-file", str(token), "--split-head", "0", "--split-tail", "2"]) == 0
    out = capsys.readouterr()
    assert out.out.split() == [str(t) for t in reference[0]]
    assert "split: 10 forwards via the cloud" in out.err
    assert main(["generate", "--model", str(ckpt), "--prompt", prompt, "--cloud", "nohost",
                 "--token-file", str(token)]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    assert main(["generate", "--model", str(ckpt), "--prompt", prompt, "--cloud", "127.0.0.1:1"]) == 2
    assert "--token-file" in capsys.readouterr().err


def test_lowrank_codec_over_the_link(ckpt, cloud, reference):
    from moetandem.checkpoint import Checkpoint
    from moetandem.split.calibration import fit_codecs, save_codecs
    eng = moetandem.load(ckpt, device="cpu", progress=False)
    ids = torch.randint(0, eng.args.vocab_size, (2048,), generator=torch.Generator().manual_seed(0)).tolist()
    save_codecs(Checkpoint(ckpt), fit_codecs(eng, ids, [1, 2], [32], max_tokens=2048, progress=False))
    sent = {}
    for codec in ("fp16", "lowrank"):
        eng, split = end_engine(ckpt, cloud.port, codec=codec, codec_rank=32)
        out = generate(eng)
        assert split.stats["cloud_forwards"] == 10 and split.stats["fallbacks"] == 0
        sent[codec] = split.link.monitor.bytes_sent + split.link.monitor.bytes_received
    assert sent["lowrank"] < 0.8 * sent["fp16"]
    assert sum(a == b for o, r in zip(out, reference) for a, b in zip(o, r)) > 0  # runs, same ballpark


def test_openai_server_on_split_engine(ckpt, reference, cloud):
    httpx = pytest.importorskip("httpx")
    from moetandem.serve import create_app
    from moetandem.serve.server_thread import ServerThread
    eng, split = end_engine(ckpt, cloud.port)
    body = {"model": "tiny", "prompt": PROMPTS, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    with ServerThread(create_app(eng, model_id="tiny", max_batch=2)) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as http:
        r = http.post("/v1/completions", json=body)
        metrics = http.get("/metrics").text
    assert r.status_code == 200, r.text
    assert split.stats["cloud_forwards"] > 0 and split.stats["local_forwards"] == 0
    assert len(r.json()["choices"]) == 3
    assert 'moetandem_split_stats{stat="fallbacks"} 0.0' in metrics


def test_trace_and_calibration_keep_cloud_experts(ckpt, reference, cloud):
    """Routing taps run on a view of the engine: afterwards the cloud still computes the experts the plan
    placed there (the old set_provider restore put the end's committee back on every layer)."""
    from moetandem.analysis.trace import trace_ids
    from moetandem.experts.similarity import record_rows
    from moetandem.split.experts import CloudExpertProvider

    eng, split = end_engine(ckpt, cloud.port, head=3, tail=0, cloud_experts={0: [1, 3, 5, 7], 2: [0, 2]})
    trace_ids(eng, list(range(1, 30)), context=16, progress=False)
    record_rows(eng, [[5, 17, 42, 9, 3, 1]], rows=8, progress=False)
    assert all(isinstance(p, CloudExpertProvider) for p in eng.experts.values())
    before = split.split_stats()["expert_rows_cloud"]
    assert generate(eng) == reference
    assert split.split_stats()["expert_rows_cloud"] > before


def test_end_layers_run_through_piece_graphs(ckpt, reference, cloud):
    """Decode steps of a split engine run the end's head and tail layers through PieceGraphs (CUDA graphs on a GPU;
    here the same static-buffer plumbing without capture): the tokens stay the single-process ones."""
    from moetandem.config import SplitConfig
    from moetandem.engine import Engine
    from moetandem.graphs import PieceGraphs
    from moetandem.split.connect import connect_split

    base = moetandem.load(ckpt, device="cpu", progress=False)
    cfg = SplitConfig(f"127.0.0.1:{cloud.port}", token=TOKEN, head=1, tail=1, link={"retry_after_s": 0.2})
    pieces = PieceGraphs(capture=False)
    split = connect_split(base.model, base.provider, base.store.ckpt, cfg, pieces)
    eng = Engine(split, base.tokenizer, split.expert_map(), base.provider, base.store, base.device, base.dtype,
                 use_graphs=False, split=split)
    assert generate(eng) == reference
    names = {k[0] for k in pieces.entries}
    assert names == {"head", "tail"} and split.stats["cloud_forwards"] == 10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_split_end_on_cuda_uses_graphs(ckpt, cloud):
    """--cloud on a GPU end: the head and tail layers of decode steps are captured CUDA graphs (fp32 end, CPU
    cloud), with the tokens of the GPU model run alone."""
    alone = moetandem.load(ckpt, device="cuda", dtype="float32", progress=False, use_graphs=False)
    want = [g.token_ids for g in alone.generate(PROMPTS, max_new_tokens=10, stop_on_eos=False)]
    eng = moetandem.load(ckpt, device="cuda", dtype="float32", progress=False, cloud=f"127.0.0.1:{cloud.port}",
                         token=TOKEN, split={"head": 1, "tail": 1, "retry_after_s": 0.2})
    assert eng.split.pieces is not None and eng.split.pieces.capture
    assert generate(eng) == want
    assert {k[0] for k in eng.split.pieces.entries} == {"head", "tail"}
    assert all(e[1] is not None for e in eng.split.pieces.entries.values())  # captured graphs, replayed


def test_split_plan_auto_plans_once_the_link_is_measured(ckpt, reference, cloud):
    """--split-plan auto: the default placement until the link monitor holds 8 samples, then the scheduler's plan
    from the end's own layer times, the cloud's (hello) and the measured link. Over a 60 ms link to a cloud no
    faster than the end (the same CPU), that plan is end-only; the tokens stay those of a single process."""
    eng, split = end_engine(ckpt, cloud.port, plan="auto", emulate_rtt_ms=60.0, emulate_down=True)
    L = split.args.num_layers
    assert split.replanner is not None and split.plan_after_samples == 8
    assert (split.start, split.end) == (1, L - 1)  # the default placement until the link is measured
    assert generate(eng) == reference
    assert split.plan_after_samples == 0 and split.stats["replans"] == 1
    assert split.start >= split.end  # end-only: no layer in the cloud
    assert split.link.monitor.rtt_s >= 0.05


def test_split_plan_auto_waits_for_the_clouds_costs(ckpt, cloud):
    """A cloud that has sent no step costs (not reached yet, an older cloud) gives no plan, and the placement in
    force stays; its costs in a later hello give one."""
    from moetandem.config import SplitConfig
    from moetandem.split.auto import AutoProfile
    from moetandem.split.connect import auto_replanner
    eng, split = end_engine(ckpt, cloud.port, request_costs=True)
    nbytes = eng.store.expert_bytes(eng.dtype) * eng.args.num_experts * len(eng.store.layers)
    auto = AutoProfile(split.model, split.local_provider, split.ckpt, SplitConfig("127.0.0.1:1", token=TOKEN), nbytes)
    link = type("Link", (), {"info": {}})()
    replan = auto_replanner(auto, link)
    mon = split.link.monitor
    for _ in range(8):
        mon.record(1000, 1000, 0.001, 0.0)
    assert replan(mon) is None
    link.info = split.link.info  # the cloud's hello, with its costs
    plan = replan(mon)
    assert plan is not None and plan.end_layers_head + plan.end_layers_tail <= split.args.num_layers
