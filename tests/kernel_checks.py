"""Checks the fused-MoE kernel tests share: relative error, and every tile config the tuning search may pick."""
from __future__ import annotations

from typing import Any, Callable

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def check_every_candidate(make_plan: Callable[[int], Any], ref: torch.Tensor, tol: float) -> None:
    """make_plan(block_m) -> a fused_moe _Plan; each BLOCK_M (16/32/64) x tuning candidate must give `ref` within
    tol, except tiles that do not fit shared memory (the search skips those too)."""
    from triton.runtime.errors import OutOfResources

    from moetandem.kernels import tuning
    for bm in (16, 32, 64):
        for kc in tuning.CANDIDATES:
            p = make_plan(bm)
            try:
                p.up(kc)
                p.down(kc)
            except OutOfResources:
                continue
            assert rel_err(p.reduce(), ref) < tol, (bm, kc)
