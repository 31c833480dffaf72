"""Mapped host experts in a format of their own (`--miss-format`): bf16 device slots, int8 / int4 misses read
zero-copy from the host. fused_moe runs the GEMMs once per format into one scratch; the result must equal the
reference computed with the dequantized host weights (CPU reference; Triton under the interpreter; GPU)."""
from __future__ import annotations

import importlib
import os

import pytest
import torch

from kernel_checks import rel_err
from moetandem.kernels import fused_moe, fused_moe_op, fused_moe_reference, quant, tuning
from test_fused_moe_formats import byte_slots, experts, routing

fm = importlib.import_module("moetandem.kernels.fused_moe")
interpret = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or fm.triton is None,
                               reason="needs TRITON_INTERPRET=1 and an importable triton")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def case(fmt: str, T: int, k: int, E: int, N: int, H: int, I: int, seed: int, bias: bool = False,
         device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Float device slots (the experts the table names), every expert on the host packed in `fmt`, the table with
    host entries N + e for the misses, and the oracle's weights: slots, then the dequantized host experts."""
    ids, w, tab = routing(T, k, E, N, seed, zero_frac=0.1)
    full = experts(E, H, I, seed + 1, device)
    order = torch.full((N,), -1, dtype=torch.long)
    order[tab.long()[tab >= 0]] = torch.arange(E)[tab >= 0]  # slot -> expert
    d = tuple(t[order.to(device)].to(dtype) for t in full)  # [N, 2I, H], [N, H, I]
    _, hd, hs = byte_slots(*full, fmt, pin=device == "cuda")
    deq = tuple(quant.dequantize(a, b, fmt).to(device, dtype) for a, b in zip(hd, hs))  # [E, 2I, H], [E, H, I]
    mapped = torch.where(tab >= 0, tab, N + torch.arange(E)).int().to(device)  # [E]
    g = torch.Generator().manual_seed(seed + 2)
    b = hb = None
    if bias:
        fb = (torch.randn(E, 2 * I, generator=g), torch.randn(E, H, generator=g))
        b = tuple(t[order].to(device, dtype) for t in fb)
        hb = tuple(t.to(device, dtype) for t in fb)
    x = torch.randn(T, H, generator=g).to(device, dtype)  # [T, H]
    host = (*hd, *hb) if bias else hd
    want = fused_moe_reference(x, ids.to(device), w.to(device), *d, mapped, host=(*deq, *hb) if bias else deq,
                               bias=b)  # dequantized host experts, in the slots' format
    return dict(x=x, ids=ids.to(device), w=w.to(device), d=d, tab=mapped, host=host, hs=hs, bias=b, want=want)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_reference_reads_host_experts_in_their_format(fmt: str) -> None:
    c = case(fmt, T=5, k=3, E=9, N=4, H=64, I=64, seed=1)
    got = fused_moe_reference(c["x"], c["ids"], c["w"], *c["d"], c["tab"], host=c["host"], host_scales=c["hs"],
                              host_fmt=fmt)
    torch.testing.assert_close(got, c["want"], rtol=1e-5, atol=1e-5)
    assert torch.equal(fused_moe(c["x"], c["ids"], c["w"], *c["d"], c["tab"], host=c["host"], host_scales=c["hs"],
                                 host_fmt=fmt), got)  # off CUDA: the reference
    args = (c["x"], c["ids"], c["w"], *c["d"], c["tab"], "silu", *c["host"], None, None, None, None, 1.702, 7.0,
            "bf16", None, None, *c["hs"], fmt)
    assert torch.equal(fused_moe_op(*args), got)  # the custom op carries host_fmt
    checks = torch.library.opcheck(fused_moe_op, args)
    assert all(v == "SUCCESS" for v in checks.values()), checks


def test_host_format_arguments_are_checked() -> None:
    c = case("int8", T=2, k=2, E=6, N=3, H=64, I=32, seed=3)
    with pytest.raises(ValueError, match="need scales"):
        fused_moe(c["x"], c["ids"], c["w"], *c["d"], c["tab"], host=c["host"], host_fmt="int8")
    with pytest.raises(ValueError, match="int4 host experts must be"):
        fused_moe(c["x"], c["ids"], c["w"], *c["d"], c["tab"], host=c["host"], host_scales=c["hs"], host_fmt="int4")


def run_plan(c: dict, fmt: str, direct: bool, kc: tuning.KernelConfig, block_m: int = 16) -> torch.Tensor:
    p = fm._Plan(c["x"], c["ids"], c["w"], *c["d"], c["tab"], "silu", block_m, c["host"], c["bias"], 1.702, 7.0,
                 "bf16", None, c["hs"], direct=direct, host_fmt=fmt)
    assert len(p.sides) == 2 and p.sides[1].lo == p.NS
    p.up(kc)
    p.down(kc)
    return p.reduce()


@interpret
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_triton_interpreter_host_misses_in_their_format(fmt: str, direct: bool, bias: bool) -> None:
    """Device slots fp32 (the interpreter has no bf16 arithmetic), misses int8 / int4 from the host."""
    c = case(fmt, T=2 if direct else 5, k=4, E=9, N=4, H=128, I=64, seed=5 + direct, bias=bias)
    for kc in (tuning.KernelConfig(32, 64, 4, 1), tuning.CANDIDATES[2]):
        torch.testing.assert_close(run_plan(c, fmt, direct, kc), c["want"], rtol=1e-4, atol=1e-4)


def test_interpreter_subprocess() -> None:
    """The interpreter tests above, in a child process with TRITON_INTERPRET=1 (plain CPU pytest runs)."""
    if fm.triton is None or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs triton; already interpreting")
    from kernel_checks import run_interpreted
    run_interpreted(__file__, "triton_interpreter and not subprocess")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("T", [1, 8])
def test_triton_host_misses_in_their_format_gpu(fmt: str, T: int, tmp_path, monkeypatch) -> None:
    """bf16 slots with int8 / int4 misses from pinned host memory, OLMoE-like shape: matches the dequantized oracle."""
    monkeypatch.setenv("MOETANDEM_CACHE_DIR", str(tmp_path))
    c = case(fmt, T=T, k=8, E=64, N=32, H=2048, I=1024, seed=T, device="cuda", dtype=torch.bfloat16)
    out = fused_moe(c["x"], c["ids"], c["w"], *c["d"], c["tab"], host=c["host"], host_scales=c["hs"], host_fmt=fmt)
    assert torch.isfinite(out).all() and rel_err(out, c["want"]) < 2e-2, rel_err(out, c["want"])
