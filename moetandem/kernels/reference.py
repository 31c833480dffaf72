"""The fused MoE's argument checks and its plain-PyTorch reference (the path off CUDA, and the tests' oracle)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: activation name -> the kernels' ACT code; act(g)·u, or gpt-oss's clamped SwiGLU (alpha, limit)
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "clamped_swiglu": 3}  # gelu = erf form; gelu_tanh (Gemma)

Pair = tuple[torch.Tensor, torch.Tensor]


def check_args(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
               w2: torch.Tensor, slot_table: torch.Tensor | None, activation: str,
               host: tuple[torch.Tensor, ...] | None = None, bias: Pair | None = None) -> None:
    if activation not in ACTIVATIONS:
        raise NotImplementedError(f"fused_moe: activation {activation!r} is not supported (have {list(ACTIVATIONS)})")
    T, H = x.shape
    n, i2, h = w13.shape
    if h != H or i2 % 2 or w2.shape != (n, H, i2 // 2):
        raise ValueError(f"fused_moe: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)} disagree")
    if expert_ids.shape != weights.shape or expert_ids.dim() != 2 or expert_ids.shape[0] != T:
        raise ValueError(f"fused_moe: expert_ids {tuple(expert_ids.shape)} / weights {tuple(weights.shape)} vs T={T}")
    if slot_table is not None and slot_table.dim() != 1:
        raise ValueError("fused_moe: slot_table must be [E]")
    if bias is not None and (bias[0].shape != (n, i2) or bias[1].shape != (n, H) or bias[0].stride(-1) != 1
                             or bias[1].stride(-1) != 1 or bias[0].dtype != w13.dtype):
        raise ValueError(f"fused_moe: biases must be b13 [{n}, {i2}] and b2 [{n}, {H}], rows contiguous, in "
                         "the weights' dtype")
    if host is not None and (host[0].shape[1:] != w13.shape[1:] or host[1].shape[1:] != w2.shape[1:]
                             or host[0].stride()[1:] != w13.stride()[1:] or host[1].stride()[1:] != w2.stride()[1:]
                             or host[0].dtype != w13.dtype or len(host) != (2 if bias is None else 4)):
        raise ValueError("fused_moe: host weights must have the slot buffers' expert shape, inner strides and dtype "
                         "(and biases exactly when the slots have them)")


def glu_torch(g: torch.Tensor, u: torch.Tensor, activation: str, alpha: float, limit: float) -> torch.Tensor:
    """g, u [n, I] -> [n, I], as the kernels' epilogue computes it."""
    if activation == "clamped_swiglu":
        g, u = g.clamp(max=limit), u.clamp(min=-limit, max=limit)
        return (u + 1) * (g * torch.sigmoid(g * alpha))
    if activation == "silu":
        return F.silu(g) * u
    return F.gelu(g, approximate="tanh" if activation == "gelu_tanh" else "none") * u


def fused_moe_reference(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                        w2: torch.Tensor, slot_table: torch.Tensor | None = None, activation: str = "silu",
                        host: tuple[torch.Tensor, ...] | None = None, bias: Pair | None = None,
                        alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """Plain PyTorch with the semantics of fused_moe (each busy slot once on its rows; syncs with the host).
    GEMMs in the weights' dtype (gate/up bias added before the activation, down bias before the routing weight),
    the sum over k in fp32, the result in x's dtype."""
    check_args(x, expert_ids, weights, w13, w2, slot_table, activation, host, bias)
    T, k = expert_ids.shape
    I, n = w13.shape[1] // 2, w13.shape[0]
    n_all = n + (host[0].shape[0] if host is not None else 0)
    ids = expert_ids.long()  # [T, k]
    slots = ids if slot_table is None else slot_table.to(ids.device).long()[ids]  # [T, k]
    valid = (slots >= 0) & (slots < n_all) & (weights != 0)  # [T, k]
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)  # [T, H]
    for s in slots[valid].unique().tolist():
        t, j = ((slots == s) & valid).nonzero(as_tuple=True)
        src = (w13, w2, *(bias or ())) if s < n else host
        parts = [p[s if s < n else s - n].to(x.device) for p in src]  # type: ignore[union-attr]
        gu = x[t].to(parts[0].dtype) @ parts[0].t()  # [r, 2I]
        if bias is not None:
            gu = gu + parts[2]
        h = glu_torch(gu[:, :I], gu[:, I:], activation, alpha, limit)  # [r, I]
        y = h @ parts[1].t()  # [r, H]
        if bias is not None:
            y = y + parts[3]
        out.index_add_(0, t, y.float() * weights[t, j].float()[:, None])
    return out.to(x.dtype)
