"""The fused MoE as PyTorch custom ops, so torch.compile treats each as one opaque call (its Triton launches are
tuned and cached by fused_moe itself) and CUDA graphs capture it like any other op: `moetandem::fused_moe` ([T, H],
the sum over k included) and `moetandem::fused_moe_parts` ([T, k, H] fp32, the sum left to the caller, so that
inductor can fuse it into what follows). Both take the same flat arguments."""
from __future__ import annotations

import torch

from moetandem.kernels.fused_moe import fused_moe, fused_moe_parts
from moetandem.kernels.reference import Pair


def _pair(a: torch.Tensor | None, b: torch.Tensor | None) -> Pair | None:
    return (a, b) if a is not None and b is not None else None


def _nested(host_w13: torch.Tensor | None, host_w2: torch.Tensor | None, b13: torch.Tensor | None,
            b2: torch.Tensor | None, host_b13: torch.Tensor | None, host_b2: torch.Tensor | None,
            s13: torch.Tensor | None, s2: torch.Tensor | None, host_s13: torch.Tensor | None,
            host_s2: torch.Tensor | None) -> tuple[tuple[torch.Tensor, ...] | None, Pair | None, Pair | None,
                                                   Pair | None]:
    """The ops' flat tensors -> fused_moe's (host, bias, scales, host_scales)."""
    host: tuple[torch.Tensor, ...] | None = None
    if host_w13 is not None and host_w2 is not None:
        host = (host_w13, host_w2) if host_b13 is None or host_b2 is None else (host_w13, host_w2, host_b13, host_b2)
    return host, _pair(b13, b2), _pair(s13, s2), _pair(host_s13, host_s2)


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
    host, bias, scales, host_scales = _nested(host_w13, host_w2, b13, b2, host_b13, host_b2, s13, s2, host_s13,
                                              host_s2)
    return fused_moe(x, expert_ids, weights, w13, w2, slot_table, activation, host, bias, alpha, limit, fmt, scales,
                     host_scales, host_fmt)


@torch.library.custom_op("moetandem::fused_moe_parts", mutates_args=())
def fused_moe_parts_op(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                       w2: torch.Tensor, slot_table: torch.Tensor | None = None, activation: str = "silu",
                       host_w13: torch.Tensor | None = None, host_w2: torch.Tensor | None = None,
                       b13: torch.Tensor | None = None, b2: torch.Tensor | None = None,
                       host_b13: torch.Tensor | None = None, host_b2: torch.Tensor | None = None, alpha: float = 1.702,
                       limit: float = 7.0, fmt: str = "bf16", s13: torch.Tensor | None = None,
                       s2: torch.Tensor | None = None, host_s13: torch.Tensor | None = None,
                       host_s2: torch.Tensor | None = None, host_fmt: str | None = None) -> torch.Tensor:
    """fused_moe_parts(...) -> [T, k, H] float32 (see moetandem.kernels.fused_moe), fused_moe_op's arguments."""
    host, bias, scales, host_scales = _nested(host_w13, host_w2, b13, b2, host_b13, host_b2, s13, s2, host_s13,
                                              host_s2)
    return fused_moe_parts(x, expert_ids, weights, w13, w2, slot_table, activation, host, bias, alpha, limit, fmt,
                           scales, host_scales, host_fmt)


# Fakes (shapes for torch.compile): the dispatcher passes the arguments positionally, trailing defaults left off.
@fused_moe_op.register_fake
def _(x: torch.Tensor, expert_ids: torch.Tensor, *rest: object) -> torch.Tensor:
    return torch.empty_like(x)


@fused_moe_parts_op.register_fake
def _(x: torch.Tensor, expert_ids: torch.Tensor, *rest: object) -> torch.Tensor:
    return x.new_empty(*expert_ids.shape, x.shape[1], dtype=torch.float32)
