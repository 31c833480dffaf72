"""In-transport link shaper: rate, RTT, jitter and loss applied in the application layer, one direction each.

Where the kernel has no netem (or no namespaces), each side of a split link shapes what it sends: the end its
requests, the cloud its replies (one shaper per connected end). A frame of n bytes is charged to a token bucket
(rate, burst) as the packets TCP would put on the wire (MSS payload + 66 bytes of Ethernet/IP/TCP headers, as tbf
counts them), then delivered one-way delay = RTT/2 + uniform(−jitter/2, +jitter/2) after it left the bucket.
Loss is per packet: a lost packet is sent again (its bytes charged again) and costs what TCP would pay — one
more RTT (fast retransmit after three duplicate ACKs) for a loss inside the frame, a retransmission timeout
(max(200 ms, RTT + 4·jitter), Linux's RTO floor) for a loss among the frame's last three packets, which no
later packet can reveal. Delivery is in order, as on one TCP connection: a frame never arrives before the one
sent before it.

    spec = LinkSpec(rate_mbit=50, rtt_ms=20, jitter_ms=2, loss=0.001)
    shaper = spec.shaper()
    due = shaper.due(len(frame_bytes))       # time.monotonic() at which the peer may see this frame
"""
from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import dataclass

from moetandem.errors import InvalidRequestError

MSS = 1448  # TCP payload per packet (1500 MTU, 20 IP + 32 TCP with timestamps)
HEADER = 66  # per packet on the wire as tbf counts it: 14 Ethernet + 20 IP + 32 TCP
RTO_MIN_S = 0.2  # Linux's minimum retransmission timeout


@dataclass(frozen=True)
class LinkSpec:
    rate_mbit: float = 0.0  # each direction; 0 = not limited
    rtt_ms: float = 0.0
    jitter_ms: float = 0.0  # the one-way delay varies uniformly within ±jitter/2
    loss: float = 0.0  # probability that one packet is lost
    seed: int | None = None

    def __post_init__(self) -> None:
        for name, v in (("--emulate-rate-mbit", self.rate_mbit), ("--emulate-rtt-ms", self.rtt_ms),
                        ("--emulate-jitter-ms", self.jitter_ms)):
            if not (math.isfinite(v) and v >= 0):
                raise InvalidRequestError(f"{name} {v}: must be a number >= 0 (0 = off)")
        if not 0 <= self.loss < 1:
            raise InvalidRequestError(f"--emulate-loss {self.loss}: a packet-loss probability in [0, 1), "
                                      "e.g. 0.001 for 0.1%")

    @property
    def active(self) -> bool:
        return bool(self.rate_mbit or self.rtt_ms or self.jitter_ms or self.loss)

    def shaper(self, seed_offset: int = 0) -> "LinkShaper":
        return LinkShaper(self, None if self.seed is None else self.seed + seed_offset)


class LinkShaper:
    """One direction of an emulated link (thread-safe; shared by every stream of one connection)."""

    def __init__(self, spec: LinkSpec, seed: int | None = None) -> None:
        self.spec = spec
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._tokens = 0.0  # bytes of credit in the bucket (negative: debt the rate still has to pay)
        self._t = time.monotonic()
        self._last_due = 0.0
        self.bytes_on_wire = 0
        self.lost_packets = 0
        self.set_rate(spec.rate_mbit)

    def set_rate(self, mbit: float, burst_bytes: float | None = None) -> None:
        """Change the rate on the fly (0 = not limited); the bucket keeps its debt. The burst (bytes that pass
        at once after an idle spell) defaults to max(16 KiB, 4 ms of the rate), as tbf in bench/netem.py."""
        if not (math.isfinite(mbit) and mbit >= 0):
            raise InvalidRequestError(f"rate {mbit} Mbit/s: must be >= 0")
        with self._lock:
            self.rate_bps = mbit * 1e6 / 8  # bytes per second
            self.burst = burst_bytes if burst_bytes is not None else max(16384.0, 0.004 * self.rate_bps)
            self._tokens = min(self._tokens, self.burst) if self._tokens else self.burst

    def set_rtt(self, rtt_ms: float) -> None:
        self.spec = LinkSpec(self.spec.rate_mbit, rtt_ms, self.spec.jitter_ms, self.spec.loss, self.spec.seed)

    def due(self, nbytes: int, now: float | None = None) -> float:
        """time.monotonic() at which a frame of nbytes submitted at `now` reaches the other side."""
        s = self.spec
        now = time.monotonic() if now is None else now
        packets = max(1, math.ceil(nbytes / MSS))
        with self._lock:
            lost_tail = sum(self._rng.random() < s.loss for _ in range(min(3, packets))) if s.loss else 0
            lost_body = self._binomial(packets - 3, s.loss) if s.loss and packets > 3 else 0
            lost = lost_tail + lost_body
            wire = nbytes + packets * HEADER + lost * (MSS + HEADER)  # bytes tbf would count, resends included
            self.bytes_on_wire += wire
            self.lost_packets += lost
            left = now
            if self.rate_bps > 0:
                self._tokens = min(self.burst, self._tokens + (now - self._t) * self.rate_bps) - wire
                self._t = now
                left = now + max(0.0, -self._tokens / self.rate_bps)  # the last byte leaves the bucket
            rtt, jit = s.rtt_ms / 1e3, s.jitter_ms / 1e3
            delay = max(0.0, rtt / 2 + (self._rng.uniform(-jit / 2, jit / 2) if jit else 0.0))
            if lost_tail:
                delay += max(RTO_MIN_S, rtt + 4 * jit)
            elif lost_body:
                delay += rtt
            due = max(left + delay, self._last_due)  # in order, as on one TCP connection
            self._last_due = due
            return due

    def _binomial(self, n: int, p: float) -> int:
        if n <= 4096:  # exact for the packet counts of most frames; normal approximation beyond
            return sum(self._rng.random() < p for _ in range(n))
        return max(0, round(self._rng.gauss(n * p, math.sqrt(n * p * (1 - p)))))


class PeerShapers:
    """The cloud's side: one reply shaper per connected end (keyed by the gRPC peer: one TCP connection)."""

    def __init__(self, spec: LinkSpec, max_peers: int = 4096) -> None:
        self.spec, self.max_peers = spec, max_peers
        self._lock = threading.Lock()
        self._by_peer: dict[str, LinkShaper] = {}

    def get(self, peer: str) -> LinkShaper:
        with self._lock:
            sh = self._by_peer.get(peer)
            if sh is None:
                if len(self._by_peer) >= self.max_peers:
                    self._by_peer.clear()
                sh = self._by_peer[peer] = self.spec.shaper(len(self._by_peer))
            return sh

    def set_rate(self, mbit: float, burst_bytes: float | None = None) -> None:
        with self._lock:
            self.spec = LinkSpec(mbit, self.spec.rtt_ms, self.spec.jitter_ms, self.spec.loss, self.spec.seed)
            for sh in self._by_peer.values():
                sh.set_rate(mbit, burst_bytes)
