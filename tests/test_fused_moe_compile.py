"""The fused MoE's GEMM kernels compile for Hopper (sm90) in every expert format, on a machine without a GPU:
Triton's front end, its NVIDIA passes and the bundled ptxas, specialized as a launch would be (unit inner strides,
16-aligned pointers and sizes). Catches what the interpreter cannot (layouts, fp8 conversions, vector widths)."""
from __future__ import annotations

import importlib
import os
import re

import pytest

from moetandem.kernels import tuning
from moetandem.kernels.tiles import FMTS

fm = importlib.import_module("moetandem.kernels.fused_moe")
triton = pytest.importorskip("triton")
DATA = {"bf16": "*bf16", "int8": "*i8", "fp8": "*fp8e4nv", "int4": "*u8", "mxfp4": "*u8"}
SCALE = {"bf16": "*bf16", "int8": "*fp32", "fp8": "*fp32", "int4": "*fp32", "mxfp4": "*u8"}
GROUPS = {"bf16": 1, "int8": 2048, "fp8": 768, "int4": 128, "mxfp4": 32}  # tile-scaled and element-scaled both
UNALIGNED = ("alpha", "limit", "TOP_K", "NS", "LO", "HI")


def compile_sm90(kernel, fmt: str, c: tuning.KernelConfig, block_m: int = 16, direct: bool = False):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    bias = fmt == "mxfp4"  # gpt-oss: biases and the clamped SwiGLU
    ce = {"HAS_BIAS": bias, "FMT": FMTS[fmt], "GROUP": GROUPS[fmt], "PRECISION": "tf32", "BLOCK_M": block_m,
          "BLOCK_N": c.block_n, "BLOCK_K": c.block_k, "sw_k": 1, "ss_k": 1}
    ce.update(DIRECT=direct, HAS_TABLE=True)
    if kernel is fm._gate_up_kernel:
        ce.update(ACT=3 if bias else 0, sx_k=1)
    types = {"x_ptr": "*bf16", "w_ptr": DATA[fmt], "hw_ptr": DATA[fmt], "s_ptr": SCALE[fmt], "hs_ptr": SCALE[fmt],
             "b_ptr": "*bf16" if bias else DATA[fmt], "hb_ptr": "*bf16" if bias else DATA[fmt], "h_ptr": "*bf16",
             "y_ptr": "*fp32", "rw_ptr": "*fp32", "sorted_ptr": "*i32", "bslot_ptr": "*i32", "brows_ptr": "*i32",
             "alpha": "fp32", "limit": "fp32", "ids_ptr": "*i64", "table_ptr": "*i32", "out_ptr": "*bf16"}
    sig = {n: "constexpr" if n in ce else types.get(n, "i32") for n in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
             if n not in ce and n not in UNALIGNED}
    return triton.compile(ASTSource(kernel, sig, ce, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": c.num_warps, "num_stages": c.num_stages})


@pytest.mark.parametrize("fmt", list(DATA))
def test_gemm_kernels_compile_for_sm90(fmt: str) -> None:
    if fm.triton is None or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs triton's compiler (not its interpreter)")
    for kernel, direct in ((fm._gate_up_kernel, False), (fm._gate_up_kernel, True), (fm._down_kernel, False),
                           (fm._down_kernel, True)):
        try:
            ck = compile_sm90(kernel, fmt, tuning.CANDIDATES[1], direct=direct)
        except (RuntimeError, FileNotFoundError) as e:  # no bundled ptxas on this install
            if "ptxas" in str(e).lower():
                pytest.skip(f"no ptxas: {e}")
            raise
        assert ck.asm["cubin"] and "mma.sync" in ck.asm["ptx"]  # tensor-core dots, not a scalar fallback
        if fmt != "bf16":  # packed weights arrive in 16-byte pipelined copies, as bf16 ones do
            assert "cp.async.cg.shared.global" in ck.asm["ptx"], kernel
        if fmt in ("int4", "mxfp4"):  # nibbles unpacked by the bit-operation PTX, no integer -> float conversions
            assert "prmt.b32" in ck.asm["ptx"] and not re.search(r"cvt\.rn\.\w+\.[su](8|16|32)\b", ck.asm["ptx"])
