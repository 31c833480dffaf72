"""Split execution under faults: a cloud that stops answering (SIGSTOP) stalls no step for long and is used
again once it answers; TLS misconfiguration is a configuration error (CloudRefused, CLI exit 2), while an
unreachable cloud is an outage the end rides out alone; a cloud told to stop (SIGTERM) drains: it answers the
exchanges in flight, refuses new ends (who fall back), and exits 0."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from cloud_process import kill_cloud, start_cloud
from conftest import build_checkpoint

import moetandem
from moetandem.batcher import Batcher
from moetandem.split.cloud import CloudServer
from moetandem.errors import CloudError
from moetandem.split.link import CloudLink, CloudRefused, LinkOptions
from moetandem.split.monitor import LinkMonitor
from moetandem.split.transport import SESSION_METHOD
from moetandem.split.transport.auth import call_metadata
from moetandem.split.transport.client import StreamClient
from moetandem.split.transport.frame import Frame

TOKEN = "t0k3n-for-tests-0123456789abcdef"
PROMPTS = [[5, 17, 42, 9], [3, 1, 4, 1, 5, 9, 2, 6], [7]]
NEW = 150


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint("qwen2_moe", tmp_path_factory.mktemp("faults"))


def test_deadline_follows_the_measured_link() -> None:
    m = LinkMonitor()
    assert m.deadline_s(100, 4, 0.5, 30) == 30  # nothing measured yet: the configured timeout
    for _ in range(20):
        m.record(100, 100, 0.01, 0.0)
    assert m.deadline_s(100, 4, 0.5, 30) == 0.5  # 4 x 10 ms, raised to the floor
    for _ in range(20):
        m.record(100, 100, 0.4, 0.0)
    assert m.deadline_s(100, 4, 0.5, 30) == pytest.approx(1.6)  # 4 x p99
    assert m.deadline_s(1000, 4, 0.5, 30) == pytest.approx(16)  # a frame 10x the usual size: 10x longer
    assert m.deadline_s(10**6, 4, 0.5, 30) == 30  # never past the ceiling


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")
def test_frozen_cloud_stalls_nobody_and_is_used_again(ckpt: Path, tmp_path: Path) -> None:
    """3 streams; the cloud frozen for 3 s mid-generation: no step over 2 s (deadline, then end-only steps), the
    cloud used again within 5 s of SIGCONT (its K/V refilled a bounded amount per step), the reference tokens."""
    ref_engine = moetandem.load(ckpt, device="cpu", progress=False)
    reference = [g.token_ids for g in ref_engine.generate(PROMPTS, max_new_tokens=NEW, stop_on_eos=False)]
    token = tmp_path / "token"
    token.write_text(TOKEN)
    proc, info = start_cloud(ckpt, token)
    try:
        port = info["listening"]
        eng = moetandem.load(ckpt, device="cpu", progress=False, cloud=f"127.0.0.1:{port}", token=TOKEN,
                             split={"head": 1, "tail": 1, "cloud_experts": {2: [0, 1, 2, 3]},
                                    "retry_after_s": 0.5})
        split = eng.split
        split.catch_up_tokens = 24  # the cloud's K/V refilled over several steps (each still on the end)
        batcher = Batcher(eng, 3, 256)
        seqs = [eng.make_sequence(p, NEW, stop_on_eos=False) for p in PROMPTS]
        batcher.add(seqs)
        gaps, step = [], 0
        frozen_at = resumed_at = recovered_after = None
        forwards_at_resume = 0
        while batcher.active:
            t = time.perf_counter()
            batcher.step()
            gaps.append(time.perf_counter() - t)
            step += 1
            now = time.monotonic()
            if step == 10:
                assert split.stats["local_forwards"] == 0
                os.kill(proc.pid, signal.SIGSTOP)
                frozen_at = now
            elif frozen_at is not None and resumed_at is None and now - frozen_at > 3.0:
                assert split.link.breaker_open and split.stats["fallbacks"] >= 1
                os.kill(proc.pid, signal.SIGCONT)
                resumed_at, forwards_at_resume = now, split.stats["cloud_forwards"]
            elif resumed_at is not None and recovered_after is None \
                    and split.stats["cloud_forwards"] > forwards_at_resume:
                recovered_after = now - resumed_at
            time.sleep(0.04)  # a client reading its stream: spreads the generation over several seconds
        assert [s.out for s in seqs] == reference  # nothing lost, the same tokens as one process
        assert max(gaps) <= 2.0, f"a step took {max(gaps):.2f} s with the cloud frozen"
        assert recovered_after is not None and recovered_after <= 5.0, recovered_after
        assert not split.link.breaker_open
        assert split.stats["catch_up_steps"] >= 1  # the way back was spread over steps that ran on the end
    finally:
        kill_cloud(proc)


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")
def test_frozen_cloud_is_noticed_before_a_long_deadline(ckpt: Path, tmp_path: Path) -> None:
    """Keepalive pings, not the exchange deadline, notice a frozen cloud: on a cold link (nothing measured yet, so
    the deadline is the 30 s --cloud-timeout) a prefill sent to a frozen cloud falls back to the end within ~1.5 s,
    with the tokens of one process; the cloud is used again once it resumes."""
    ref_engine = moetandem.load(ckpt, device="cpu", progress=False)
    prompt = list(range(3, 99))  # a long prompt: a large frame (its deadline would scale with its size)
    reference = ref_engine.generate([prompt], max_new_tokens=6, stop_on_eos=False)[0].token_ids
    token = tmp_path / "token"
    token.write_text(TOKEN)
    proc, info = start_cloud(ckpt, token)
    try:
        eng = moetandem.load(ckpt, device="cpu", progress=False, cloud=f"127.0.0.1:{info['listening']}", token=TOKEN,
                             split={"head": 1, "tail": 1, "timeout_s": 30.0, "retry_after_s": 0.3})
        split = eng.split
        assert split.link.deadline_s(10**6) == 30.0  # cold: the exchange itself would wait 30 s
        os.kill(proc.pid, signal.SIGSTOP)
        t = time.monotonic()
        first: list[float] = []
        out = eng.generate([prompt], max_new_tokens=6, stop_on_eos=False,
                           on_token=lambda *_: first.append(time.monotonic() - t) if not first else None)
        assert out[0].token_ids == reference
        assert first[0] <= 3.0, f"the first token took {first[0]:.1f} s with the cloud frozen"
        assert split.stats["fallbacks"] == 1 and split.link.breaker_open
        assert "UNAVAILABLE" in str(split.link.last_error) or "keepalive" in str(split.link.last_error).lower()
        os.kill(proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 5
        while split.link.breaker_open and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not split.link.breaker_open  # the prober found it within 5 s
        before = split.stats["cloud_forwards"]
        assert eng.generate([prompt], max_new_tokens=6, stop_on_eos=False)[0].token_ids == reference
        assert split.stats["cloud_forwards"] > before
        split.link.close()
    finally:
        kill_cloud(proc)


# ---------------------------------------------------------------- TLS
@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make certificates")
    d = tmp_path_factory.mktemp("certs")
    out = {}
    for name in ("cloud", "other"):
        cert, key = d / f"{name}.pem", d / f"{name}.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext",
                        "subjectAltName=DNS:localhost"], check=True, capture_output=True)
        out[name], out[f"{name}_key"] = cert, key
    return out


@pytest.fixture(scope="module")
def clouds(ckpt: Path, certs: dict[str, Path]):
    eng = moetandem.load(ckpt, device="cpu", progress=False)
    tls, plain = CloudServer(eng, TOKEN), CloudServer(eng, TOKEN)
    ports = {"tls": tls.start("127.0.0.1:0", tls_cert=certs["cloud"], tls_key=certs["cloud_key"]),
             "plain": plain.start("127.0.0.1:0")}
    yield ports
    tls.stop(0)
    plain.stop(0)


def end(ckpt: Path, address: str, **link: object) -> moetandem.Engine:
    return moetandem.load(ckpt, device="cpu", progress=False, cloud=address, token=TOKEN, split=link)


@pytest.mark.parametrize("case", ["untrusted certificate", "host name mismatch", "TLS to a plaintext cloud",
                                  "plaintext to a TLS cloud"])
def test_tls_misconfiguration_is_refused(ckpt: Path, certs: dict[str, Path], clouds: dict[str, int],
                                         case: str) -> None:
    address, link = {
        "untrusted certificate": (f"localhost:{clouds['tls']}", {"tls_ca": str(certs["other"])}),
        "host name mismatch": (f"127.0.0.1:{clouds['tls']}", {"tls_ca": str(certs["cloud"])}),
        "TLS to a plaintext cloud": (f"localhost:{clouds['plain']}", {"tls_ca": str(certs["cloud"])}),
        "plaintext to a TLS cloud": (f"localhost:{clouds['tls']}", {}),
    }[case]
    t = time.monotonic()
    with pytest.raises(CloudRefused, match="TLS"):
        end(ckpt, address, **link)
    assert time.monotonic() - t < 10  # no retry loop over a configuration error
    good = end(ckpt, f"localhost:{clouds['tls']}", tls_ca=str(certs["cloud"]))  # the right setup works
    good.generate(PROMPTS[:1], max_new_tokens=2, stop_on_eos=False)
    assert good.split.stats["cloud_forwards"] == 2


def test_tls_misconfiguration_exits_2_but_an_outage_falls_back(ckpt: Path, certs: dict[str, Path],
                                                                clouds: dict[str, int], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from moetandem.cli import main
    token = tmp_path / "token"
    token.write_text(TOKEN)
    args = ["generate", "--model", str(ckpt), "--prompt", "5 17 42", "--max-new-tokens", "3", "--device", "cpu",
            "--token-file", str(token)]
    assert main([*args, "--cloud", f"localhost:{clouds['tls']}", "--tls-ca", str(certs["other"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("moetandem: error:") and "TLS" in err[-1] and "CERTIFICATE_VERIFY_FAILED" in err[-1]
    assert main([*args, "--cloud", f"localhost:{clouds['tls']}"]) == 2
    assert "speaks TLS" in capsys.readouterr().err
    # nothing listening: a network outage, so the end runs alone and exits 0
    assert main([*args, "--cloud", "127.0.0.1:1", "--tls-ca", str(certs["cloud"])]) == 0


def test_serve_refuses_a_misconfigured_cloud_before_loading(ckpt: Path, certs: dict[str, Path],
                                                            clouds: dict[str, int], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`moetandem serve --cloud` checks the cloud before the server starts: a TLS mistake exits 2 with one line."""
    from moetandem.cli import main
    token = tmp_path / "token"
    token.write_text(TOKEN)
    rc = main(["serve", str(ckpt), "--port", "0", "--device", "cpu", "--token-file", str(token),
               "--cloud", f"localhost:{clouds['tls']}", "--tls-ca", str(certs["other"])])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("moetandem: error:") and "TLS" in err[-1]


# ---------------------------------------------------------------- drain on shutdown
def test_drain_finishes_the_exchange_in_flight_and_refuses_new_ends(ckpt: Path) -> None:
    """In process, deterministic: a reply held 1 s by the emulated link is still sent after drain() starts; a
    stream opened during the drain gets UNAVAILABLE (an outage: the end falls back), never CloudRefused."""
    eng = moetandem.load(ckpt, device="cpu", progress=False)
    server = CloudServer(eng, TOKEN, delay_s=1.0)
    port = server.start("127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    client = StreamClient(channel, SESSION_METHOD, call_metadata(TOKEN), 10.0)
    hello = client.submit(Frame("hello", meta={"fingerprint": server.fingerprint}))
    time.sleep(0.2)  # the cloud has computed the reply; the link holds it for 0.8 s more
    result: list[bool] = []
    t0 = time.monotonic()
    drainer = threading.Thread(target=lambda: result.append(server.drain(timeout_s=5.0)))
    drainer.start()
    time.sleep(0.05)
    link = CloudLink(LinkOptions(f"127.0.0.1:{port}", TOKEN, retries=1), server.fingerprint)
    with pytest.raises(CloudError, match="draining") as e:
        link.connect()
    assert not isinstance(e.value, CloudRefused)
    assert link.breaker_open  # end-only, probing
    link.close()
    assert client.wait(hello, 5.0).meta["fingerprint"] == server.fingerprint  # the in-flight exchange finished
    drainer.join(10)
    assert result == [True] and time.monotonic() - t0 < 3.0
    deadline = time.monotonic() + 2
    while client.alive and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not client.alive and "draining" in str(client.error)  # then the stream was ended, with the reason
    channel.close()


def test_sigterm_drains_the_cloud_and_the_end_finishes_alone(ckpt: Path, tmp_path: Path) -> None:
    """`moetandem cloud` on SIGTERM mid-generation: the exchange in flight (held 2 s by the emulated link) is
    answered, a new end connecting meanwhile falls back at once, the cloud exits 0 within drain-timeout + 2 s, and
    the generation ends on the end with the reference tokens."""
    ref_engine = moetandem.load(ckpt, device="cpu", progress=False)
    reference = [g.token_ids for g in ref_engine.generate(PROMPTS, max_new_tokens=NEW, stop_on_eos=False)]
    token = tmp_path / "token"
    token.write_text(TOKEN)
    drain_timeout = 8.0
    proc, info = start_cloud(ckpt, token, "--emulate-rtt-ms", "4000", "--drain-timeout", str(drain_timeout),
                             "--log-level", "warning", stderr=subprocess.PIPE)
    try:
        address = f"127.0.0.1:{info['listening']}"
        link = {"head": 1, "tail": 1, "connect_timeout_s": 10.0, "retry_after_s": 0.5}
        eng = moetandem.load(ckpt, device="cpu", progress=False, cloud=address, token=TOKEN, split=link)
        out: list = []
        gen = threading.Thread(target=lambda: out.append(eng.generate(PROMPTS, max_new_tokens=NEW,
                                                                      stop_on_eos=False)))
        gen.start()
        deadline = time.monotonic() + 30
        while eng.split.stats["cloud_forwards"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert eng.split.stats["cloud_forwards"] >= 1
        time.sleep(0.3)  # the next exchange is in flight: its reply leaves the cloud ~1.7 s from now
        proc.send_signal(signal.SIGTERM)
        t_term = time.monotonic()
        while "draining" not in (line := proc.stderr.readline()):
            assert line, "the cloud exited without draining"
        t = time.monotonic()
        late = moetandem.load(ckpt, device="cpu", progress=False, cloud=address, token=TOKEN,
                              split={"head": 1, "tail": 1, "retries": 1})
        assert time.monotonic() - t < 5 and late.split.link.breaker_open  # fell back, did not hang
        assert "draining" in str(late.split.link.last_error)
        late_out = late.generate(PROMPTS[:1], max_new_tokens=8, stop_on_eos=False)
        assert late_out[0].token_ids == reference[0][:8] and late.split.stats["cloud_forwards"] == 0
        rc = proc.wait(timeout=drain_timeout + 2)
        assert rc == 0 and time.monotonic() - t_term <= drain_timeout + 2
        gen.join(60)
        assert [g.token_ids for g in out[0]] == reference  # nothing lost: finished on the end
        assert eng.split.stats["cloud_forwards"] >= 2  # the exchange in flight at SIGTERM was answered
        assert eng.split.stats["local_forwards"] >= 1
    finally:
        kill_cloud(proc)
