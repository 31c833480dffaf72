"""The fused MoE's gated activation, shared by its GEMM kernels' gate+up epilogues (kernels/fused_moe.py, the tl.dot
tiles; kernels/fused_moe_gemv.py, the direct path's GEMV): h = act(gate) ⊙ up on fp32 accumulators of any shape.
Codes as reference.ACTIVATIONS: 0 SiLU, 1 GELU (erf), 2 GELU (tanh form), 3 gpt-oss's clamped SwiGLU (alpha, limit)."""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path needs none of this
    triton = None

if triton is not None:
    @triton.jit
    def act(g, ACT: tl.constexpr):
        """The activation of code ACT (0-2) on g, elementwise."""
        if ACT == 0:
            r = g * tl.sigmoid(g)
        elif ACT == 1:
            r = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
        else:
            inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            r = g * tl.sigmoid(2.0 * inner)  # 0.5·(1 + tanh(u)) = sigmoid(2u)
        return r

    @triton.jit
    def glu(g, u, ACT: tl.constexpr, alpha, limit):
        """act(g) ⊙ u; ACT 3: gpt-oss's (min(u, ±limit) + 1) · g' σ(alpha g'), g' = min(g, limit)."""
        if ACT == 3:  # clamped SwiGLU (gpt-oss)
            g = tl.minimum(g, limit)
            u = tl.minimum(tl.maximum(u, -limit), limit)
            r = (u + 1.0) * (g * tl.sigmoid(g * alpha))
        else:
            r = act(g, ACT) * u
        return r
