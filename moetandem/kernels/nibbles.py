"""Two 4-bit weights per byte (int4, mxfp4; layouts: quant.py) -> the K-ordered tile a tensor-core dot takes,
decoded with bit operations instead of integer -> float conversions.

Byte j of a packed tile [BK/2, BN] holds column 2j in its low nibble and 2j + 1 in its high nibble, so one byte
gives exactly one (k, k + 1) pair of the unpacked tile [BK, BN]: in bf16, one 32-bit register, the unit an mma
operand is made of; no activation columns are split or gathered. With bf16 activations on the GPU each byte takes
a few integer instructions (inline PTX, four bytes per call; t = PRMT(b, b >> 4) puts its two nibbles in the low
bits of the two 16-bit halves):
  int4:  (t & 0x000F000F) | 0x43004300 is the bf16 pair (128 + n) (mantissa unit 1 at 2^7); one bf16x2 FMA
         subtracts 136, giving n - 8 exactly.
  mxfp4: with t holding the two nibbles alone, (t · 0x1040) & 0x81C081C0 moves the e2m1 bits s|e|m to the bf16
         sign, exponent and mantissa bits: that is the FP4 value times 2^-126 exactly, e = 0 landing on bf16
         subnormals, so 0 and 0.5 need no case; one bf16x2 multiply by 2^126 (exact on subnormal inputs) gives it.
Elsewhere (the interpreter; fp16/fp32 activations) the same bit tricks run as Triton ops in fp32 ((n | 0x4B000000)
as fp32 is 2^23 + n; e2m1 bits at the fp32 sign, exponent and mantissa are the value times 2^-126). Both paths give
the exact values, so the dot sees what quant.dequantize defines; tests/test_nibbles.py runs the PTX text itself
through a small emulator on every byte."""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def _ptx(regs: str, setup: str, per_byte: str, sel: str) -> str:
    """An inline-asm body: $4 holds four bytes; setup makes s = $4 >> 4 (and more); per_byte, formatted with j and
    the prmt selector sel.format(j, 4 + j), writes word $j from byte j. The selector puts input byte j in byte 0 of
    t and s's byte j in its byte 2, so the low nibble of each 16-bit half of t is byte j's low / high nibble."""
    body = "".join(per_byte.format(j=j, sel=sel.format(j, 4 + j)) for j in range(4))
    return "{\n.reg .b32 " + regs + ";\n" + setup + body + "}"


#: four bytes -> four words, word j = byte j's (low, high) nibble as a bf16 pair of their values
INT4_PTX = _ptx("s, t, one, off",
                "mov.b32 one, 0x3F803F80;\nmov.b32 off, 0xC308C308;\n"  # bf16 pairs 1, -136
                "shr.b32 s, $4, 4;\n",
                "prmt.b32 t, $4, s, {sel};\n"
                "lop3.b32 t, t, 0x000F000F, 0x43004300, 0xEA;\n"  # (t & 0x000F000F) | 0x43004300: 128 + n
                "fma.rn.bf16x2 ${j}, t, one, off;\n",  # - 136
                "0x0{1}0{0}")
#: the same for e2m1. The nibbles are masked once a word (x, s); selector nibbles 8 fill bytes 1 and 3 of t with
#: zeros (the sign-replicate of x's byte 0, whose top bit is 0), so t holds the two nibbles alone
MXFP4_PTX = _ptx("s, t, x, k, z",
                 "mov.b32 k, 0x7E807E80;\nmov.b32 z, 0x80008000;\n"  # bf16 pairs 2^126, -0
                 "shr.b32 s, $4, 4;\nand.b32 s, s, 0x0F0F0F0F;\nand.b32 x, $4, 0x0F0F0F0F;\n",
                 "prmt.b32 t, x, s, {sel};\n"
                 "mul.lo.u32 t, t, 0x1040;\n"  # (t << 6) | (t << 12): e, m at bits 7-8, 6; the sign at 15
                 "and.b32 t, t, 0x81C081C0;\n"  # = the FP4 value · 2^-126 as bf16 bits
                 "fma.rn.bf16x2 ${j}, t, k, z;\n",  # · 2^126 (+ -0 keeps the sign of a zero)
                 "0x8{1}8{0}")

if triton is not None:
    from triton import knobs

    INTERPRET = tl.constexpr(bool(knobs.runtime.interpret))
    _INT4 = tl.constexpr(INT4_PTX)
    _MXFP4 = tl.constexpr(MXFP4_PTX)

    @triton.jit
    def _interleave(lo, hi):
        """[R, C] twice -> [2R, C]: row 2j is lo[j], row 2j + 1 is hi[j] (register moves only)."""
        return tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (2 * lo.shape[0], lo.shape[1]))

    @triton.jit
    def _values_fp32(n, FMT: tl.constexpr):
        """uint8 nibbles [R, C] (0..15) -> their fp32 values: int4 n - 8, mxfp4 the e2m1 value."""
        n = n.to(tl.uint32)
        if FMT == 3:
            v = (n | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0  # (2^23 + n) - (2^23 + 8)
        else:
            v = (((n & 8) << 28) | ((n & 7) << 22)).to(tl.float32, bitcast=True) * 8.507059173023462e+37  # · 2^126
        return v

    @triton.jit
    def unpack(q, FMT: tl.constexpr, CDT: tl.constexpr):
        """Packed bytes q [R, C] (uint8, format FMT: 3 int4, 4 mxfp4) -> their values [2R, C] in K order, unscaled:
        bf16 where CDT is (on the GPU), else fp32 (exact either way)."""
        if CDT == tl.bfloat16 and not INTERPRET:
            if FMT == 3:
                w = tl.inline_asm_elementwise(_INT4, "=r,=r,=r,=r,r", [q], dtype=tl.int32, is_pure=True, pack=4)
            else:
                w = tl.inline_asm_elementwise(_MXFP4, "=r,=r,=r,=r,r", [q], dtype=tl.int32, is_pure=True, pack=4)
            lo = w.to(tl.int16).to(tl.bfloat16, bitcast=True)
            hi = (w >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
        else:
            lo = _values_fp32(q & 15, FMT)
            hi = _values_fp32(q >> 4, FMT)
        return _interleave(lo, hi)
