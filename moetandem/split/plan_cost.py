"""The cost model of split plans (split/plan.py has the formula and the search): per (cut, placement) the work on
each side (_parts), and the latency / throughput / bytes / round trips of one configuration (_cost)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moetandem.split.plan_types import SplitProfile

#: a `decode` exchange (split/decode.py) per row: up tok, pos, row, budget (int64) + about one stop id; down
#: the count and each token (int64)
DECODE_UP_BYTES, DECODE_TOKEN_BYTES = 40, 8


def decode_k(p: SplitProfile, a: int, b: int) -> int:
    """Tokens per decode exchange of the plan (a, b): cloud_decode_tokens for cloud-only with the head in the
    cloud, else 0 (one exchange per token)."""
    return p.cloud_decode_tokens if a == 0 and b == 0 and p.head_in_cloud(a, b) else 0


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
    """Work of one (cut, placement), independent of codec and micro-batching."""
    end_t: float  # seconds per token on the end
    cloud_t: float
    end_o: float  # fixed seconds per step of a micro-batch on the end
    cloud_o: float
    up_fixed: float  # bytes per token up/down besides the cut frames (expert rows)
    down_fixed: float
    p_layers: list[float]  # per end layer with cloud experts: P(a token needs the cloud there)
    has_cloud_layers: bool
    cloud_only: bool
    a_zero: bool


def _parts(p: SplitProfile, lay: _Layers, a: int, b: int, counts: dict[int, int], n_fit: int | None = None
           ) -> _Parts:
    """n_fit: how many of the end layers' experts fit the budget (the rest of `counts` are committee misses)."""
    L, k, E = p.num_layers, p.top_k, p.num_experts
    end_fix = p.end_layer_fixed_s or [0.0] * L
    cloud_fix = p.cloud_layer_fixed_s or [0.0] * L
    cloud_layers = range(a, L - b)
    cloud_only = a == 0 and b == 0
    head_cloud = p.head_in_cloud(a, b)
    end_t = 0.0 if head_cloud else p.end_head_s  # the end runs norm + lm_head (and the embedding unless a = 0)
    cloud_t = p.cloud_head_s if (a == 0 or head_cloud) and cloud_layers else 0.0  # the cloud embeds / runs the head
    cloud_t += sum(p.cloud_layer_s[l] for l in cloud_layers) + len(cloud_layers) * k * p.cloud_expert_s
    end_o = p.end_step_overhead_s + sum(end_fix[l] for l in counts)
    cloud_o = p.cloud_step_overhead_s + sum(cloud_fix[l] for l in cloud_layers)
    cloud_o += p.cloud_head_fixed_s if head_cloud else 0.0
    fit = counts if n_fit is None or not p.end_miss_s else _end_counts(lay, list(counts), n_fit)
    fixed, p_layers = 0.0, []
    for l, c in counts.items():
        held = lay.held[l, c]
        end_t += p.end_layer_s[l] + held * p.end_expert_s + (held - lay.held[l, min(c, fit[l])]) * p.end_miss_s
        if c < E:
            cloud_t += (k - held) * p.cloud_expert_s
            p_l = 1.0 - math.exp(lay.none_cold[l, c])
            fixed += p_l * 2 * p.hidden_size  # the token's row up, its output down (fp16)
            p_layers.append(p_l)
    return _Parts(end_t, cloud_t, end_o, cloud_o, fixed, fixed, p_layers, len(cloud_layers) > 0, cloud_only,
                  a == 0)


def _cost(p: SplitProfile, w: _Parts, unit_up: int, unit_down: int, m: int, objective: str, k: int = 0
          ) -> tuple[float, float, float, float, float]:
    """(score, latency, throughput, bytes/token, round trips) of one configuration; lower score is better. k > 0:
    cloud-only with the head in the cloud, k greedy tokens per `decode` exchange (token ids both ways, the
    cloud's step k times per exchange); latency, bytes and round trips are then per token, not per exchange."""
    s = math.ceil(p.concurrency / m)
    up, down = w.up_fixed, w.down_fixed
    trips = sum(1.0 - (1.0 - q) ** s for q in w.p_layers)
    if k:
        up, down, trips = DECODE_UP_BYTES, DECODE_TOKEN_BYTES * (k + 1), 1.0
    elif w.has_cloud_layers:
        up += (p.token_bytes if w.a_zero else unit_up) + p.row_bytes
        down += unit_down  # the hidden states at L-b (at L for cloud-only: the end runs the head)
        trips += 1.0
    frames = trips  # one frame each way per round trip
    bw = p.bandwidth_bps if p.cloud_available else math.inf
    t_end = w.end_o + s * w.end_t
    t_cloud = (w.cloud_o + s * w.cloud_t) if (w.cloud_t > 0 or trips > 0) else 0.0
    # a shared cloud: the other ends' queued micro-batches, spread over the replicas, run before ours
    t_cloud *= (1.0 + p.cloud_queue_depth / p.cloud_replicas) * max(k, 1)
    t_up, t_down = (frames * p.frame_bytes + s * up) / bw, (frames * p.frame_bytes + s * down) / bw
    cycle = t_end + t_cloud + t_up + t_down + trips * p.rtt_s
    compute = (m * t_end, m * t_cloud) if p.overlap else (m * (t_end + t_cloud),)
    n = max(k, 1)  # tokens per row per exchange
    period = (p.engine_overhead_s + max(cycle, *compute, m * t_up, m * t_down)) / n
    thr = p.concurrency / period
    score = period if objective == "latency" else -thr
    nbytes = (up + down + (2 * frames * p.frame_bytes / s if frames else 0.0)) / n
    return score + 1e-12 * nbytes, period, thr, nbytes, trips / n


