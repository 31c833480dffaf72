"""LinkMonitor: the link's bandwidth and RTT measured from live split traffic (bytes and timings of each
exchange), for the profile and the re-planner. bandwidth_bps is in bytes per second (gating.profile.LinkStats)."""
from __future__ import annotations

import threading
from collections import deque


class LinkMonitor:
    """Each exchange reports (bytes sent, bytes received, seconds from send to reply, seconds the cloud spent
    on it). Time on the wire = elapsed − cloud time; RTT = the smallest wire time over a window; bandwidth =
    bytes / (wire time − RTT) summed over the window. Only exchanges with nothing else in flight are used, so
    queueing behind a pipelined micro-batch does not count as link time."""

    def __init__(self, window: int = 64) -> None:
        self._samples: deque[tuple[int, float]] = deque(maxlen=window)  # (bytes both ways, wire seconds)
        self._lock = threading.Lock()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.exchanges = 0
        self._baseline: tuple[float, float] | None = None

    def record(self, sent: int, received: int, elapsed_s: float, server_s: float, alone: bool = True) -> None:
        with self._lock:
            self.bytes_sent += sent
            self.bytes_received += received
            self.exchanges += 1
            if alone:
                self._samples.append((sent + received, max(elapsed_s - server_s, 1e-6)))

    @property
    def rtt_s(self) -> float:
        with self._lock:
            return min((w for _, w in self._samples), default=0.0)

    @property
    def bandwidth_bps(self) -> float:
        """Bytes per second on the link (inf while there is not enough traffic to tell)."""
        rtt = self.rtt_s
        with self._lock:
            nbytes = sum(b for b, _ in self._samples)
            busy = sum(w - rtt for _, w in self._samples)
        return nbytes / busy if busy > 1e-6 and nbytes else float("inf")

    def changed(self, factor: float = 2.0, min_samples: int = 8) -> bool:
        """True (once) when bandwidth or RTT moved by more than `factor` since the last call that said so
        (the first call with enough samples sets the baseline)."""
        if len(self._samples) < min_samples:
            return False
        now = (self.bandwidth_bps, self.rtt_s)
        if self._baseline is None:
            self._baseline = now
            return False
        moved = any(_ratio(a, b) > factor for a, b in zip(now, self._baseline))
        if moved:
            self._baseline = now
        return moved

    def as_dict(self) -> dict[str, float]:
        return {"bandwidth_bps": self.bandwidth_bps, "rtt_s": self.rtt_s, "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received, "exchanges": self.exchanges}


def _ratio(a: float, b: float) -> float:
    if a == b:
        return 1.0
    if min(a, b) <= 0 or max(a, b) == float("inf"):
        return float("inf")
    return max(a, b) / min(a, b)
