"""Split execution under faults: a cloud that stops answering (SIGSTOP) stalls no step for long and is used
again once it answers; TLS misconfiguration is a configuration error (CloudRefused, CLI exit 2), while an
unreachable cloud is an outage the end rides out alone."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import build_checkpoint

import moetandem
from moetandem.batcher import Batcher
from moetandem.split.cloud import CloudServer
from moetandem.split.link import CloudRefused
from moetandem.split.monitor import LinkMonitor

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
    ref_engine = moetandem.load(ckpt, device="cpu", progress=False)
    reference = [g.token_ids for g in ref_engine.generate(PROMPTS, max_new_tokens=NEW, stop_on_eos=False)]
    token = tmp_path / "token"
    token.write_text(TOKEN)
    proc = subprocess.Popen([sys.executable, "-m", "moetandem", "cloud", "--model", str(ckpt), "--listen",
                             "127.0.0.1:0", "--token-file", str(token), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = json.loads(proc.stdout.readline())["listening"]
        eng = moetandem.load(ckpt, device="cpu", progress=False, cloud=f"127.0.0.1:{port}", token=TOKEN,
                             split={"head": 1, "tail": 1, "cloud_experts": {2: [0, 1, 2, 3]},
                                    "retry_after_s": 0.5})
        split = eng.split
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
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()


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
