"""The split scheduler's cost model, measured: per layer a fixed cost per step and a cost per token, for the end
and for the cloud, fitted from timings at two or more token counts; the link as a fixed cost per crossing (RTT)
plus bytes / rate, with the frame's own header bytes counted.

A decode step of s tokens through layers [a, b) costs  Σ_l (fixed_l + s·token_l)  (+ the head's fixed + s·token
where the end runs embedding / norm / lm_head). Timing at one batch size only puts the fixed part into the
per-token cost, so the scheduler then over-values micro-batching and under-values a batch on one side.

    costs = measure_step_costs(engine.model, engine.experts, engine.device)   # [1, 8] tokens, every layer
    costs.step_s(range(0, L), tokens=4, head=True)                            # predicted seconds
    prof = split_profile(end_costs, cloud_costs, engine, budget_bytes, bandwidth_bps, rtt_s)
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from moetandem.errors import InvalidRequestError
from moetandem.gating.profile import time_call

ROW_BYTES = 16  # per token up besides its hidden states: pos and rows, int64 each


def fit_linear(samples: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(fixed, per_unit) of the least-squares line seconds = fixed + units · per_unit through (units, seconds)
    samples at two or more distinct unit counts; both clamped at 0 (a negative part is measurement noise)."""
    xs = {x for x, _ in samples}
    if len(xs) < 2:
        raise InvalidRequestError("a fixed + per-token fit needs timings at two or more token counts")
    n = len(samples)
    mx, my = sum(x for x, _ in samples) / n, sum(y for _, y in samples) / n
    slope = sum((x - mx) * (y - my) for x, y in samples) / sum((x - mx) ** 2 for x, _ in samples)
    slope = max(0.0, slope)
    return max(0.0, my - slope * mx), slope


def time_sizes(fn: Callable[[int], Any], sizes: Iterable[int], device: torch.device | str = "cpu",
               reps: int = 5, stat: str = "median") -> list[tuple[float, float]]:
    """(tokens, seconds) of fn(tokens) at each size, the median (or "min": the cost without preemption by other
    processes) of `reps` runs after a warm-up, synchronised on CUDA."""
    return [(float(s), time_call(lambda s=s: fn(s), device, reps, stat)) for s in sizes]


@dataclass
class StepCosts:
    """Seconds of one decode step on one side: per layer fixed + per token, the head (embedding + final norm +
    lm_head) fixed + per token, and one expert FFN for one token (the share of a layer's per-token time that a
    plan can move by placing experts elsewhere)."""
    layer_fixed_s: list[float]  # [L]
    layer_token_s: list[float]  # [L]
    head_fixed_s: float
    head_token_s: float
    expert_token_s: float
    step_fixed_s: float = 0.0  # outside the model: scheduling, sampling, Python around the step

    def step_s(self, layers: Iterable[int], tokens: float, head: bool = True) -> float:
        ls = list(layers)
        t = sum(self.layer_fixed_s[l] + tokens * self.layer_token_s[l] for l in ls)
        return t + (self.step_fixed_s + self.head_fixed_s + tokens * self.head_token_s if head else 0.0)

    def calibrated(self, samples: Sequence[tuple[float, float]], head: bool = True) -> "StepCosts":
        """These costs rescaled to whole-step timings (tokens, seconds) of all layers measured in place (the
        real step, under the real load, committee misses included): every per-token part by the measured /
        modelled slope, the layers' fixed parts by the measured / modelled intercept (so a miss or a load spike
        is charged to the layers, where a plan can move it, not to every step)."""
        fixed, per_tok = fit_linear(samples)
        L = range(len(self.layer_fixed_s))
        m_tok = sum(self.layer_token_s) + (self.head_token_s if head else 0.0)
        m_fix = sum(self.layer_fixed_s)
        rest = self.step_fixed_s + (self.head_fixed_s if head else 0.0)
        a = per_tok / m_tok if m_tok > 0 else 1.0
        b = max(0.0, fixed - rest) / m_fix if m_fix > 0 else 1.0
        extra = 0.0 if m_fix > 0 else max(0.0, fixed - rest)
        return StepCosts([b * self.layer_fixed_s[l] for l in L], [a * self.layer_token_s[l] for l in L],
                         self.head_fixed_s, a * self.head_token_s, a * self.expert_token_s,
                         self.step_fixed_s + extra)

    def as_meta(self) -> dict[str, Any]:
        """Flat scalars and lists (a frame's meta: the cloud sends its costs in the hello reply)."""
        return {f"cost_{k}": v for k, v in asdict(self).items()}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "StepCosts | None":
        try:
            kw = {k: meta[f"cost_{k}"] for k in cls.__dataclass_fields__}
            return cls(**{k: (list(map(float, v)) if isinstance(v, list) else float(v)) for k, v in kw.items()})
        except (KeyError, TypeError, ValueError):
            return None


@torch.inference_mode()
def measure_step_costs(model: Any, experts: Mapping[int, Any], device: torch.device | str,
                       dtype: torch.dtype | None = None, sizes: Sequence[int] = (1, 8), reps: int = 5,
                       context: int = 32, expert_s: float | None = None, stat: str = "min") -> StepCosts:
    """Time each layer of `model` (and its head) on decode steps of each size in `sizes` (one new token per
    row, `context` positions of K/V), with the experts it really uses, and fit fixed + per-token terms. The
    minimum of `reps` runs by default: the cost on a quiet machine (StepCosts.calibrated adds the load seen in
    place)."""
    from moetandem.models import KVCache
    dev = torch.device(device)
    a = model.args
    dt = dtype or model.lm_head.weight.dtype
    smax = max(sizes)
    cache = KVCache(a, smax, context + 1, dev, dt)
    g = torch.Generator(device="cpu").manual_seed(0)
    x_all = (torch.randn(smax, 1, a.hidden_size, generator=g) * 0.5).to(dev, dt)  # [S, 1, H]
    ids_all = torch.randint(0, a.vocab_size, (smax, 1), generator=g).to(dev)  # [S, 1]
    pos_all = torch.full((smax, 1), context, dtype=torch.long, device=dev)  # [S, 1]

    def layer(l: int) -> Callable[[int], Any]:
        return lambda s: model.forward_layers(x_all[:s], pos_all[:s], cache, context + 1, l, l + 1, experts,
                                              None, torch.arange(s, device=dev))
    fixed, per_tok = [], []
    for l in range(a.num_layers):
        f, t = fit_linear(time_sizes(layer(l), sizes, dev, reps, stat))
        fixed.append(f)
        per_tok.append(t)
    hf, ht = fit_linear(time_sizes(lambda s: model.head(model.embed(ids_all[:s])), sizes, dev, reps, stat))
    if expert_s is None:  # one expert FFN, one token, weights of the model's expert shape
        from moetandem.models.components.mlp import expert_ffn
        I, H = a.moe_intermediate_size, a.hidden_size
        w13, w2 = torch.randn(2 * I, H, device=dev, dtype=dt), torch.randn(H, I, device=dev, dtype=dt)
        expert_s = time_sizes(lambda s: expert_ffn(x_all[0], w13, w2), [1], dev, reps, stat)[0][1]
    return StepCosts(fixed, per_tok, hf, ht, float(expert_s))


def frame_overhead_bytes(meta: Mapping[str, Any] | None = None) -> int:
    """Bytes of a one-token decode `layers` frame besides its tensors: magic, header length and the JSON header
    (measured by packing one; the pos / rows tensors are ROW_BYTES per token)."""
    from moetandem.split.transport.frame import Frame, pack
    x = torch.zeros(1, 8, dtype=torch.float16)
    f = Frame("layers", id=123456, meta=dict(meta or {"cache": 12, "kv_len": 1234}),
              tensors={"pos": torch.zeros(1, 1, dtype=torch.long), "rows": torch.zeros(1, dtype=torch.long),
                       "x": x})
    return len(pack(f)) - x.numel() * x.element_size() - ROW_BYTES


def split_profile(end: StepCosts, cloud: StepCosts, args: Any, expert_bytes: int, end_budget_bytes: int,
                  bandwidth_bps: float, rtt_s: float, routing_freq: list[list[float]] | None = None,
                  concurrency: int = 1, codecs: Mapping[int, Mapping[int, tuple[int, float]]] | None = None,
                  max_ppl_increase: float = 0.01, wire_bytes: int = 2, **kw: Any) -> Any:
    """A SplitProfile (split.plan) from measured step costs of both sides and the measured link. Attention
    (+ router, norms) per token = a layer's per-token time less top_k expert FFNs, where one expert FFN is charged
    at most 1/top_k of the cheapest layer's per-token time: a batched GPU step costs a token far less than top_k
    one-token FFNs timed alone, and the per-token parts must add up to the measured step (the thirteenth
    session's 4-end GPU test bed predicted 4.4 tok/s for a plan that ran 775: 4 layers x 8 x 7 ms of "expert" per
    token). codecs: cut → rank → (bytes per token, perplexity increase) from the calibration file."""
    from moetandem.split.plan import SplitProfile
    L, E, k = args.num_layers, args.num_experts, args.top_k
    freq = routing_freq or [[k / E] * E for _ in range(L)]

    def expert(c: StepCosts) -> float:  # a token's k experts cost no more than its measured layer time
        return min(c.expert_token_s, min(c.layer_token_s, default=c.expert_token_s * k) / k)
    end_x, cloud_x = expert(end), expert(cloud)

    def attn(c: StepCosts, x: float) -> list[float]:
        return [max(0.0, t - k * x) for t in c.layer_token_s]
    return SplitProfile(L, E, k, args.hidden_size, attn(end, end_x), attn(cloud, cloud_x), end_x, cloud_x, expert_bytes,
                        end_budget_bytes, freq, bandwidth_bps, rtt_s,
                        max_ppl_increase=max_ppl_increase, concurrency=concurrency, end_head_s=end.head_token_s,
                        cloud_head_s=cloud.head_token_s, cloud_head_fixed_s=cloud.head_fixed_s,
                        end_step_overhead_s=end.head_fixed_s,
                        engine_overhead_s=end.step_fixed_s, cloud_step_overhead_s=cloud.step_fixed_s,
                        end_layer_fixed_s=list(end.layer_fixed_s), cloud_layer_fixed_s=list(cloud.layer_fixed_s),
                        frame_bytes=frame_overhead_bytes(), row_bytes=ROW_BYTES,
                        cut_codecs={int(c): dict(v) for c, v in (codecs or {}).items()}, wire_bytes=wire_bytes,
                        **kw)


def with_link(profile: Any, bandwidth_bps: float, rtt_s: float) -> Any:
    return replace(profile, bandwidth_bps=bandwidth_bps, rtt_s=rtt_s)
