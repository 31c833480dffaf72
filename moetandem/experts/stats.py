"""Committee counters. Per-assignment counts (hits, misses, substitutions, skips, deferrals) are accumulated on the
device with tensor ops, so a graph-captured step counts too; host events (fetches, host computes, swaps, bytes,
stalls) are plain fields. `snapshot()` reads the device part: call it between steps."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

DEVICE_FIELDS = ("hits", "misses", "substitutions", "skips", "deferred", "miss_reads")


@dataclass
class CommitteeStats:
    hits: int = 0
    misses: int = 0
    substitutions: int = 0
    skips: int = 0  # assignments dropped because their gate weight was below τ
    #: misses a graph-safe policy could neither substitute nor compute, or past a token's --miss-reads cap:
    #: weight 0 this step
    deferred: int = 0
    miss_reads: int = 0  # assignments computed from a missed expert's host copy (mapped, fetched or on the host)
    fetches: int = 0
    host_computes: int = 0
    swaps: int = 0
    failed_swaps: int = 0  # copies that raised (the slot stays empty; its expert is read as a miss)
    bytes_moved: int = 0  # copies into slots (swaps, fetches), each in the bytes it moved
    #: bytes of host copies misses read (--miss-format's: fetched, host-computed, or read zero-copy, where each
    #: mapped assignment counts its expert once)
    miss_bytes: int = 0
    stall_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.misses)


class StatCounters:
    """Host fields in `host`; the DEVICE_FIELDS in one int64 tensor on the compute device."""

    def __init__(self, device: torch.device) -> None:
        self.host = CommitteeStats()
        self.device = torch.zeros(len(DEVICE_FIELDS), dtype=torch.int64, device=device)  # [6]

    def add(self, counts: torch.Tensor) -> None:
        """counts [6] in DEVICE_FIELDS order, on the device (no host sync)."""
        self.device.add_(counts)

    def snapshot(self) -> CommitteeStats:
        """Host fields plus the device counts (one host sync)."""
        dev = dict(zip(DEVICE_FIELDS, self.device.tolist()))
        return replace(self.host, **dev)


def bus_hint(s: CommitteeStats, approximate: bool, min_lookups: int = 512, max_hit_rate: float = 0.7) -> str | None:
    """A one-line suggestion when a committee's misses are read over the host bus at a low hit rate (after at
    least `min_lookups` expert lookups), else None. On a GPU such a miss costs ~100x a resident read, and random-
    like routers keep the hit rate near the slots' share: there an int4 copy of every expert on the GPU (the
    device tier) served balanced at 50% faster than bus misses on every random-router shape measured (figures:
    benchmarks.md, "where we stand")."""
    if s.miss_bytes == 0 or s.hits + s.misses < min_lookups or s.hit_rate >= max_hit_rate:
        return None
    gib = s.miss_bytes / 2**30
    head = (f"[moetandem] hint: hit rate {s.hit_rate:.2f}; {s.miss_reads} misses read {gib:.1f} GiB over the "
            "host bus, which bounds decode. ")
    if approximate:
        return head + ("--miss-format int4 --miss-tier device keeps an int4 copy of every expert on the GPU inside "
                       "the budget, so no miss crosses the bus (faster, slightly less exact: docs/benchmarks.md)")
    return head + ("--fidelity exact reads every miss exactly; --fidelity balanced --miss-format int4 --miss-tier "
                   "device serves misses from an int4 copy on the GPU instead (tokens then differ a little from "
                   "all-resident: docs/benchmarks.md), or raise --expert-budget")


def provider_hint(provider: object, device: torch.device) -> str | None:
    """bus_hint for an engine's provider (engine.provider) on `device`: None off a GPU or without a committee."""
    stats, policy = getattr(provider, "stats", None), getattr(provider, "policy", None)
    if device.type != "cuda" or not isinstance(stats, CommitteeStats) or policy is None:
        return None
    return bus_hint(stats, approximate=policy.graph)
