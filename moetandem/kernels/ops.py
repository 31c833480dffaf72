"""The fused MoE as a PyTorch custom op, so torch.compile treats it as one opaque call (its Triton launches are
tuned and cached by fused_moe itself) and CUDA graphs capture it like any other op."""
from __future__ import annotations

import torch

from moetandem.kernels.fused_moe import fused_moe


@torch.library.custom_op("moetandem::fused_moe", mutates_args=())
def fused_moe_op(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                 w2: torch.Tensor, slot_table: torch.Tensor | None = None, activation: str = "silu",
                 host_w13: torch.Tensor | None = None, host_w2: torch.Tensor | None = None) -> torch.Tensor:
    """fused_moe(...) -> [T, H] (see moetandem.kernels.fused_moe); host_w13/host_w2 = its `host` pair."""
    host = (host_w13, host_w2) if host_w13 is not None and host_w2 is not None else None
    return fused_moe(x, expert_ids, weights, w13, w2, slot_table, activation, host)


@fused_moe_op.register_fake
def _(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
      slot_table: torch.Tensor | None = None, activation: str = "silu", host_w13: torch.Tensor | None = None,
      host_w2: torch.Tensor | None = None) -> torch.Tensor:
    return torch.empty_like(x)
