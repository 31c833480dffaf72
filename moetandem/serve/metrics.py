"""Prometheus metrics of the server, in a registry of their own (several apps can live in one process)."""
from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "moetandem"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class ServerMetrics:
    """Everything /metrics reports. The engine thread and the HTTP handlers update it; prometheus-client's
    metric objects are thread-safe."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.running = Gauge(f"{PREFIX}_requests_running", "sequences decoding in the batch now", registry=r)
        self.waiting = Gauge(f"{PREFIX}_requests_waiting", "sequences queued for a batch slot", registry=r)
        self.batch_slots = Gauge(f"{PREFIX}_batch_slots", "KV-cache slots (the largest decode batch)", registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "arrival to first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}_time_per_output_token_seconds",
                             "time between consecutive generated tokens of one sequence (inter-token latency)",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "arrival to last token of a sequence",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(f"{PREFIX}_request_queue_time_seconds", "arrival to admission into a slot",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "tokens generated", registry=r)
        self.request_prompt_tokens = Histogram(f"{PREFIX}_request_prompt_tokens", "prompt length per sequence",
                                               buckets=TOKEN_BUCKETS, registry=r)
        self.request_generation_tokens = Histogram(f"{PREFIX}_request_generation_tokens",
                                                   "generated tokens per sequence", buckets=TOKEN_BUCKETS,
                                                   registry=r)
        self.sequences_submitted = Counter(f"{PREFIX}_sequences_submitted", "sequences accepted into the queue "
                                           "(one per choice)", registry=r)
        self.sequences_finished = Counter(f"{PREFIX}_sequences_finished", "sequences that left the engine",
                                          ["finish_reason"], registry=r)
        self.batch_size = Histogram(f"{PREFIX}_decode_batch_size", "sequences per decode step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.steps = Counter(f"{PREFIX}_decode_steps", "decode steps run", registry=r)
        self.http_requests = Counter(f"{PREFIX}_http_requests", "HTTP requests answered", ["path", "status"],
                                     registry=r)
        self.rejected = Counter(f"{PREFIX}_requests_rejected", "requests refused because the queue was full",
                                registry=r)
        self.engine_errors = Counter(f"{PREFIX}_engine_errors", "engine exceptions (each fails the sequences "
                                     "it touched)", registry=r)
        r.register(_ExpertStats(memory_bytes, "memory_bytes", "this process's resident memory (rss) and, on CUDA, "
                                "the caching allocator's allocated and reserved bytes"))

    def bind_expert_stats(self, stats: Callable[[], dict[str, float]]) -> None:
        """Export Engine.expert_stats() (committee hits, misses, swaps, bytes moved, ...) at each scrape."""
        self.registry.register(_ExpertStats(stats))

    def bind_split_stats(self, stats: Callable[[], dict[str, float]]) -> None:
        """Export split execution's counters (SplitModel.split_stats(): fallbacks, link bytes, RTT, ...)."""
        self.registry.register(_ExpertStats(stats, "split_stats", "split execution counters since start "
                                            "(fallbacks to end-only, link losses, bytes, bandwidth, RTT)"))

    def bind_gauges(self, running: Callable[[], float], waiting: Callable[[], float], slots: int) -> None:
        self.running.set_function(running)
        self.waiting.set_function(waiting)
        self.batch_slots.set(slots)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def memory_bytes() -> dict[str, float]:
    """RSS of this process (Linux) and the CUDA caching allocator's bytes (when CUDA is in use)."""
    import os
    import sys
    out: dict[str, float] = {}
    try:
        with open("/proc/self/statm") as f:
            out["rss"] = float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        pass
    torch = sys.modules.get("torch")  # never import torch for this (nor initialise CUDA)
    if torch is not None and torch.cuda.is_initialized():
        out["gpu_allocated"] = float(torch.cuda.memory_allocated())
        out["gpu_reserved"] = float(torch.cuda.memory_reserved())
    return out


class _ExpertStats(Collector):
    def __init__(self, stats: Callable[[], dict[str, float]], name: str = "expert_stats",
                 doc: str = "expert committee counters since start (Engine.expert_stats(); empty when every "
                            "expert is resident)") -> None:
        self.stats, self.name, self.doc = stats, name, doc

    def collect(self) -> Iterator[Metric]:
        try:
            values = self.stats()
        except Exception:  # a provider mid-update must not break /metrics
            values = {}
        if values:
            fam = GaugeMetricFamily(f"{PREFIX}_{self.name}", self.doc, labels=["stat"])
            for k, v in values.items():
                fam.add_metric([k], float(v))
            yield fam

    def describe(self) -> Iterator[Metric]:
        return iter(())
