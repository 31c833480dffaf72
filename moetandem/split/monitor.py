"""LinkMonitor: the link's bandwidth and RTT measured from live split traffic (bytes and timings of each
exchange), for the profile and the re-planner, and the per-exchange deadline derived from them.
bandwidth_bps is in bytes per second (gating.profile.LinkStats)."""
from __future__ import annotations

import math
import threading
import time
from collections import deque


class LinkMonitor:
    """Each exchange reports (bytes sent, bytes received, seconds from send to reply, seconds the cloud spent
    on it). Time on the wire = elapsed − cloud time; RTT = the smallest wire time over a window; bandwidth =
    bytes / (wire time − RTT) summed over the window. Only exchanges with nothing else in flight are used, so
    queueing behind a pipelined micro-batch does not count as link time."""

    def __init__(self, window: int = 64, deadline_window: int = 256, load_tau_s: float = 1.0) -> None:
        """load_tau_s: time constant of the exponential smoothing of the cloud's reported queue depth."""
        self._samples: deque[tuple[int, float]] = deque(maxlen=window)  # (bytes both ways, wire seconds)
        self._exchanges: deque[tuple[float, int]] = deque(maxlen=deadline_window)  # (seconds to reply, bytes sent)
        self._lock = threading.Lock()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.exchanges = 0
        self._baseline: tuple[float, float] | None = None  # (wire time of the reference frame, RTT)
        self._ref_bytes = 0
        self.load_tau_s = load_tau_s
        self.cloud_replicas = 1  # from the last hello (an old cloud sends none: 1)
        self._queue = 0.0  # smoothed queue depth at our replica (an old cloud sends none: 0)
        self._load_t = time.monotonic()
        self._load_base = 1.0  # load factor 1 + queue at the last load change
        self._load_base_t = self._load_t  # the reading time of that change

    def record(self, sent: int, received: int, elapsed_s: float, server_s: float, alone: bool = True) -> None:
        with self._lock:
            self.bytes_sent += sent
            self.bytes_received += received
            self.exchanges += 1
            self._exchanges.append((elapsed_s, sent))
            if alone:
                self._samples.append((sent + received, max(elapsed_s - server_s, 1e-6)))

    def record_load(self, queue: int, replicas: int | None = None, now: float | None = None) -> None:
        """A load reading from a reply: `queue` exchanges of other ends were ahead of ours on our replica;
        `replicas` (hello only) the cloud's replica count. Smoothed in time: a reading after dt seconds weighs
        1 − exp(−dt / load_tau_s), so a burst of replies counts as one moment, a lone probe after a pause fully."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if replicas is not None:
                self.cloud_replicas = max(1, int(replicas))
            w = 1.0 - math.exp(-max(0.0, now - self._load_t) / self.load_tau_s)
            self._queue += w * (max(0, queue) - self._queue)
            self._load_t = max(now, self._load_t)

    @property
    def cloud_queue_depth(self) -> float:
        """The whole cloud's queue for SplitProfile.cloud_queue_depth, which the scheduler spreads over the
        replicas: the front spreads ends evenly, so our replica's smoothed queue × replicas."""
        return self._queue * self.cloud_replicas

    def load_changed(self, factor: float = 2.0, settle_taus: float = 5.0) -> bool:
        """True (once) when the load factor 1 + queue (the scheduler's cloud stretch, 1 + depth / replicas) moved
        by `factor` or more since the last call that said so (the first baseline: an idle cloud), or by
        sqrt(factor) once `settle_taus` smoothing time constants of readings have passed since then: a change
        reported while the smoothed load was still rising (a plan made on a transient: 9.6 on its way to 20) is
        reported again where the load settled, which a factor of 2 alone would never do (20 / 9.6 < 2)."""
        with self._lock:
            now, t = 1.0 + self._queue, self._load_t
        r = _ratio(now, self._load_base)
        settled = t - self._load_base_t >= settle_taus * self.load_tau_s
        if r < factor and not (settled and r >= math.sqrt(factor)):
            return False
        self._load_base, self._load_base_t = now, t
        return True

    @property
    def rtt_s(self) -> float:
        return self.estimate()[1]

    @property
    def bandwidth_bps(self) -> float:
        """Bytes per second on the link (inf while there is not enough traffic to tell)."""
        return self.estimate()[0]

    @property
    def samples(self) -> int:
        """Exchanges in the link-fit window (those with nothing else in flight)."""
        with self._lock:
            return len(self._samples)

    def estimate(self, last: int | None = None) -> tuple[float, float]:
        """(bandwidth bytes/s, RTT s) from the last `last` samples (all of the window by default). Frames of
        different sizes: a least-squares line wire = RTT + bytes / bandwidth (so a slow link is not mistaken for
        a long RTT); frames of one size: RTT = the smallest wire time, bandwidth = bytes / (wire − RTT)."""
        with self._lock:
            xs = list(self._samples)[-last:] if last else list(self._samples)
        return _fit(xs)

    def deadline_s(self, sent: int, k: float, floor: float, ceiling: float, min_samples: int = 8) -> float:
        """How long to wait for the reply to a frame of `sent` bytes: k x the p99 of recent exchange times, times
        (sent / p99 of recent frame sizes) when this frame is larger than those, bounded to [floor, ceiling].
        The ceiling (the configured timeout) until min_samples exchanges have been measured."""
        with self._lock:
            if len(self._exchanges) < min_samples:
                return ceiling
            times = sorted(t for t, _ in self._exchanges)
            sizes = sorted(b for _, b in self._exchanges)
        p99_t, p99_b = _p99(times), _p99(sizes)
        scale = max(1.0, sent / p99_b) if p99_b > 0 else 1.0
        return min(ceiling, max(floor, k * p99_t * scale))

    def changed(self, factor: float = 2.0, min_samples: int = 8, recent: int = 8, min_shift_s: float = 3e-3) -> bool:
        """True (once) when the wire time of a typical frame (RTT + its bytes / bandwidth, the frame size being
        the median at the last change) moved by more than `factor` and by at least `min_shift_s` since the last
        call that said so, judged on the last `recent` samples (the first call with enough samples sets the
        baseline). Scheduling noise of a few ms does not count; a slower rate or a longer RTT does. On a change
        the window keeps only those recent samples, so `bandwidth_bps` / `rtt_s` (what the re-planner reads)
        describe the new link."""
        if len(self._samples) < min_samples:
            return False
        bw, rtt = self.estimate(recent)
        if self._baseline is None:
            with self._lock:
                sizes = sorted(b for b, _ in self._samples)
            self._ref_bytes = sizes[len(sizes) // 2]
            self._baseline = (rtt + self._ref_bytes / bw, rtt)
            return False
        now = rtt + self._ref_bytes / bw
        moved = _ratio(max(now, 1e-6), max(self._baseline[0], 1e-6)) > factor and \
            abs(now - self._baseline[0]) >= min_shift_s
        if moved:
            self._baseline = (now, rtt)
            with self._lock:
                keep = list(self._samples)[-recent:]
                self._samples.clear()
                self._samples.extend(keep)
        return moved

    def reset(self) -> None:
        """Forget the link measured so far (a new link: the next estimates and changes start from scratch)."""
        with self._lock:
            self._samples.clear()
            self._baseline = None

    def as_dict(self) -> dict[str, float]:
        return {"bandwidth_bps": self.bandwidth_bps, "rtt_s": self.rtt_s, "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received, "exchanges": self.exchanges,
                "cloud_queue_depth": self.cloud_queue_depth, "cloud_replicas": self.cloud_replicas}


def _fit(xs: list[tuple[int, float]]) -> tuple[float, float]:
    """(bandwidth, RTT) of (bytes, wire seconds) samples; see LinkMonitor.estimate."""
    if not xs:
        return float("inf"), 0.0
    n = len(xs)
    mb, mw = sum(b for b, _ in xs) / n, sum(w for _, w in xs) / n
    vb = sum((b - mb) ** 2 for b, _ in xs) / n
    if n >= 4 and vb > (0.2 * mb) ** 2:  # sizes differ enough to separate the two terms
        slope = sum((b - mb) * (w - mw) for b, w in xs) / n / vb  # seconds per byte
        rtt = min(w - b * slope for b, w in xs)
        if slope > 0 and rtt >= 0.5 * min(w for _, w in xs):  # else noise, not bytes, made the slope
            return 1.0 / slope, rtt
    rtt = min(w for _, w in xs)
    nbytes, busy = sum(b for b, _ in xs), sum(w - rtt for _, w in xs)
    return (nbytes / busy if busy > 1e-6 and nbytes else float("inf")), rtt


def _p99(xs: list) -> float:
    """The 99th percentile of sorted xs (nearest rank)."""
    return float(xs[min(len(xs) - 1, int(0.99 * len(xs)))])


def _ratio(a: float, b: float) -> float:
    if a == b:
        return 1.0
    if min(a, b) <= 0 or max(a, b) == float("inf"):
        return float("inf")
    return max(a, b) / min(a, b)
