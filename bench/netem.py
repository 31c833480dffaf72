"""Emulated end–cloud link for tests and benchmarks: two Linux network namespaces ("end", "cloud") joined by a
veth pair, each direction rate-limited with `tc qdisc ... root tbf`.

This kernel has no `netem` qdisc, so there is no delay here: the round-trip time is added in the application
layer by the split runtime itself (`--emulate-rtt-ms` on `moetandem cloud` and on the end: each frame leaves
RTT/2 after it was submitted, on both sides). tbf only shapes bandwidth (and queues up to `latency`).

    with NetEm(rate_mbit=10) as net:                    # needs root (CAP_NET_ADMIN); cleaned up on exit/Ctrl-C
        cloud = subprocess.Popen(net.cloud_argv(["moetandem", "cloud", "--listen", f"{net.cloud_ip}:0", ...]))
        end = subprocess.run(net.end_argv([sys.executable, ...]))
        net.set_rate(100)                                # change the shaping on the fly (both directions)

`python bench/netem.py --check` says whether namespaces can be made here; `--cleanup` removes leftovers of a
killed run (namespaces named `mtnet-*`).
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import subprocess
import sys
from typing import Sequence

PREFIX = "mtnet"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def available() -> tuple[bool, str]:
    """(True, "") when namespaces + veth + tbf can be set up here, else (False, why)."""
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` (iproute2) is not installed"
    if os.geteuid() != 0:
        return False, "needs root (CAP_NET_ADMIN) to create network namespaces"
    name = f"{PREFIX}-probe-{os.getpid()}"
    r = _ip("netns", "add", name, check=False)
    if r.returncode != 0:
        return False, f"`ip netns add` failed: {r.stderr.strip()}"
    try:
        r = _ip("-n", name, "link", "add", "pa", "type", "veth", "peer", "name", "pb", check=False)
        if r.returncode != 0:
            return False, f"cannot create a veth pair: {r.stderr.strip()}"
        r = subprocess.run(["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "pa", "root", "tbf", "rate",
                            "10mbit", "burst", "32kb", "latency", "50ms"], capture_output=True, text=True)
        if r.returncode != 0:
            return False, f"tbf qdisc unavailable: {r.stderr.strip()}"
    finally:
        _ip("netns", "del", name, check=False)
    return True, ""


class NetEm:
    """Two namespaces joined by veth; `set_rate(mbit)` shapes both directions with tbf. Use as a context
    manager (or call close()): the namespaces are deleted on exit, on Ctrl-C and on SIGTERM."""

    def __init__(self, rate_mbit: float | None = None, subnet: str = "10.231.7") -> None:
        tag = f"{os.getpid()}"
        self.end_ns, self.cloud_ns = f"{PREFIX}-end-{tag}", f"{PREFIX}-cloud-{tag}"
        self.end_dev, self.cloud_dev = "veth-end", "veth-cloud"
        self.end_ip, self.cloud_ip = f"{subnet}.1", f"{subnet}.2"
        self.rate_mbit: float | None = None
        self._up = False
        self._initial_rate = rate_mbit

    @classmethod
    def attach(cls, end_ns: str, cloud_ns: str) -> "NetEm":
        """A handle on namespaces another process set up (to call set_rate from inside one); close() is a no-op."""
        net = cls()
        net.end_ns, net.cloud_ns = end_ns, cloud_ns
        return net

    # ---- lifecycle
    def __enter__(self) -> "NetEm":
        self.setup()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def setup(self) -> None:
        ok, why = available()
        if not ok:
            raise RuntimeError(f"network namespaces unavailable: {why}")
        atexit.register(self.close)
        if threading_main():
            prev = signal.getsignal(signal.SIGTERM)

            def on_term(signum: int, frame: object) -> None:  # turn SIGTERM into an exception: finally blocks run
                self.close()
                if callable(prev) and prev not in (signal.SIG_DFL, signal.SIG_IGN):
                    prev(signum, frame)
                raise SystemExit(128 + signum)
            signal.signal(signal.SIGTERM, on_term)
        try:
            _ip("netns", "add", self.end_ns)
            _ip("netns", "add", self.cloud_ns)
            self._up = True
            _ip("-n", self.end_ns, "link", "add", self.end_dev, "type", "veth", "peer", "name", self.cloud_dev,
                "netns", self.cloud_ns)
            for ns, dev, ip in ((self.end_ns, self.end_dev, self.end_ip), (self.cloud_ns, self.cloud_dev, self.cloud_ip)):
                # no GSO/TSO super-packets: tbf drops a packet larger than its bucket, and shapes better per MTU
                _ip("-n", ns, "link", "set", dev, "gso_max_size", "1500", "gso_max_segs", "1", check=False)
                _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
            if self._initial_rate is not None:
                self.set_rate(self._initial_rate)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if not self._up:
            return
        self._up = False
        for ns in (self.end_ns, self.cloud_ns):  # deleting a namespace deletes its end of the veth pair
            _ip("netns", "del", ns, check=False)

    # ---- shaping
    def set_rate(self, mbit: float | None) -> None:
        """Rate-limit both directions to `mbit` Mbit/s (None: remove the limit)."""
        for ns, dev in ((self.end_ns, self.end_dev), (self.cloud_ns, self.cloud_dev)):
            base = ["ip", "netns", "exec", ns, "tc", "qdisc"]
            if mbit is None:
                subprocess.run(base + ["del", "dev", dev, "root"], capture_output=True)
                continue
            rate_Bps = mbit * 1e6 / 8
            burst = max(16 * 1024, int(rate_Bps * 0.004))  # ≥ 4 ms of tokens (HZ-granular refills), ≥ 16 KiB
            subprocess.run(base + ["replace", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit", "burst", str(burst),
                                   "latency", "200ms"], check=True, capture_output=True, text=True)
        self.rate_mbit = mbit

    def qdisc(self) -> str:
        return subprocess.run(["ip", "netns", "exec", self.end_ns, "tc", "qdisc", "show", "dev", self.end_dev],
                              capture_output=True, text=True).stdout.strip()

    # ---- running things inside
    def end_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.end_ns, *argv]

    def cloud_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.cloud_ns, *argv]


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def cleanup_leftovers() -> list[str]:
    """Delete every `mtnet-*` namespace (left by a run killed with SIGKILL)."""
    gone = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(f"{PREFIX}-"):
            _ip("netns", "del", name, check=False)
            gone.append(name)
    return gone


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="can namespaces + veth + tbf be created here?")
    p.add_argument("--cleanup", action="store_true", help="delete leftover mtnet-* namespaces")
    a = p.parse_args(argv)
    if a.cleanup:
        print("deleted:", " ".join(cleanup_leftovers()) or "nothing")
    if a.check or not a.cleanup:
        ok, why = available()
        print("netns + veth + tbf: " + ("available" if ok else f"UNAVAILABLE ({why})"))
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
