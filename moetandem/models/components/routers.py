"""Routers: gate logits [T, E] -> expert ids [T, k] and weights [T, k]. Each is a module named `gate` in our tree
(weight [E, H], plus the bias the family has) with
    forward(x [T, H]) -> logits [T, E]                       (what routing hooks and calibration read)
    select(logits [T, E], dtype) -> ids [T, k], weights [T, k]
    route(x [T, H], dtype) -> logits, ids, weights           (both; one launch where the router fuses them)
and a frozen spec (what config.json says) that builds it."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moetandem.kernels.router import route_topk
from moetandem.kernels.router_logits import route_logits_topk

#: MOETANDEM_ROUTER_WEIGHTS=kernel (the default since the H200 A/B of 2026-12-01; =cast: the fused router returns
#: fp32 weights and they are cast): a
#: linear router asks the fused router kernel for its weights in the model's dtype, so its store rounds them (to
#: nearest even, as Tensor.to) and the compiled decode step has no cast kernel between the router and the fused MoE:
#: one launch less per MoE layer (bench/kernel_census.py). Same values; read once at import, dynamo guards on it.
ROUTER_WEIGHTS_CAST: bool = os.environ.get("MOETANDEM_ROUTER_WEIGHTS", "kernel").strip().lower() == "kernel"


class Router(nn.Module):
    #: routing hooks (moetandem.gating) re-route from softmax(logits); False where that is not the model's rule
    softmax_logits: bool = True
    #: keep weight (and bias) in fp32 whatever the model dtype (the loader honours it), as transformers does
    keep_fp32: bool = False
    norm_topk_prob: bool = False

    def __init__(self, hidden: int, num_experts: int, top_k: int, bias: bool = False) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.bias = nn.Parameter(torch.empty(num_experts)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.keep_fp32:
            return F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())  # [T, E]
        return F.linear(x, self.weight, self.bias)  # [T, E]

    def select(self, logits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def route(self, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H] -> logits [T, E], ids [T, k], weights [T, k] (dtype): forward, then select."""
        logits = self(x)  # [T, E]
        return (logits, *self.select(logits, dtype))


class LinearTopKRouter(Router):
    """A plain linear (+ bias) router whose selection is route_topk's `rule`: on CUDA at decode sizes the logits
    and the top-k are one launch (kernels/router_logits.py); elsewhere forward then select, as before."""
    rule: str = "softmax_topk"

    def select(self, logits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        ids, weights = route_topk(logits, self.top_k, self.rule, self.norm_topk_prob)  # [T, k] each
        return ids, weights.to(dtype)

    def route(self, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.keep_fp32:
            return super().route(x, dtype)
        logits, ids, weights = route_logits_topk(x, self.weight, self.bias, self.top_k, self.rule, self.norm_topk_prob,
                                                 dtype if ROUTER_WEIGHTS_CAST else None)  # [T, E], [T, k], [T, k]
        return logits, ids, weights.to(dtype)


# ---- softmax -> top-k (-> renormalise): Mixtral, Qwen, OLMoE
@dataclass(frozen=True)
class SoftmaxTopK:
    norm_topk_prob: bool = False

    def build(self, hidden: int, num_experts: int, top_k: int) -> Router:
        return SoftmaxTopKRouter(hidden, num_experts, top_k, self.norm_topk_prob)


class SoftmaxTopKRouter(LinearTopKRouter):
    def __init__(self, hidden: int, num_experts: int, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__(hidden, num_experts, top_k)
        self.norm_topk_prob = norm_topk_prob


# ---- top-k -> softmax over the chosen logits, router with a bias: gpt-oss
@dataclass(frozen=True)
class TopKSoftmax:
    bias: bool = True

    def build(self, hidden: int, num_experts: int, top_k: int) -> Router:
        return TopKSoftmaxRouter(hidden, num_experts, top_k, self.bias)


class TopKSoftmaxRouter(LinearTopKRouter):
    softmax_logits, rule = False, "topk_softmax"  # norm_topk_prob stays False: the k weights sum to 1 already


def _group_mask(scores: torch.Tensor, n_group: int, topk_group: int, per_group: str) -> torch.Tensor:
    """Experts of the topk_group best groups: scores [T, E] -> bool [T, E]. A group scores by its best expert
    ("max", DeepSeek-V2) or the sum of its best two ("top2", DeepSeek-V3 / GLM-4.5)."""
    T, E = scores.shape
    grouped = scores.view(T, n_group, E // n_group)  # [T, G, E/G]
    group_scores = grouped.max(dim=-1).values if per_group == "max" else grouped.topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)  # [T, G]
    return mask[:, :, None].expand(T, n_group, E // n_group).reshape(T, E)


# ---- sigmoid + e_score_correction_bias, group-limited top-k, routed scaling: DeepSeek-V3, Kimi-K2, GLM-4.5
@dataclass(frozen=True)
class SigmoidGroupTopK:
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0

    def build(self, hidden: int, num_experts: int, top_k: int) -> Router:
        return SigmoidGroupRouter(hidden, num_experts, top_k, self)


class SigmoidGroupRouter(Router):
    softmax_logits, keep_fp32 = False, True

    def __init__(self, hidden: int, num_experts: int, top_k: int, s: SigmoidGroupTopK) -> None:
        super().__init__(hidden, num_experts, top_k)
        self.s, self.norm_topk_prob = s, s.norm_topk_prob
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts))  # [E], chooses experts only

    def select(self, logits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        scores = logits.float().sigmoid()  # [T, E]
        choice = scores + self.e_score_correction_bias.float()  # [T, E]
        if self.s.n_group > 1:
            choice = choice.masked_fill(~_group_mask(choice, self.s.n_group, self.s.topk_group, "top2"), float("-inf"))
        ids = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]  # [T, k]
        weights = scores.gather(1, ids)  # [T, k]
        if self.s.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, (weights * self.s.routed_scaling_factor).to(dtype)


# ---- softmax, greedy or group-limited greedy top-k, routed scaling: DeepSeek-V2
@dataclass(frozen=True)
class SoftmaxGroupGreedy:
    method: str = "greedy"  # "greedy" | "group_limited_greedy"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    def build(self, hidden: int, num_experts: int, top_k: int) -> Router:
        return SoftmaxGroupGreedyRouter(hidden, num_experts, top_k, self)


class SoftmaxGroupGreedyRouter(Router):
    keep_fp32 = True

    def __init__(self, hidden: int, num_experts: int, top_k: int, s: SoftmaxGroupGreedy) -> None:
        super().__init__(hidden, num_experts, top_k)
        self.s = s

    def select(self, logits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.softmax(logits.float(), dim=-1)  # [T, E]
        if self.s.method == "group_limited_greedy":
            scores = scores.masked_fill(~_group_mask(scores, self.s.n_group, self.s.topk_group, "max"), 0.0)
        weights, ids = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)  # [T, k]
        return ids, (weights * self.s.routed_scaling_factor).to(dtype)


# ---- Gemma-4: the router reads RMSNorm(x) · scale / √H; softmax -> top-k -> renormalise -> per-expert scale
@dataclass(frozen=True)
class ScaledSoftmaxTopK:
    eps: float = 1e-6

    def build(self, hidden: int, num_experts: int, top_k: int) -> Router:
        return ScaledSoftmaxTopKRouter(hidden, num_experts, top_k, self.eps)


class ScaledSoftmaxTopKRouter(Router):
    softmax_logits, norm_topk_prob = False, True  # the per-expert scale is not a softmax's

    def __init__(self, hidden: int, num_experts: int, top_k: int, eps: float) -> None:
        super().__init__(hidden, num_experts, top_k)
        self.scale = nn.Parameter(torch.ones(hidden))  # [H]
        self.per_expert_scale = nn.Parameter(torch.ones(num_experts))  # [E]
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return F.linear(h * self.scale * x.shape[-1] ** -0.5, self.weight)  # [T, E]

    def select(self, logits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        ids, weights = route_topk(logits, self.top_k, "softmax_topk", renorm=True)  # [T, k] each
        weights = weights * self.per_expert_scale[ids]
        return ids, weights.to(dtype)


# ---- Switch Transformers: top-1 of the softmax (taken in the model dtype, as transformers does), fp32 router;
# the MoE block drops tokens over an expert's capacity (models/seq2seq.py)
@dataclass(frozen=True)
class Top1:
    bias: bool = False

    def build(self, hidden: int, num_experts: int, top_k: int) -> Router:
        return Top1Router(hidden, num_experts, 1, self.bias)


class Top1Router(Router):
    softmax_logits, keep_fp32 = False, True  # routing hooks would bypass the capacity rule

    def select(self, logits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.softmax(logits.float(), dim=-1).to(dtype)  # [T, E]
        ids = probs.argmax(dim=-1, keepdim=True)  # [T, 1]
        return ids, probs.gather(-1, ids)


RouterSpec = SoftmaxTopK | TopKSoftmax | SigmoidGroupTopK | SoftmaxGroupGreedy | ScaledSoftmaxTopK | Top1
