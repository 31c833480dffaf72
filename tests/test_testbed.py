"""The end–cloud test bed's CPU half: the in-transport link shaper (timing, on loopback through the real gRPC
transport, and against `tc tbf` in network namespaces where they can be made), and re-planning when the shaped
link changes under a running end."""
from __future__ import annotations

import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from conftest import build_checkpoint

import moetandem
from moetandem.errors import InvalidRequestError
from moetandem.split.cloud import CloudServer
from moetandem.split.shaper import HEADER, MSS, LinkSpec, PeerShapers
from moetandem.split.transport.client import StreamClient
from moetandem.split.transport.frame import Frame
from moetandem.split.transport.server import StreamStats, serve_stream
from moetandem.split.transport.frame import DEFAULT_LIMITS

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "t" * 32


def wire(n: int) -> int:
    return n + -(-n // MSS) * HEADER


def test_shaper_rate_delay_order_and_validation():
    sh = LinkSpec(rate_mbit=8, rtt_ms=20).shaper()  # 1 MB/s, 10 ms one way
    t0 = 1000.0
    sh._t = t0
    dues = [sh.due(100_000, now=t0) for _ in range(10)]  # 10 frames at once: serialised by the bucket
    expect = (10 * wire(100_000) - sh.burst) / 1e6 + 0.010
    assert dues[-1] - t0 == pytest.approx(expect, rel=1e-6)
    assert all(b > a for a, b in zip(dues, dues[1:]))
    idle = sh.due(100, now=t0 + 100)  # after a long pause the bucket is full again: only the delay
    assert idle - (t0 + 100) == pytest.approx(0.010)
    jit = LinkSpec(rtt_ms=20, jitter_ms=8, seed=1).shaper()
    d = [jit.due(10, now=t) - t for t in range(0, 4000, 10)]
    assert 0.006 - 1e-9 <= min(d) < 0.0065 and 0.0135 < max(d) <= 0.014 + 1e-9  # 10 ± 4 ms
    lossy = LinkSpec(rtt_ms=20, loss=0.5, seed=2).shaper()
    d = [lossy.due(100, now=t) - t for t in range(0, 2000, 10)]  # one packet: a loss is a tail loss: RTO
    assert {round(x, 3) for x in d} == {0.01, 0.21} and lossy.lost_packets > 50
    late = LinkSpec(rtt_ms=20, jitter_ms=18, seed=3).shaper()
    dues = [late.due(10, now=1.0 + i * 1e-4) for i in range(200)]
    assert dues == sorted(dues)  # in order, as on one TCP connection
    with pytest.raises(InvalidRequestError, match="--emulate-loss"):
        LinkSpec(loss=1.5)
    with pytest.raises(InvalidRequestError, match="--emulate-rate-mbit"):
        LinkSpec(rate_mbit=-1)


class Echo:
    """A gRPC server running the cloud's stream body (serve_stream) with a trivial handler, shaped like a cloud."""

    def __init__(self, shaping: float | PeerShapers = 0.0) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(8))

        def handler(requests, context):
            yield from serve_stream(requests, context, lambda f: Frame("reply"), lambda: None, StreamStats(),
                                    DEFAULT_LIMITS, 60.0, shaping)
        h = {"Session": grpc.stream_stream_rpc_method_handler(handler)}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("echo", h),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def client(self, spec: LinkSpec | None) -> StreamClient:
        ch = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        return StreamClient(ch, "/echo/Session", [], 30.0, shaper=spec.shaper() if spec else None)


def shaped_transfer(nbytes: int, rate_mbit: float, frame: int = 1 << 16) -> float:
    """Seconds to move nbytes through the shaped gRPC transport (frames submitted at once, tiny replies)."""
    echo = Echo()
    c = echo.client(LinkSpec(rate_mbit=rate_mbit))
    c.request(Frame("hello"))
    time.sleep(0.2)  # the bucket refills after the hello
    import torch
    t0 = time.perf_counter()
    futs = [c.submit(Frame("layers", tensors={"x": torch.zeros(frame, dtype=torch.uint8)}))
            for _ in range(nbytes // frame)]
    for f in futs:
        c.wait(f)
    dt = time.perf_counter() - t0
    c.close()
    echo.server.stop(0)
    return dt


def test_shaper_on_loopback_rate_and_rtt():
    dt = shaped_transfer(2 << 20, 16.0)  # 2 MiB at 16 Mbit/s ≈ 1.1 s on the wire
    goodput = (2 << 20) * 8 / dt / 1e6
    assert 16 * 1448 / 1514 * 0.9 < goodput < 16 * 1.03, goodput
    spec = LinkSpec(rtt_ms=40)
    echo = Echo(PeerShapers(spec))
    c = echo.client(spec)
    c.request(Frame("hello"))
    rtts = []
    for _ in range(5):
        t = time.perf_counter()
        c.request(Frame("hello"))
        rtts.append(time.perf_counter() - t)
    c.close()
    echo.server.stop(0)
    assert 0.040 <= min(rtts) and sorted(rtts)[2] < 0.055, rtts  # 20 ms each way, a little software on top


def test_pipelined_frames_pay_the_emulated_rtt_once():
    """Both directions shaped on the end (emulate_down): 4 frames in flight at once arrive ~1 RTT later, not
    4 half-RTTs one after another (each reply's due time is taken when it arrives, not when the one before it
    was handed over)."""
    echo = Echo()
    ch = grpc.insecure_channel(f"127.0.0.1:{echo.port}")
    c = StreamClient(ch, "/echo/Session", [], 30.0, shaper=LinkSpec(rtt_ms=40).shaper(),
                     down_shaper=LinkSpec(rtt_ms=40).shaper(1))
    c.request(Frame("hello"))
    t0 = time.perf_counter()
    futs = [c.submit(Frame("layers")) for _ in range(4)]
    for f in futs:
        c.wait(f)
    dt = time.perf_counter() - t0
    c.close()
    echo.server.stop(0)
    assert 0.040 <= dt < 0.085, dt  # serialised replies: 20 + 4 × 20 = 100 ms


def _netns_ok() -> tuple[bool, str]:
    sys.path.insert(0, str(ROOT))
    from bench.netem import available
    return available()


RECV = ("import socket,sys;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
        "s.bind(('0.0.0.0',5301));s.listen(1);print('up',flush=True);c,_=s.accept();n=0;N=int(sys.argv[1])\n"
        "while n<N:\n b=c.recv(1<<16)\n if not b: break\n n+=len(b)\nc.sendall(b'k');c.close()")
SEND = ("import socket,sys,time;N=int(sys.argv[1]);s=socket.create_connection((sys.argv[2],5301));"
        "t=time.perf_counter();b=bytes(1<<16);n=0\nwhile n<N:\n s.sendall(b[:min(len(b),N-n)]);n+=min(len(b),N-n)\n"
        "s.recv(1);print(time.perf_counter()-t)")


def test_shaper_matches_tbf_in_netns():
    ok, why = _netns_ok()
    if not ok:
        pytest.skip(f"network namespaces unavailable: {why}")
    from bench.netem import NetEm
    nbytes, rate = 3 << 20, 16.0
    with NetEm(rate_mbit=rate) as net:
        recv = subprocess.Popen(net.cloud_argv([sys.executable, "-c", RECV, str(nbytes)]), stdout=subprocess.PIPE,
                                text=True)
        try:
            assert recv.stdout.readline().strip() == "up"
            out = subprocess.run(net.end_argv([sys.executable, "-c", SEND, str(nbytes), net.cloud_ip]),
                                 capture_output=True, text=True, timeout=60, check=True)
        finally:
            recv.wait(10)
    tbf_dt = float(out.stdout.strip())
    shaped_dt = shaped_transfer(nbytes, rate)
    assert shaped_dt == pytest.approx(tbf_dt, rel=0.10), (shaped_dt, tbf_dt)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint("qwen2_moe", tmp_path_factory.mktemp("testbed"))


def test_shaper_rate_change_triggers_replan(ckpt):
    from moetandem.split.connect import Placement
    shaping = PeerShapers(LinkSpec(rate_mbit=100, rtt_ms=4))
    srv = CloudServer(moetandem.load(ckpt, device="cpu", progress=False), TOKEN, 4, 60, 2**30, shaping)
    port = srv.start("127.0.0.1:0")
    try:
        eng = moetandem.load(ckpt, device="cpu", progress=False, cloud=f"127.0.0.1:{port}", token=TOKEN,
                             split={"head": 1, "tail": 1, "emulate_rtt_ms": 4, "emulate_rate_mbit": 100})
        split = eng.split
        steps: list[int] = []

        def forwards() -> int:
            return int(split.stats["cloud_forwards"] + split.stats["local_forwards"])
        seen: list[float] = []
        split.replanner = lambda mon: steps.append(forwards()) or seen.append(mon.bandwidth_bps) or Placement(1, 1)
        prompts = [[5, 17, 42, 9] * 4, [3, 1, 4], [7, 7]]
        eng.generate(prompts, max_new_tokens=24, stop_on_eos=False)  # prefill + decode: steady link
        assert steps == [] and split.stats["replans"] == 0  # no re-plan while the link is steady
        before = forwards()
        # 100 Mbit/s -> 0.3 Mbit/s, both directions (a 2 KB burst: tbf's 16 KiB would hide the change for
        # the first dozen steps of these ~1.3 KB frames)
        split.link.shaper.set_rate(0.3, burst_bytes=2048)
        shaping.set_rate(0.3, burst_bytes=2048)
        eng.generate(prompts, max_new_tokens=20, stop_on_eos=False)
        assert steps and steps[0] - before <= 10, (steps, before)  # re-planned within a few forwards
        assert split.stats["replans"] >= 1 and split.stats["fallbacks"] == 0, split.split_stats()
        # what the re-planner read: the slow link (bytes of both directions over the wire time: ≤ 2× the rate)
        assert seen[0] < 0.3e6 / 8 * 3
    finally:
        srv.stop(0)


def test_rate_drop_leads_to_a_new_plan(ckpt):
    """profile_replanner under a running end: at 100 Mbit/s, 5 ms the plan sends everything to the cloud (the
    end is slow); shaped down to 0.3 Mbit/s and 35 ms mid-run, a new plan (end-only) is in force within a
    bounded time."""
    from moetandem.split.connect import profile_replanner
    from moetandem.split.costs import StepCosts, split_profile
    from moetandem.split.plan import make_split_plan
    shaping = PeerShapers(LinkSpec(rate_mbit=100, rtt_ms=5))
    srv = CloudServer(moetandem.load(ckpt, device="cpu", progress=False), TOKEN, 4, 60, 2**30, shaping)
    port = srv.start("127.0.0.1:0")
    try:
        eng = moetandem.load(ckpt, device="cpu", progress=False, cloud=f"127.0.0.1:{port}", token=TOKEN,
                             split={"head": 1, "tail": 1, "codec": "plan", "emulate_rtt_ms": 5,
                                    "emulate_rate_mbit": 100})
        ar, L = eng.args, eng.args.num_layers
        end = StepCosts([1e-4] * L, [4e-3] * L, 1e-4, 1e-5, 1e-4)  # a slow end: 4 ms per layer and token
        cloud = StepCosts([1e-4] * L, [1e-5] * L, 1e-4, 1e-6, 1e-6)
        eb = eng.store.expert_bytes(eng.dtype)
        prof = split_profile(end, cloud, ar, eb, L * ar.num_experts * eb, 100e6 / 8, 0.005)
        split = eng.split
        split.set_plan(make_split_plan(prof))
        assert split.plan.mode == "cloud-only", split.plan.describe()
        split.replanner = profile_replanner(prof, current=split.plan)
        prompts = [[5, 17, 42, 9] * 4, [3, 1, 4], [7, 7]]
        eng.generate(prompts, max_new_tokens=16, stop_on_eos=False)
        assert split.start == 0 and split.stats["local_forwards"] == 0 and split.stats["replans"] == 0
        split.link.shaper.set_rate(0.3, burst_bytes=2048)  # both directions; the up-link also 30 ms slower
        split.link.shaper.set_rtt(65)  # (a 2 KB burst lets these small frames through at 0.3 Mbit/s alone)
        shaping.set_rate(0.3, burst_bytes=2048)
        t0, when = time.perf_counter(), []
        eng.generate(prompts, max_new_tokens=24, stop_on_eos=False,
                     on_token=lambda i, tok: when.append(time.perf_counter()) if split.start == L and not when
                     else None)
        assert split.plan.mode == "end-only" and split.stats["replans"] >= 1, str(split.split_stats())
        assert when and when[0] - t0 < 5.0, "the new plan took too long"  # ~10 slow exchanges of ~50 ms
        assert split.stats["local_forwards"] > 0 and split.stats["fallbacks"] == 0
    finally:
        srv.stop(0)


def test_k_token_steps_count_per_token_and_report_the_ab():
    """--cloud-decode-tokens: a step that made n tokens of a sequence is n tokens of 1/n of its time each, and
    the report has the per-token -> k-token line with the k-token p50 over end-only's and naive's."""
    sys.path.insert(0, str(ROOT))
    from bench.split import per_token_s
    from bench.testbed_report import PER_TOKEN, table
    # prefill at t=0 (step 1); one exchange of 4 tokens at 40 ms (step 2); two single steps of 10 ms
    marks = [(0.0, 1), *[(0.040, 2)] * 4, (0.050, 3), (0.060, 4)]
    assert per_token_s(marks) == pytest.approx([0.010] * 6)
    assert per_token_s([(0.0, 1), (0.02, 2), (0.05, 3)]) == pytest.approx([0.02, 0.03])  # one token per step

    def row(c, tok_s, p50):
        return {"config": c, "rate": 1000, "rtt": 50, "budget": 0.25, "ends": 1, "throughput": {"4": tok_s},
                "lat_p50_ms": p50, "lat_p95_ms": p50, "bytes_per_token": 100.0}
    res = {"args": {"cloud_decode_tokens": 8}, "rows": [row("end-only", 10, 100.0), row("naive", 12, 80.0),
                                                        row("cloud-only", 60, 20.0), row(PER_TOKEN, 15, 62.0),
                                                        row("adaptive", 60, 20.0)]}
    res["rows"][-1]["plan"] = "cloud-only cloud-only: end layers [0,0); cloud layers [0,4)"
    md = table(res)
    assert "8 greedy tokens per exchange" in md
    assert "**1.00×** (cloud-only; the same plan, measured again)" in md  # adaptive ran cloud-only's own plan
    assert "(in 1 of them the plan was the best baseline's own, measured again)" in md
    assert "cloud-only p50 62.0 → 20.0 ms/token, 15.0 → 60.0 tok/s; k-token p50 / end-only 0.20× / naive 0.25×" in md


def test_every_config_is_judged_on_its_interleaved_rounds_only():
    """A baseline's round-0 probe (the plan is made from it) is left out of its reported run, so adaptive's one run
    is not set against the better of a baseline's two; the lower median over an even count."""
    sys.path.insert(0, str(ROOT))
    from bench.testbed import median_run

    def runs(*tok_s):
        return [{"throughput": {"4": t}, "i": i} for i, t in enumerate(tok_s)]
    assert median_run(runs(230.0, 215.0), True, 4)["i"] == 1  # the probe (230) is not the one reported
    assert median_run(runs(186.0), False, 4)["i"] == 0
    assert median_run(runs(300.0, 10.0, 30.0, 20.0), True, 4)["i"] == 3  # rounds 10, 20, 30 -> 20
    assert median_run(runs(1.0, 40.0, 10.0, 30.0, 20.0), True, 4)["i"] == 4  # 10, 20, 30, 40 -> lower median 20
    assert median_run(runs(5.0), True, 4)["i"] == 0  # cut after the probe: the probe is all there is


def test_k_token_calibration_recovers_the_cloud_step_from_the_per_token_time():
    """A k-token cloud-only run's per-token time is (end overhead + link + k cloud steps) / k: the test bed charges
    the cloud only its k steps (not the end's overhead, which k would multiply), and never less than the floor."""
    from bench.testbed_profile import k_token_cloud_step
    from moetandem.split.plan_cost import DECODE_TOKEN_BYTES, DECODE_UP_BYTES
    rtt, bw, fb, k, over, cloud = 0.05, 1.25e6, 200, 8, 0.012, 0.0025
    link = rtt + (fb + DECODE_UP_BYTES + DECODE_TOKEN_BYTES * (k + 1)) / bw
    t = (over + link + k * cloud) / k
    assert k_token_cloud_step(t, rtt, bw, fb, k, over, floor=0.0) == pytest.approx(cloud)
    assert k_token_cloud_step(t, rtt, bw, fb, k, over, floor=0.004) == 0.004
