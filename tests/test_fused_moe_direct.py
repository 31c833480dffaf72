"""The fused MoE's direct path for decode-sized batches (kernels/fused_moe.py: one program per assignment in both
GEMMs, no alignment launch) gives what the aligned path and the reference give: every expert format, biases, host-mapped misses, skipped assignments. Under
Triton's interpreter on the CPU (`TRITON_INTERPRET=1`, triton importable) and on a GPU."""
from __future__ import annotations

import importlib
import os

import pytest
import torch

from kernel_checks import check_every_candidate, rel_err
from moetandem.kernels import fused_moe, fused_moe_reference, fused_moe_supported, tuning
from test_fused_moe_formats import QUANT, byte_slots, experts, routing

fm = importlib.import_module("moetandem.kernels.fused_moe")
interpret = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or fm.triton is None,
                               reason="needs TRITON_INTERPRET=1 and an importable triton")
CONFIG = tuning.KernelConfig(32, 64, 4, 1)


def run(x, ids, w, d, tab, fmt="bf16", s=None, direct=True, act="silu", host=None, bias=None, host_scales=None):
    p = fm._Plan(x, ids, w, *d, tab, act, 16, host, bias, 1.702, 1.5, fmt, s, host_scales, direct=direct)
    assert (p.al is None) == direct
    p.up(CONFIG)
    p.down(CONFIG)
    return p.reduce()


def test_direct_below_the_token_threshold_only() -> None:
    x = torch.zeros(fm.DIRECT_MAX_TOKENS + 1, 8)
    ids, w, tab = routing(x.shape[0], 2, 6, 4, seed=0)
    w13, w2 = experts(4, 8, 4, seed=0)
    assert fm._Plan(x[:1], ids[:1], w[:1], w13, w2, tab, "silu", 16).direct
    assert not fm._Plan(x, ids, w, w13, w2, tab, "silu", 16).direct


@interpret
@pytest.mark.parametrize("fmt", QUANT + ("bf16",))
@pytest.mark.parametrize("T,k", [(1, 4), (2, 8)])
def test_triton_interpreter_direct_equals_reference(fmt: str, T: int, k: int) -> None:
    E, N, H, I = 9, 5, 192, 96
    ids, w, tab = routing(T, k, E, N, seed=k + T)  # some experts not resident, some weights 0: skipped
    _, d, s = byte_slots(*experts(N, H, I, seed=k), fmt)
    if fmt == "bf16":
        d, s = experts(N, H, I, seed=k), None
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))  # [T, H]
    ref = fused_moe_reference(x, ids, w, *d, tab, fmt=fmt, scales=s)
    torch.testing.assert_close(run(x, ids, w, d, tab, fmt, s), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(run(x, ids, w, d, tab, fmt, s), run(x, ids, w, d, tab, fmt, s, direct=False),
                               rtol=1e-5, atol=1e-5)


@interpret
def test_triton_interpreter_direct_host_experts_and_biases() -> None:
    """gpt-oss-like: clamped SwiGLU with biases, misses read from the mapped host copy (slot-table entry N + e)."""
    T, k, E, N, H, I = 1, 4, 7, 3, 64, 64
    ids, w, tab = routing(T, k, E, N, seed=5, zero_frac=0.0)
    g = torch.Generator().manual_seed(6)
    w13, w2 = experts(N, H, I, seed=6)
    hw13, hw2 = experts(E, H, I, seed=7)  # every expert, host side
    bias = (torch.randn(N, 2 * I, generator=g), torch.randn(N, H, generator=g))
    hbias = (torch.randn(E, 2 * I, generator=g), torch.randn(E, H, generator=g))
    mapped = torch.where(tab >= 0, tab, N + torch.arange(E)).int()  # [E]
    x = torch.randn(T, H, generator=g) * 4
    host = (hw13, hw2, *hbias)
    ref = fused_moe_reference(x, ids, w, w13, w2, mapped, "clamped_swiglu", host, bias, 1.702, 1.5)
    got = run(x, ids, w, (w13, w2), mapped, act="clamped_swiglu", host=host, bias=bias)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T", [1, 2])
def test_direct_every_candidate_config_on_the_gpu(T: int, tmp_path, monkeypatch) -> None:
    """Any config the search may pick, at the OLMoE / Qwen3 layer shapes, in bf16; and fused_moe's own choice."""
    if not fused_moe_supported("cuda", torch.bfloat16):
        pytest.skip("needs Triton and sm80+")
    monkeypatch.setenv("MOETANDEM_CACHE_DIR", str(tmp_path))
    for E, N, H, I, k in ((64, 40, 2048, 1024, 8), (128, 100, 2048, 768, 8), (60, 60, 1024, 512, 6)):
        ids, w, tab = routing(T, k, E, N, seed=E + T)
        w13, w2 = (t.cuda().bfloat16() for t in experts(N, H, I, seed=T))
        ids, w, tab = ids.cuda(), w.cuda(), tab.cuda()
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        ref = fused_moe_reference(x.float(), ids, w, w13.float(), w2.float(), tab)
        if E == 64 and T == 1:  # every tile the search may pick (compiling them all is slow: one shape)
            check_every_candidate(lambda bm: fm._Plan(x, ids, w, w13, w2, tab, "silu", bm, direct=True), ref,
                                  1.5e-2)
        assert rel_err(fused_moe(x, ids, w, w13, w2, tab), ref) < 1.5e-2
