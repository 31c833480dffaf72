"""Live device profile: what this device can hold and run right now, measured (never configured).

Free memory, expert FFN time on the device and on the host, the cost of bringing one expert to the device,
load, and in split mode the link's bandwidth and RTT. `ProfileMonitor` refreshes it between engine steps at a
bounded share of the run time and feeds the committee's cost model, the local-expert selector and /metrics."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch

from moetandem.errors import InvalidRequestError
from moetandem.host_memory import host_memory
from moetandem.experts.store import flat_views
from moetandem.models.layers import expert_ffn

if TYPE_CHECKING:
    from moetandem.engine import Engine


class LinkStats(Protocol):
    """What the profile reads from a link monitor (split mode): measured from live traffic."""

    bandwidth_bps: float  # bytes per second
    rtt_s: float


@dataclass
class DeviceProfile:
    device: str
    free_memory_bytes: int  # GPU: cudaMemGetInfo; CPU: MemAvailable
    total_memory_bytes: int
    expert_bytes: int  # one expert's weights in the compute dtype
    expert_ffn_device_s: float  # one expert, one token, on the compute device
    expert_ffn_host_s: float  # one expert, one token, on the host CPU (fp32)
    fetch_s: float  # bring one expert to the device (pinned H2D copy on GPU; read from the mapped file on CPU)
    h2d_bytes_per_s: float
    load: float  # host load average per core (1 min)
    queue_depth: int = 0  # requests waiting for a batch slot (serving)
    resident_experts: int = 0  # experts in the committee now (all of them without a budget)
    total_experts: int = 0
    committee_bytes: int = 0
    link_bandwidth_bps: float | None = None
    link_rtt_s: float | None = None
    measured_at: float = field(default_factory=time.time)
    measure_s: float = 0.0  # what the last measurement cost

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.as_dict(), indent=2) + "\n")

    def table(self) -> str:
        rows = [("device", self.device),
                ("free memory", f"{self.free_memory_bytes / 2**30:.2f} GiB of {self.total_memory_bytes / 2**30:.2f}"),
                ("one expert", f"{self.expert_bytes / 2**20:.2f} MiB"),
                ("expert FFN, device (1 token)", f"{self.expert_ffn_device_s * 1e6:.0f} µs"),
                ("expert FFN, host (1 token)", f"{self.expert_ffn_host_s * 1e6:.0f} µs"),
                ("fetch one expert", f"{self.fetch_s * 1e6:.0f} µs ({self.h2d_bytes_per_s / 1e9:.2f} GB/s)"),
                ("load per core", f"{self.load:.2f}"), ("queue depth", str(self.queue_depth)),
                ("resident experts", f"{self.resident_experts} of {self.total_experts} "
                                     f"({self.committee_bytes / 2**20:.1f} MiB)")]
        if self.link_bandwidth_bps is not None:
            rows.append(("link", f"{self.link_bandwidth_bps * 8 / 1e6:.1f} Mbit/s, RTT "
                                 f"{(self.link_rtt_s or 0) * 1e3:.1f} ms"))
        rows.append(("measured in", f"{self.measure_s * 1e3:.1f} ms"))
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def memory_info(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of the compute device's memory."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    return host_memory()


def time_call(fn: Callable[[], Any], device: torch.device | str, reps: int = 5, stat: str = "median") -> float:
    """Median (or "min": the cost without preemption by other processes) seconds of fn() over `reps` runs after
    one warm-up, synchronised on CUDA."""
    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times) if stat == "min" else sorted(times)[len(times) // 2]


def _load_per_core() -> float:
    try:
        return os.getloadavg()[0] / max(1, os.cpu_count() or 1)
    except OSError:
        return 0.0


def measure_timings(engine: "Engine", reps: int = 5) -> dict[str, float]:
    """The expensive part of a profile: expert FFN on device and host, and one expert's fetch."""
    store, dev, dt = engine.store, engine.device, engine.dtype
    I, H = store.inter, store.hidden
    layer = store.layers[0]
    flat = store.read_flat(layer, 0, dt)  # [3IH]
    on_dev = flat.to(dev)
    w13, w2 = flat_views(on_dev, I, H)
    x = torch.randn(1, H, device=dev, dtype=dt)
    device_s = time_call(lambda: expert_ffn(x, w13, w2), dev, reps)
    hw13, hw2 = flat_views(flat.float(), I, H)
    hx = torch.randn(1, H)
    host_s = time_call(lambda: expert_ffn(hx, hw13, hw2), torch.device("cpu"), reps)
    if dev.type == "cuda":
        src = flat.pin_memory()
        fetch_s = time_call(lambda: on_dev.copy_(src, non_blocking=True), dev, reps)
    else:  # on a CPU box a fetch is reading the expert out of the mapped checkpoint
        e = store.num_experts - 1
        fetch_s = time_call(lambda: store.read_flat(layer, e, dt), dev, reps)
    return {"expert_ffn_device_s": device_s, "expert_ffn_host_s": host_s, "fetch_s": fetch_s,
            "h2d_bytes_per_s": store.expert_bytes(dt) / max(fetch_s, 1e-9)}


def measure_profile(engine: "Engine", link: LinkStats | None = None, queue_depth: int = 0,
                    timings: dict[str, float] | None = None, reps: int = 5) -> DeviceProfile:
    """A full profile now; pass `timings` to reuse the expensive FFN/fetch figures of an earlier one."""
    t0 = time.perf_counter()
    store = engine.store
    free, total = memory_info(engine.device)
    t = timings or measure_timings(engine, reps)
    committee = getattr(engine.provider, "layers", None)
    n_all = store.num_experts * len(store.layers)
    resident = sum(len(st.slot_of) for st in committee.values()) if committee else n_all
    prof = DeviceProfile(
        device=str(engine.device), free_memory_bytes=free, total_memory_bytes=total,
        expert_bytes=store.expert_bytes(engine.dtype), load=_load_per_core(), queue_depth=queue_depth,
        resident_experts=resident, total_experts=n_all, committee_bytes=engine.provider.expert_bytes(), **t)
    if link is not None:
        prof.link_bandwidth_bps, prof.link_rtt_s = float(link.bandwidth_bps), float(link.rtt_s)
    prof.measure_s = time.perf_counter() - t0
    return prof


def probe_link(roundtrip: Callable[[bytes], Any], small: int = 64, large: int = 1 << 18,
               reps: int = 3) -> tuple[float, float]:
    """A short probe at start: (bandwidth bytes/s, RTT s) from timing round trips of a small and a large payload
    through `roundtrip(payload)` (which sends it and waits for the answer)."""
    def timed(n: int) -> float:
        payload = os.urandom(n)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            roundtrip(payload)
            best = min(best, time.perf_counter() - t)
        return best
    rtt = timed(small)
    big = timed(large)
    return (large - small) / max(big - rtt, 1e-9), rtt


class ProfileMonitor:
    """Keeps a live profile. `maybe_refresh()` is called between engine steps: cheap fields (memory, load,
    committee, link) every `every_s`, the timed fields only while their cost stays below `max_share` of the
    elapsed time. Listeners (cost model, local selector, metrics) are called with each new profile."""

    def __init__(self, engine: "Engine", link: LinkStats | None = None, every_s: float = 5.0,
                 max_share: float = 0.01, queue_depth: Callable[[], int] | None = None) -> None:
        if every_s <= 0 or not 0 < max_share <= 1:
            raise InvalidRequestError("profile refresh needs every_s > 0 and 0 < max_share <= 1")
        self.engine, self.link, self.every_s, self.max_share = engine, link, every_s, max_share
        self.queue_depth = queue_depth or (lambda: 0)
        self.listeners: list[Callable[[DeviceProfile], None]] = []
        self.spent_s = 0.0
        self.started = time.perf_counter()
        self.profile = measure_profile(engine, link)
        self._timings = {k: getattr(self.profile, k) for k in
                         ("expert_ffn_device_s", "expert_ffn_host_s", "fetch_s", "h2d_bytes_per_s")}
        self.spent_s += self.profile.measure_s
        self._last = time.perf_counter()

    def on_update(self, fn: Callable[[DeviceProfile], None]) -> None:
        self.listeners.append(fn)
        fn(self.profile)

    def maybe_refresh(self, force: bool = False) -> DeviceProfile:
        now = time.perf_counter()
        if not force and now - self._last < self.every_s:
            return self.profile
        retime = force or self.spent_s + self.profile.measure_s < self.max_share * (now - self.started)
        prof = measure_profile(self.engine, self.link, self.queue_depth(), None if retime else self._timings)
        if retime:
            self._timings = {k: getattr(prof, k) for k in self._timings}
        self.spent_s += prof.measure_s
        # the interval runs from the end of a measurement: one slower than every_s (a loaded host) is not redone
        # by the very next call
        self._last, self.profile = time.perf_counter(), prof
        for fn in self.listeners:
            fn(prof)
        return prof
