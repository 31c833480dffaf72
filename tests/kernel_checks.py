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


def eager_decode(path: Path, seq: list[int], dtype: str = "float32") -> list[torch.Tensor]:
    """captured_decode's steps through the eager forward (no compile, no graph) in `dtype`: the reference that
    assert_steps_match falls back on."""
    import moetandem
    eng = moetandem.load(path, device="cuda", dtype=dtype, progress=False, compile="off", use_graphs=False)
    cache = eng.kv_cache(1, 64)
    with torch.no_grad():
        eng.forward(torch.tensor([seq[:8]], device="cuda"), torch.arange(8, device="cuda")[None], cache, 8)
        return [eng.forward(torch.tensor([[seq[t]]], device="cuda"), torch.tensor([[t]], device="cuda"), cache,
                            64)[0, -1].float() for t in range(8, len(seq))]


def assert_steps_match(got: list[torch.Tensor], want: list[torch.Tensor], ref: list[torch.Tensor], tol: float,
                       what: str) -> None:
    """Per decode step, `got` is within `tol` (relative) of `want`, the bf16 baseline, or else of `ref`, the fp32
    forward, or no further from `ref` than twice the baseline is. A tiny random router has near ties, so two bf16
    roundings of one step may pick different experts (bf16 vs fp32 eager on the CPU reproduces each such step's
    GPU error), and a tiny random Gemma-4 is that fragile at many steps (transformers' own bf16 forward is 0.63 off
    its fp32 one at one of them). A step that matches neither, and is further off than bf16 itself, fails."""
    for t, (a, b, r) in enumerate(zip(got, want, ref, strict=True)):
        e_want, e_ref, e_base = rel_err(a, b), rel_err(a, r), rel_err(b, r)
        assert min(e_want, e_ref) < tol or e_ref <= 2 * e_base, (
            f"{what} step {t}: relative error {e_want:.3g} against the bf16 baseline and {e_ref:.3g} against fp32 "
            f"(the baseline's own: {e_base:.3g})")


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


def captured_decode(path: Path, seq: list[int]) -> tuple[list[torch.Tensor], list[str]]:
    """Load `path` on CUDA (bf16, compiled), prefill seq[:8] into cache row 0, replay the captured batch-1 decode
    step over the rest of seq: (the logits of each step, fp32 copies; the CUDA kernels one more replay launches,
    by name, from the profiler). For A/B tests of a decode-step switch: set it before calling."""
    import moetandem
    eng = moetandem.load(path, device="cuda", dtype="bfloat16", progress=False, compile="on")
    assert eng.graphs is not None
    cache = eng.kv_cache(2, 64)  # row 0 + scratch row 1
    logits = []
    with torch.no_grad():
        pos = torch.arange(8, device="cuda")[None]
        eng.forward(torch.tensor([seq[:8]], device="cuda"), pos, cache, 8, rows=torch.tensor([0], device="cuda"))
        for t in range(8, len(seq)):
            out, _ = eng.graphs.step([seq[t]], [t], [0], cache, scratch_row=1)
            logits.append(out[0].float().clone())
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            eng.graphs.step([seq[-1]], [len(seq)], [0], cache, scratch_row=1)
            torch.cuda.synchronize()
    del eng
    return logits, [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]

