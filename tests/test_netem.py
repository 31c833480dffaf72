"""bench/netem.py: two namespaces joined by a tbf-shaped veth carry TCP at roughly the set rate (and are gone
afterwards). Skipped where namespaces cannot be created (not root, no iproute2, no tbf)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.netem import NetEm, available  # noqa: E402

OK, WHY = available()
pytestmark = pytest.mark.skipif(not OK, reason=f"network namespaces unavailable here: {WHY}")

SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], 0)); s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept(); n = 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    n += len(b)
c.sendall(str(n).encode()); c.close()
"""

CLIENT = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2]))); data = b"x" * int(sys.argv[3])
t = time.perf_counter(); c.sendall(data); c.shutdown(socket.SHUT_WR); got = int(c.recv(64)); dt = time.perf_counter() - t
print(got, dt)
"""


def transfer(net: NetEm, nbytes: int) -> float:
    srv = subprocess.Popen(net.cloud_argv([sys.executable, "-c", SERVER, net.cloud_ip]), stdout=subprocess.PIPE,
                           text=True)
    try:
        port = srv.stdout.readline().strip()
        out = subprocess.run(net.end_argv([sys.executable, "-c", CLIENT, net.cloud_ip, port, str(nbytes)]),
                             capture_output=True, text=True, timeout=60, check=True).stdout.split()
        assert int(out[0]) == nbytes
        return float(out[1])
    finally:
        srv.kill()
        srv.wait()


def test_tbf_limits_the_rate_and_cleans_up():
    rate_mbit, nbytes = 40, 4_000_000  # 0.8 s at 40 Mbit/s
    with NetEm(rate_mbit=rate_mbit) as net:
        assert "tbf" in net.qdisc()
        t0 = time.perf_counter()
        dt = transfer(net, nbytes)
        measured = nbytes * 8 / dt / 1e6
        assert 0.6 * rate_mbit <= measured <= 1.15 * rate_mbit, (measured, rate_mbit)
        net.set_rate(None)  # unshaped veth: far faster than 40 Mbit/s
        fast = nbytes * 8 / transfer(net, nbytes) / 1e6
        assert fast > 3 * rate_mbit, fast
        assert time.perf_counter() - t0 < 30
        names = (net.end_ns, net.cloud_ns)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)
