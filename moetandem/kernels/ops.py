"""The fused MoE as a PyTorch custom op, so torch.compile treats it as one opaque call (its Triton launches are
tuned and cached by fused_moe itself) and CUDA graphs capture it like any other op."""
from __future__ import annotations

import torch

from moetandem.kernels.fused_moe import fused_moe


def _pair(a: torch.Tensor | None, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    return (a, b) if a is not None and b is not None else None


@torch.library.custom_op("moetandem::fused_moe", mutates_args=())
def fused_moe_op(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                 w2: torch.Tensor, slot_table: torch.Tensor | None = None, activation: str = "silu",
                 host_w13: torch.Tensor | None = None, host_w2: torch.Tensor | None = None,
                 b13: torch.Tensor | None = None, b2: torch.Tensor | None = None, host_b13: torch.Tensor | None = None,
                 host_b2: torch.Tensor | None = None, alpha: float = 1.702, limit: float = 7.0, fmt: str = "bf16",
                 s13: torch.Tensor | None = None, s2: torch.Tensor | None = None,
                 host_s13: torch.Tensor | None = None, host_s2: torch.Tensor | None = None,
                 host_fmt: str | None = None) -> torch.Tensor:
    """fused_moe(...) -> [T, H] (see moetandem.kernels.fused_moe); host_* = its `host` tuple, b13/b2 its `bias`,
    s13/s2 its `scales`, host_s13/host_s2 its `host_scales`, host_fmt its `host_fmt`."""
    host: tuple[torch.Tensor, ...] | None = None
    if host_w13 is not None and host_w2 is not None:
        host = (host_w13, host_w2) if host_b13 is None or host_b2 is None else (host_w13, host_w2, host_b13, host_b2)
    return fused_moe(x, expert_ids, weights, w13, w2, slot_table, activation, host, _pair(b13, b2), alpha, limit,
                     fmt, _pair(s13, s2), _pair(host_s13, host_s2), host_fmt)


@fused_moe_op.register_fake
def _(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
      slot_table: torch.Tensor | None = None, activation: str = "silu", host_w13: torch.Tensor | None = None,
      host_w2: torch.Tensor | None = None, b13: torch.Tensor | None = None, b2: torch.Tensor | None = None,
      host_b13: torch.Tensor | None = None, host_b2: torch.Tensor | None = None, alpha: float = 1.702,
      limit: float = 7.0, fmt: str = "bf16", s13: torch.Tensor | None = None, s2: torch.Tensor | None = None,
      host_s13: torch.Tensor | None = None, host_s2: torch.Tensor | None = None,
      host_fmt: str | None = None) -> torch.Tensor:
    return torch.empty_like(x)
