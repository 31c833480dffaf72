"""Top-k routing in one kernel: gate logits [T, E] -> expert ids [T, k] (best first) and weights [T, k].

Two rules, the ones the softmax families use:
- "softmax_topk": p = softmax(logits); the k largest p (renormalised to sum 1 when `renorm`): Mixtral, Qwen,
  OLMoE;
- "topk_softmax": the k largest logits, softmax over those k only: gpt-oss.

Eagerly, torch does this in 4-6 launches (softmax, a top-k gather and a bitonic sort, a sum, a divide); in a
decode step of a 16-layer model that was ~10 µs per layer on an H200. One program per token keeps the E logits in
registers and picks the k maxima in turn. Ties go to the lower expert id (torch.topk leaves them unspecified).
Triton on CUDA (custom op `moetandem::route_topk`, opaque to torch.compile, graph-safe); PyTorch elsewhere."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moetandem.errors import InvalidRequestError

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

RULES = ("softmax_topk", "topk_softmax")
MAX_EXPERTS = 1024  # one program holds a row of logits


def route_topk_reference(logits: torch.Tensor, k: int, rule: str, renorm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain PyTorch form: logits [T, E] -> ids int64 [T, k], weights fp32 [T, k]."""
    if rule == "softmax_topk":
        weights, ids = torch.topk(F.softmax(logits.float(), dim=-1), k, dim=-1)  # [T, k]
        if renorm:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights
    top, ids = torch.topk(logits, k, dim=-1)  # [T, k]
    return ids, F.softmax(top.float(), dim=-1)


if triton is not None:
    @triton.jit
    def select_topk(x, offs, K: tl.constexpr, KP: tl.constexpr, RULE: tl.constexpr, RENORM: tl.constexpr,
                    BLOCK_E: tl.constexpr):
        """One row of logits x [BLOCK_E] fp32 (-inf past E), offs = arange(BLOCK_E) -> (ids int64 [KP],
        weights fp32 [KP]); the first K are the answer (also for the fused router, kernels/router_logits.py)."""
        if RULE == 0:  # softmax over all experts first
            m = tl.max(x, 0)
            p = tl.exp(x - m)
            x = p / tl.sum(p, 0)
        offs_k = tl.arange(0, KP)  # K rounded up to a power of two; the tail stays -inf / unused
        vals = tl.full((KP,), float("-inf"), dtype=tl.float32)
        idx = tl.zeros((KP,), dtype=tl.int64)
        for j in tl.static_range(K):
            best = tl.max(x, 0)
            i = tl.min(tl.where(x == best, offs, BLOCK_E), 0)  # lowest id among equals
            vals = tl.where(offs_k == j, best, vals)
            idx = tl.where(offs_k == j, i.to(tl.int64), idx)
            x = tl.where(offs == i, float("-inf"), x)
        if RULE == 1:  # softmax over the chosen logits (vals[0] is their max)
            e = tl.exp(vals - tl.max(vals, 0))  # exp(-inf) = 0 for the tail
            vals = e / tl.sum(e, 0)
        elif RENORM:
            vals = vals / tl.sum(tl.where(offs_k < K, vals, 0.0), 0)
        return idx, vals

    @triton.jit
    def _route_kernel(logits_ptr, ids_ptr, w_ptr, E, s_t, K: tl.constexpr, KP: tl.constexpr, RULE: tl.constexpr,
                      RENORM: tl.constexpr, BLOCK_E: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_E)
        x = tl.load(logits_ptr + t * s_t + offs, mask=offs < E, other=float("-inf")).to(tl.float32)  # [BE]
        idx, vals = select_topk(x, offs, K, KP, RULE, RENORM, BLOCK_E)
        offs_k = tl.arange(0, KP)
        tl.store(ids_ptr + t * K + offs_k, idx, mask=offs_k < K)
        tl.store(w_ptr + t * K + offs_k, vals, mask=offs_k < K)


@torch.library.custom_op("moetandem::route_topk", mutates_args=())
def route_topk_op(logits: torch.Tensor, k: int, rule: str, renorm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] (CUDA, contiguous rows) -> ids int64 [T, k], weights fp32 [T, k]."""
    T, E = logits.shape
    ids = torch.empty(T, k, dtype=torch.long, device=logits.device)
    w = torch.empty(T, k, dtype=torch.float32, device=logits.device)
    if T:
        _route_kernel[(T,)](logits, ids, w, E, logits.stride(0), K=k, KP=triton.next_power_of_2(k), RULE=RULES.index(rule), RENORM=renorm,
                            BLOCK_E=triton.next_power_of_2(E), num_warps=1 if E <= 128 else 4)
    return ids, w


@route_topk_op.register_fake
def _(logits: torch.Tensor, k: int, rule: str, renorm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    T = logits.shape[0]
    return (logits.new_empty(T, k, dtype=torch.long), logits.new_empty(T, k, dtype=torch.float32))


def check_route(k: int, E: int, rule: str) -> None:
    """Refuse a rule or top-k that routing cannot follow."""
    if rule not in RULES:
        raise InvalidRequestError(f"unknown routing rule {rule!r}; choose one of {', '.join(RULES)}")
    if not 1 <= k <= E:
        raise InvalidRequestError(f"top-k must be in [1, {E}] for {E} experts, got {k}")


def route_topk(logits: torch.Tensor, k: int, rule: str = "softmax_topk",
               renorm: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (ids int64 [T, k] best first, weights fp32 [T, k]) by `rule` (module docstring)."""
    T, E = logits.shape
    check_route(k, E, rule)
    fast = triton is not None and logits.is_cuda and E <= MAX_EXPERTS and logits.stride(1) == 1
    if fast:
        return route_topk_op(logits, k, rule, renorm)
    return route_topk_reference(logits, k, rule, renorm)
