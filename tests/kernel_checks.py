"""Checks the Triton kernel tests share: relative error, every tile config the fused MoE's tuning search may pick,
and running a test file's interpreter tests in a child process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
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


def run_interpreted(test_file: str, keyword: str) -> None:
    """Run the tests of `test_file` matching `keyword` in a child process with TRITON_INTERPRET=1 (it must be set
    before triton compiles the kernels), so a plain `pytest` run on a CPU box checks the kernels too."""
    root = Path(test_file).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(test_file)),
                        "-k", keyword], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
