"""Route-aware scheduler for end–cloud split execution (pure functions, no I/O).

From a SplitProfile (per-layer compute on end and cloud, per-expert FFN time, routing frequencies, the end's
expert memory, the link) choose where to cut, which experts of the end's layers stay on the end (hot ones, by
routing frequency, while they fit) and which run in the cloud, the codec rank and the number of micro-batches.

Layout of a plan (L layers): the end runs the embedding and layers [0, a), the cloud runs [a, L-b), the end runs
[L-b, L) + norm + lm_head. Up-link at a carries codec frames (token ids when a = 0: the cloud embeds); down-link
at L-b carries codec frames. a = b = 0 is cloud-only: tokens up, sampled tokens down. a = L is end-only.
In an end layer, a token whose top-k touches a cloud expert sends its row (fp16) and gets the output back.

Cost of one decode step of a micro-batch of s tokens (t = per-token times from the profile):
  end   = o_end + s·(head + Σ_end-layers (attn_l + Σ_e∈end f_le·t_expert))
  cloud = o_cloud + s·(Σ_cloud-layers (attn_l + k·t_expert) + Σ_end-layers Σ_e∈cloud f_le·t_expert)
  link  = s·bytes/bandwidth per direction; round trips = [cloud layers] + Σ_end-layers P(some token needs the
          cloud), P = 1-(1-p_l)^s, p_l = 1-Π_e∈cloud(1-f_le) (routing treated as independent across experts)
  cycle = end + cloud + link_up + link_down + round trips·RTT
With m micro-batches in flight the step period is max(cycle, m·end, m·cloud, m·link_up, m·link_down): latency
per token = period, throughput = concurrency / period. Bandwidth is in bytes per second.
A shared cloud (cloud_queue_depth micro-batches of other ends queued over cloud_replicas replicas) stretches the
cloud term: cloud × (1 + queue_depth / replicas)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from moetandem.errors import InvalidRequestError


@dataclass
class SplitProfile:
    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    end_layer_s: list[float]  # [L] attention + router (+ norms) per token on the end, seconds
    cloud_layer_s: list[float]  # [L] the same in the cloud
    end_expert_s: float  # one expert FFN for one token on the end (experts of a model share one shape)
    cloud_expert_s: float
    expert_bytes: int  # one expert's weights
    end_expert_budget: int  # bytes the end may spend on experts
    routing_freq: list[list[float]]  # [L][E] fraction of tokens routed to each expert (a row sums to top_k)
    bandwidth_bps: float  # link bytes per second, each direction
    rtt_s: float
    codec_bytes: dict[int, int] = field(default_factory=dict)  # rank → bytes per token (r + 2)
    codec_quality: dict[int, float] = field(default_factory=dict)  # rank → perplexity increase per crossing
    max_ppl_increase: float = 0.01
    concurrency: int = 1  # requests decoding together (one token each per step)
    end_head_s: float = 0.0  # embedding + norm + lm_head per token on the end
    cloud_head_s: float = 0.0
    end_step_overhead_s: float = 0.0  # fixed cost of one step of one micro-batch
    cloud_step_overhead_s: float = 0.0
    token_bytes: int = 4
    cloud_available: bool = True
    #: the cloud side: its replicas (moetandem cloud --replicas) and the micro-batches of other ends queued on
    #: the whole cloud; the front spreads them, so ours waits behind queue_depth / replicas of them on average
    cloud_replicas: int = 1
    cloud_queue_depth: float = 0.0

    def __post_init__(self) -> None:
        L, E = self.num_layers, self.num_experts
        if len(self.end_layer_s) != L or len(self.cloud_layer_s) != L:
            raise InvalidRequestError(f"profile needs {L} per-layer times on end and cloud")
        if len(self.routing_freq) != L or any(len(r) != E for r in self.routing_freq):
            raise InvalidRequestError(f"routing_freq must be [{L}][{E}] (layers × experts)")
        if self.cloud_available and (self.bandwidth_bps <= 0 or self.rtt_s < 0):
            raise InvalidRequestError(f"link needs bandwidth > 0 bytes/s and RTT >= 0 (got {self.bandwidth_bps}, "
                                      f"{self.rtt_s})")
        if self.cloud_replicas < 1 or self.cloud_queue_depth < 0:
            raise InvalidRequestError("cloud_replicas must be >= 1 and cloud_queue_depth >= 0")
        if self.concurrency < 1 or self.expert_bytes <= 0:
            raise InvalidRequestError("concurrency must be >= 1 and expert_bytes > 0")


@dataclass
class SplitPlan:
    num_layers: int
    end_layers_head: int  # layers [0, a) on the end
    end_layers_tail: int  # layers [L-b, L) + norm + lm_head on the end
    cloud_experts: dict[int, list[int]]  # end layer → its experts computed in the cloud
    codec_rank: int | None  # None: fp16 activations (or token ids only)
    micro_batches: int
    objective: str  # "latency" | "throughput"
    predicted_latency_s: float  # per decode step (one token for every request)
    predicted_throughput_tok_s: float
    predicted_bytes_per_token: float = 0.0  # both directions
    predicted_ppl_increase: float = 0.0
    round_trips_per_step: float = 0.0

    @property
    def cloud_layers(self) -> range:
        return range(self.end_layers_head, self.num_layers - self.end_layers_tail)

    @property
    def mode(self) -> str:
        if self.end_layers_head >= self.num_layers:
            return "end-only" if not self.cloud_experts else "end layers, cloud experts"
        return "cloud-only" if self.end_layers_head == 0 and self.end_layers_tail == 0 else "split"

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        L, a, b = self.num_layers, self.end_layers_head, self.end_layers_tail
        n_cloud = sum(len(v) for v in self.cloud_experts.values())
        parts = [f"{self.mode}: end layers [0,{a})" + (f" + [{L - b},{L})" if b else ""),
                 f"cloud layers [{a},{L - b})" if a < L - b else "no cloud layers",
                 f"{n_cloud} end-layer experts in the cloud" if n_cloud else "all end-layer experts on the end",
                 f"codec r{self.codec_rank}" if self.codec_rank is not None else "fp16/tokens on the link",
                 f"{self.micro_batches} micro-batch(es), {self.objective}",
                 f"predicted {1e3 * self.predicted_latency_s:.2f} ms/step, {self.predicted_throughput_tok_s:.1f} tok/s,"
                 f" {self.predicted_bytes_per_token:.0f} B/token, {self.round_trips_per_step:.2f} round trips/step,"
                 f" Δppl ≤ {100 * self.predicted_ppl_increase:.2f}%"]
        return "; ".join(parts)


class _Layers:
    """Per layer: expert frequencies sorted hot → cold, prefix sums of the held frequency and suffix sums of
    log(1 - f) (the probability that a token touches none of the cold experts)."""

    def __init__(self, p: SplitProfile) -> None:
        f = np.clip(np.asarray(p.routing_freq, dtype=np.float64), 0.0, 1.0)  # [L, E]
        self.order = np.argsort(-f, axis=1, kind="stable")  # [L, E]
        fs = np.take_along_axis(f, self.order, 1)  # [L, E] hot first
        self.freq = fs
        self.held = np.concatenate([np.zeros((f.shape[0], 1)), fs.cumsum(1)], 1)  # [L, E+1]: Σ of the c hottest
        lg = np.log1p(-np.minimum(fs, 1 - 1e-12))
        self.none_cold = np.concatenate([np.cumsum(lg[:, ::-1], 1)[:, ::-1], np.zeros((f.shape[0], 1))], 1)


def _end_counts(lay: _Layers, end_layers: list[int], n: int) -> dict[int, int]:
    """How many experts of each end layer the n globally hottest (of the end layers) are."""
    if not end_layers or n <= 0:
        return {l: 0 for l in end_layers}
    f = lay.freq[end_layers].ravel()  # [len(end) * E]
    n = min(n, f.size)
    top = np.argsort(-f, kind="stable")[:n]
    counts = np.bincount(top // lay.freq.shape[1], minlength=len(end_layers))
    return {l: int(c) for l, c in zip(end_layers, counts)}


@dataclass
class _Parts:
    """Per-token work of one (cut, placement), independent of codec rank and micro-batching."""
    end_t: float  # seconds per token on the end
    cloud_t: float
    up_fixed: float  # bytes per token up/down besides the cut frames (expert rows)
    down_fixed: float
    p_layers: list[float]  # per end layer with cloud experts: P(a token needs the cloud there)
    has_cloud_layers: bool
    cloud_only: bool
    a_zero: bool


def _parts(p: SplitProfile, lay: _Layers, a: int, b: int, counts: dict[int, int]) -> _Parts:
    L, k, E = p.num_layers, p.top_k, p.num_experts
    cloud_layers = range(a, L - b)
    cloud_only = a == 0 and b == 0
    end_t = 0.0 if cloud_only else p.end_head_s
    cloud_t = p.cloud_head_s if cloud_only else 0.0
    cloud_t += sum(p.cloud_layer_s[l] for l in cloud_layers) + len(cloud_layers) * k * p.cloud_expert_s
    fixed, p_layers = 0.0, []
    for l, c in counts.items():
        held = lay.held[l, c]
        end_t += p.end_layer_s[l] + held * p.end_expert_s
        if c < E:
            cloud_t += (k - held) * p.cloud_expert_s
            p_l = 1.0 - math.exp(lay.none_cold[l, c])
            fixed += p_l * 2 * p.hidden_size  # the token's row up, its output down (fp16)
            p_layers.append(p_l)
    return _Parts(end_t, cloud_t, fixed, fixed, p_layers, len(cloud_layers) > 0, cloud_only, a == 0)


def _cost(p: SplitProfile, w: _Parts, unit: int, m: int, objective: str
          ) -> tuple[float, float, float, float, float]:
    """(score, latency, throughput, bytes/token, round trips) of one configuration; lower score is better."""
    s = math.ceil(p.concurrency / m)
    up, down = w.up_fixed, w.down_fixed
    trips = sum(1.0 - (1.0 - q) ** s for q in w.p_layers)
    if w.has_cloud_layers:
        up += p.token_bytes if w.a_zero else unit
        down += p.token_bytes if w.cloud_only else unit
        trips += 1.0
    bw = p.bandwidth_bps if p.cloud_available else math.inf
    t_end = p.end_step_overhead_s + s * w.end_t
    t_cloud = (p.cloud_step_overhead_s + s * w.cloud_t) if (w.cloud_t > 0 or trips > 0) else 0.0
    # a shared cloud: the other ends' queued micro-batches, spread over the replicas, run before ours
    t_cloud *= 1.0 + p.cloud_queue_depth / p.cloud_replicas
    t_up, t_down = s * up / bw, s * down / bw
    cycle = t_end + t_cloud + t_up + t_down + trips * p.rtt_s
    period = max(cycle, m * t_end, m * t_cloud, m * t_up, m * t_down)
    thr = p.concurrency / period
    score = period if objective == "latency" else -thr
    return score + 1e-12 * (up + down), period, thr, up + down, trips


def _fractions(n_max: int) -> list[int]:
    return sorted({n_max, (3 * n_max) // 4, n_max // 2, n_max // 4, 0})


def make_split_plan(profile: SplitProfile, objective: str = "latency") -> SplitPlan:
    """The configuration (cut, expert placement, codec rank, micro-batches) that minimises the per-step
    latency ("latency") or maximises tokens/s over all requests ("throughput") under the quality bound."""
    if objective not in ("latency", "throughput"):
        raise InvalidRequestError(f"objective must be 'latency' or 'throughput', got {objective!r}")
    p, L = profile, profile.num_layers
    lay = _Layers(p)
    n_max = p.end_expert_budget // p.expert_bytes
    if not p.cloud_available:  # end-only; experts that do not fit are the committee's business
        counts = {l: p.num_experts for l in range(L)}
        _, lat, thr, _, _ = _cost(p, _parts(p, lay, L, 0, counts), 0, 1, objective)
        return SplitPlan(L, L, 0, {}, None, 1, objective, lat, thr)
    codecs = [(None, 2 * p.hidden_size, 0.0)] + [
        (r, p.codec_bytes.get(r, r + 2), q) for r, q in sorted(p.codec_quality.items()) if q <= p.max_ppl_increase]
    ms = [1] if objective == "latency" else sorted({m for m in (1, 2, 3, 4, 8, 16, 32) if m <= p.concurrency})
    best: tuple | None = None
    for a in range(L + 1):
        for b in range(L - a + 1):
            if a + b == L and b > 0:
                continue  # the same as (L, 0)
            end_layers = list(range(a)) + list(range(L - b, L))
            crossings = ((a > 0) + (a > 0 or b > 0)) if a < L - b else 0  # codec frames: up at a, down at L-b
            for n in _fractions(n_max):
                counts = _end_counts(lay, end_layers, n)
                work = _parts(p, lay, a, b, counts)
                for rank, unit, q in codecs:
                    if crossings * q > p.max_ppl_increase or (crossings == 0 and rank is not None):
                        continue
                    for m in ms:
                        c = _cost(p, work, unit, m, objective)
                        if best is None or c[0] < best[0][0]:
                            best = (c, a, b, counts, rank, m, crossings * q)
    assert best is not None  # (L, 0) with fp16 is always feasible
    (_, lat, thr, nbytes, trips), a, b, counts, rank, m, dq = best
    cloud = {l: sorted(int(e) for e in lay.order[l, c:]) for l, c in counts.items() if c < p.num_experts}
    return SplitPlan(L, a, b if a < L else 0, cloud, rank, m, objective, lat, thr, nbytes, dq, trips)


def should_replan(old: SplitProfile, new: SplitProfile, factor: float = 2.0) -> bool:
    """True when the link (bandwidth, RTT), the load (total compute on either side) or the concurrency moved by
    `factor` or more, or the cloud came or went: the plan made for `old` may be far from best for `new`."""
    if old.cloud_available != new.cloud_available:
        return True

    def moved(x: float, y: float, floor: float = 1e-9) -> bool:
        x, y = max(x, floor), max(y, floor)
        return max(x / y, y / x) >= factor

    return (moved(old.bandwidth_bps, new.bandwidth_bps) or moved(old.rtt_s, new.rtt_s, 1e-4)
            or moved(sum(old.end_layer_s) + old.end_expert_s, sum(new.end_layer_s) + new.end_expert_s)
            or moved(sum(old.cloud_layer_s) + old.cloud_expert_s, sum(new.cloud_layer_s) + new.cloud_expert_s)
            or moved(old.concurrency, new.concurrency)
            or moved(1 + old.cloud_queue_depth / old.cloud_replicas, 1 + new.cloud_queue_depth / new.cloud_replicas))
