"""4-bit unpacking (kernels/nibbles.py) and the packed K step (kernels/tiles.py: wdot) against quant.dequantize:
the inline PTX itself run by a small emulator on every byte (CPU), the Triton paths under the interpreter (in this
process under TRITON_INTERPRET=1, else in a child process that sets it: K tails, every scale path, negative and zero
int4 scales, e8m0 scales from 2^-127 up, every e2m1 code) and on a GPU (the PTX path, exact bits)."""
from __future__ import annotations

import os
import re

import pytest
import torch

from kernel_checks import run_interpreted
from moetandem.kernels import nibbles, quant

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
PTX = {"int4": nibbles.INT4_PTX, "mxfp4": nibbles.MXFP4_PTX}


# ---------------------------------------------------------------- the PTX, emulated

def _bf16(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).to(torch.int16).view(torch.bfloat16))


def _bf16_bits(x: float) -> int:
    return int(torch.tensor([x], dtype=torch.float64).to(torch.bfloat16).view(torch.int16)) & 0xFFFF


def _prmt(a: int, b: int, sel: int) -> int:
    src = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        c = (sel >> 4 * i) & 0xF
        byte = src[c & 7]
        if c & 8:  # sign-replicate mode
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << 8 * i
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    return sum(((lut >> ((a >> i & 1) << 2 | (b >> i & 1) << 1 | (c >> i & 1))) & 1) << i for i in range(32))


def _fma_bf16x2(a: int, b: int, c: int) -> int:
    halves = [_bf16_bits(_bf16(a >> s & 0xFFFF) * _bf16(b >> s & 0xFFFF) + _bf16(c >> s & 0xFFFF)) for s in (0, 16)]
    return halves[0] | halves[1] << 16


OPS = {"mov.b32": lambda a: a, "shr.b32": lambda a, b: a >> b, "and.b32": lambda a, b: a & b,
       "mul.lo.u32": lambda a, b: a * b & 0xFFFFFFFF, "prmt.b32": _prmt, "lop3.b32": _lop3,
       "fma.rn.bf16x2": _fma_bf16x2}


def run_ptx(text: str, word: int) -> list[int]:
    """Emulate the inline asm on one input register ($4): the four output registers ($0..$3)."""
    regs = {"$4": word}
    for line in re.findall(r"^\s*([a-z][\w.]*)\s+([^;]*);", text, re.M):
        op, args = line[0], [x.strip() for x in line[1].split(",")]
        if op.startswith(".reg"):
            continue
        vals = [regs[x] if x in regs else int(x, 0) for x in args[1:]]
        regs[args[0]] = OPS[op](*vals) & 0xFFFFFFFF
    return [regs[f"${j}"] for j in range(4)]


def expected_bits(fmt: str, nibble: int) -> int:
    v = nibble - 8 if fmt == "int4" else quant.FP4_VALUES[nibble]
    return _bf16_bits(v)


@pytest.mark.parametrize("fmt", ["int4", "mxfp4"])
def test_ptx_unpacks_every_byte_exactly(fmt: str) -> None:
    """Word j of the asm's output is byte j's (low, high) nibble as a bf16 pair, bit for bit what quant.dequantize
    gives (int4 n - 8; every e2m1 code incl. the subnormal ±0.5 and -0)."""
    for base in range(0, 256, 4):
        b = [(base + j * 37) % 256 for j in range(4)]  # four different bytes per call, every byte once over the loop
        words = run_ptx(PTX[fmt], b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24)
        for j in range(4):
            assert words[j] & 0xFFFF == expected_bits(fmt, b[j] & 15), (fmt, b[j], "low")
            assert words[j] >> 16 == expected_bits(fmt, b[j] >> 4), (fmt, b[j], "high")
    assert sorted({(base + j * 37) % 256 for base in range(0, 256, 4) for j in range(4)}) == list(range(256))


# ---------------------------------------------------------------- Triton (interpreter; GPU)

try:
    import triton
    import triton.language as tl

    from moetandem.kernels.tiles import FMTS, load_a, wdot
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def _unpack_kernel(q_ptr, out_ptr, FMT: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
        rows, cols = tl.arange(0, R), tl.arange(0, C)
        q = tl.load(q_ptr + rows[:, None] * C + cols[None, :])  # [R, C]
        w = nibbles.unpack(q, FMT, out_ptr.dtype.element_ty)  # [2R, C]
        r2 = tl.arange(0, 2 * R)
        tl.store(out_ptr + r2[:, None] * C + cols[None, :], w.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _gemv_kernel(a_ptr, w_ptr, s_ptr, out_ptr, M, K, KP, N, sa_m, sw_n, ss_n, FMT: tl.constexpr,
                     GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out [M, N] = a [M, K] · Wᵀ through load_a + wdot, as the fused MoE's GEMMs run them."""
        offs_m = tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(0, tl.cdiv(K, BLOCK_K)):
            a0, a1 = load_a(a_ptr + offs_m * sa_m, 1, kt, KP, mask_m, a_ptr.dtype.element_ty, FMT, BLOCK_K)
            acc = wdot(acc, a0, a1, w_ptr, s_ptr, offs_n, mask_n, sw_n, 1, ss_n, 1, kt, KP, FMT, GROUP,
                       "ieee" if a_ptr.dtype.element_ty == tl.float32 else "tf32", BLOCK_K)
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])


def unpacked(q: torch.Tensor, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [R, C] -> [2R, C] through nibbles.unpack."""
    out = torch.empty(2 * q.shape[0], q.shape[1], dtype=dtype, device=q.device)
    _unpack_kernel[(1,)](q, out, FMT=FMTS[fmt], R=q.shape[0], C=q.shape[1], num_warps=1)  # 8 bytes a thread
    return out


def every_byte(device: str) -> torch.Tensor:
    return torch.arange(256, dtype=torch.uint8, device=device).reshape(16, 16).t().contiguous()  # [R=16, C=16]


def want_unpacked(q: torch.Tensor, fmt: str) -> torch.Tensor:
    """[2R, C] fp32: quant.dequantize with unit scales, transposed back (bytes run along R here)."""
    vals = quant.unpack_nibbles(q.t().cpu())  # [C, 2R]
    vals = vals - 8 if fmt == "int4" else torch.tensor(quant.FP4_VALUES)[vals]
    return vals.float().t()


def gemv_case(fmt: str, M: int, K: int, N: int, G: int, seed: int) -> tuple:
    """Activations, packed weights with their scales bent to the edge cases, and the dequantized oracle."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, generator=g)
    d, s = quant.quantize(torch.randn(N, K, generator=g), fmt, G)
    d = torch.randint(0, 256, d.shape, generator=g, dtype=torch.uint8)  # every nibble code, uniformly
    if fmt == "int4":
        s[:, 0] = 0.0
        s[::2] = -s[::2]  # negative and zero scales
    else:
        s = torch.randint(100, 140, s.shape, generator=g, dtype=torch.uint8)
        s[0, :] = torch.tensor([0, 1, 127, 128, 129, 160, 200, 2], dtype=torch.uint8).repeat(K)[:s.shape[1]]
    return a, d, s, a @ quant.dequantize(d, s, fmt).t()


@pytest.mark.skipif(not INTERPRET or triton is None, reason="needs TRITON_INTERPRET=1 and triton (see below)")
@pytest.mark.parametrize("fmt", ["int4", "mxfp4"])
def test_triton_interpreter_unpack(fmt: str) -> None:
    q = every_byte("cpu")
    got, want = unpacked(q, fmt, torch.float32), want_unpacked(q, fmt)
    assert torch.equal(got, want) and torch.equal(torch.signbit(got), torch.signbit(want))  # exact, -0 included


#: (fmt, K, group, BLOCK_K): K tails; per-tile scales (G % BK = 0), groups spread over a tile (BK % G = 0), groups
#: straddling tiles (neither), mxfp4's 32 with every tile size the search has
GEMV = [("int4", 192, 64, 64), ("int4", 192, 64, 128), ("int4", 320, 64, 256), ("int4", 192, 96, 64),
        ("int4", 192, 96, 128), ("int4", 96, 32, 64), ("int4", 256, 128, 128), ("mxfp4", 96, 32, 64),
        ("mxfp4", 160, 32, 128), ("mxfp4", 320, 32, 256), ("mxfp4", 64, 32, 64)]


@pytest.mark.skipif(not INTERPRET or triton is None, reason="needs TRITON_INTERPRET=1 and triton (see below)")
@pytest.mark.parametrize("fmt,K,G,BK", GEMV)
def test_triton_interpreter_packed_k_steps(fmt: str, K: int, G: int, BK: int) -> None:
    M, N, BN = 3, 40, 32  # N ends in a partial tile too
    a, d, s, want = gemv_case(fmt, M, K, N, G, seed=K + G + BK)
    out = torch.empty(M, N)
    _gemv_kernel[(triton.cdiv(N, BN),)](a, d, s, out, M, K, K // 2, N, a.stride(0), d.stride(0), s.stride(0),
                                        FMT=FMTS[fmt], GROUP=G, BLOCK_M=16, BLOCK_N=BN, BLOCK_K=BK)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_triton_interpreter_subprocess() -> None:
    """The interpreter tests above in a child process, so a plain `pytest` run checks them too."""
    if triton is None or INTERPRET:
        pytest.skip("triton missing, or runs in this process")
    run_interpreted(__file__, "triton_interpreter and not subprocess")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or triton is None, reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fmt", ["int4", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_unpack_exact_on_the_gpu(fmt: str, dtype: torch.dtype) -> None:
    """The PTX path (bf16) and the Triton-op path (fp16, fp32): every byte to its exact values, -0 included."""
    q = every_byte("cuda")
    got, want = unpacked(q, fmt, dtype).float().cpu(), want_unpacked(q, fmt)
    assert torch.equal(got, want) and torch.equal(torch.signbit(got), torch.signbit(want))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fmt,K,G,BK", GEMV)
def test_packed_k_steps_on_the_gpu(fmt: str, K: int, G: int, BK: int) -> None:
    """bf16 activations: the PTX unpacking, the scale products and the tensor-core dot against the exact fp32 oracle
    on the same activations, within the rounding of the weights to bf16: at most 2^-8 of each product (a weight
    element scaled before the dot is rounded to bf16 once, twice for int4: bf16(s) · (n - 8))."""
    M, N, BN = 3, 40, 32
    a, d, s, _ = gemv_case(fmt, M, K, N, G, seed=K + G + BK)
    ab = a.bfloat16()
    w = quant.dequantize(d, s, fmt)  # fp32 [N, K]
    want, bound = ab.float() @ w.t(), (ab.float().abs() @ w.abs().t()) * 2.0 ** -8
    out = torch.empty(M, N, device="cuda")
    _gemv_kernel[(triton.cdiv(N, BN),)](ab.cuda(), d.cuda(), s.cuda(), out, M, K, K // 2, N, K, d.stride(0),
                                        s.stride(0), FMT=FMTS[fmt], GROUP=G, BLOCK_M=16, BLOCK_N=BN, BLOCK_K=BK)
    assert ((out.cpu() - want).abs() <= bound * 1.01 + 1e-6 * bound.max()).all()
