"""Router logits and top-k in one launch: x [T, H] · weight [E, H]ᵀ (+ bias) -> logits [T, E], then the top-k of
kernels/router.py on each row -> ids [T, k], weights [T, k].

At decode the router's matmul is a 256-512 KB GEMV that cuBLAS runs in ~5 µs (launch- and latency-bound, not
bandwidth-bound), and route_topk is a second launch after it. Here the E rows are split over E / BLOCK_E programs
per block of BLOCK_T tokens (32 programs at T=1 for 32 <= E <= 256, so the weight streams from many SMs at once);
each program writes its logits (fp32 accumulation, stored in x's dtype as F.linear would; the summation order differs
from cuBLAS's, so a near-tie may pick differently), then counts itself in on an int32
counter of its token block (acquire/release atomics). The program that arrives last sees every program's logits,
resets the counter to 0 (so the next launch, or the next replay of a CUDA graph, starts from 0 with no memset) and
runs route_topk's selection on the full rows. The counters are one small persistent buffer per device: launches of
this kernel must not overlap on two streams at once (a CUDA graph's replays and the engine's stream are fine).

Prefill (T > FUSED_UP_TO) keeps F.linear + route_topk: a tensor-core GEMM wins there. Custom op
`moetandem::route_logits_topk` on CUDA (opaque to torch.compile, graph-safe, no host sync); PyTorch elsewhere."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moetandem.errors import MoetandemError
from moetandem.kernels.router import MAX_EXPERTS, RULES, check_route, route_topk, route_topk_op

try:
    import triton
    import triton.language as tl

    from moetandem.kernels.router import select_topk
except ImportError:
    triton = None

FUSED_MAX_TOKENS = 16  # tokens one fused launch can take (and counters per device)
#: tokens up to which the op takes the fused kernel: measured on an H200 (bench/router.py, 2026-11-30) it is
#: 1.3-1.6x faster than cuBLAS linear + route_topk at T = 1, 1.06x (E = 64) and 0.86x (E = 128) at T = 8
FUSED_UP_TO = 4
MAX_HIDDEN = 16384  # the hidden loop is unrolled
TILE = 4096  # BLOCK_T * BLOCK_E * BLOCK_H products per step of the hidden loop
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_counters: dict[torch.device, torch.Tensor] = {}


@dataclass(frozen=True)
class Blocks:
    """A launch's tiling: tokens and experts per program, hidden elements per loop step, warps per program."""
    block_t: int
    block_e: int
    block_h: int
    num_warps: int


def default_blocks(T: int, E: int, H: int, block_t: int | None = None, block_e: int | None = None,
                   num_warps: int | None = None) -> Blocks:
    """32 programs per token block (E <= 256), two tokens a program past T=1, one warp up to E=128 (the top-k
    then reduces with shuffles alone, as route_topk does); bench/router.py sweeps the alternatives."""
    bt = block_t or (1 if T == 1 else 2)
    be = block_e or min(8, max(1, triton.next_power_of_2(E) // 32))
    bh = min(triton.next_power_of_2(H), max(64, TILE // (bt * be)))
    return Blocks(bt, be, bh, num_warps or (1 if E <= 128 else 4))


if triton is not None:
    @triton.jit
    def _logits_topk_kernel(x_ptr, w_ptr, b_ptr, logits_ptr, ids_ptr, wts_ptr, count_ptr, T, E, s_xt, s_we,
                            H: tl.constexpr, HAS_BIAS: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                            RULE: tl.constexpr, RENORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                            BLOCK_H: tl.constexpr, E_ALL: tl.constexpr):
        pe, pt = tl.program_id(0), tl.program_id(1)
        offs_t = pt * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
        offs_e = pe * BLOCK_E + tl.arange(0, BLOCK_E)  # [BE]
        offs_h = tl.arange(0, BLOCK_H)
        t_ok, e_ok = offs_t < T, offs_e < E
        x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * s_xt  # [BT, 1]
        w_rows = w_ptr + offs_e.to(tl.int64)[:, None] * s_we  # [BE, 1]
        acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
        for h0 in tl.static_range(0, H, BLOCK_H):  # unrolled: every load is in flight at once
            h = h0 + offs_h
            xs = tl.load(x_rows + h[None, :], mask=t_ok[:, None] & (h < H)[None, :], other=0.0)  # [BT, BH]
            ws = tl.load(w_rows + h[None, :], mask=e_ok[:, None] & (h < H)[None, :], other=0.0)  # [BE, BH]
            acc += tl.sum(xs.to(tl.float32)[:, None, :] * ws.to(tl.float32)[None, :, :], axis=2)  # [BT, BE]
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(logits_ptr + offs_t[:, None] * E + offs_e[None, :], acc.to(logits_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & e_ok[None, :])
        tl.debug_barrier()  # all of this program's stores come before its release below
        arrived = tl.atomic_add(count_ptr + pt, 1, sem="acq_rel")  # programs of this token block before this one
        if arrived == tl.num_programs(0) - 1:  # the last one: every block of logits is written and visible
            tl.atomic_xchg(count_ptr + pt, 0)  # ready for the next launch (or graph replay)
            tl.debug_barrier()  # the acquire above orders every thread's loads below
            offs = tl.arange(0, E_ALL)
            offs_k = tl.arange(0, KP)
            for i in tl.static_range(BLOCK_T):
                t = pt * BLOCK_T + i
                row = tl.load(logits_ptr + tl.minimum(t, T - 1) * E + offs, mask=offs < E, other=float("-inf"),
                              cache_modifier=".cg")  # [E_ALL], from L2: other SMs wrote it; past T, a real row
                idx, vals = select_topk(row.to(tl.float32), offs, K, KP, RULE, RENORM, E_ALL)
                keep = (offs_k < K) & (t < T)
                tl.store(ids_ptr + t * K + offs_k, idx, mask=keep)
                tl.store(wts_ptr + t * K + offs_k, vals, mask=keep)


def counters(device: torch.device) -> torch.Tensor:
    """The per-device int32 [FUSED_MAX_TOKENS] arrival counters; all zero between launches. Made once per device
    and never freed, so a captured graph's pointer stays valid."""
    c = _counters.get(device)
    if c is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():  # the zeros would come at replay
            raise MoetandemError(f"route_logits_topk's first call on {device} is inside a CUDA graph capture: "
                                 "call it once before capturing (a warm-up step), so its counters exist")
        c = _counters[device] = torch.zeros(FUSED_MAX_TOKENS, dtype=torch.int32, device=device)
    return c


def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int, rule: str, renorm: bool,
           blocks: Blocks, weights_dtype: torch.dtype = torch.float32
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused kernel with a given tiling (the op picks default_blocks): -> logits [T, E] (x's dtype),
    ids int64 [T, k], weights [T, k] in weights_dtype (computed in fp32; the store's implicit cast rounds to
    nearest even, Triton's default downcast, as Tensor.to does; the interpreter truncates fp32 -> bf16).
    Needs 1 <= T <= FUSED_MAX_TOKENS * blocks.block_t."""
    T, H = x.shape
    E = weight.shape[0]
    logits = torch.empty(T, E, dtype=x.dtype, device=x.device)
    ids = torch.empty(T, k, dtype=torch.long, device=x.device)
    w = torch.empty(T, k, dtype=weights_dtype, device=x.device)
    grid = (triton.cdiv(E, blocks.block_e), triton.cdiv(T, blocks.block_t))
    assert grid[1] <= FUSED_MAX_TOKENS, (T, blocks)
    _logits_topk_kernel[grid](
        x, weight, x if bias is None else bias, logits, ids, w, counters(x.device), T, E, x.stride(0),
        weight.stride(0), H=H, HAS_BIAS=bias is not None, K=k, KP=triton.next_power_of_2(k), RULE=RULES.index(rule),
        RENORM=renorm, BLOCK_T=blocks.block_t, BLOCK_E=blocks.block_e, BLOCK_H=blocks.block_h,
        E_ALL=triton.next_power_of_2(E), num_warps=blocks.num_warps)
    return logits, ids, w


@torch.library.custom_op("moetandem::route_logits_topk", mutates_args=())
def route_logits_topk_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int, rule: str,
                         renorm: bool, weights_dtype: torch.dtype | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H], weight [E, H], bias [E] or None (CUDA, unit inner strides, one dtype) -> logits [T, E] (x's
    dtype), ids int64 [T, k], weights [T, k] (fp32, or weights_dtype: rounded from fp32 by the kernel's store);
    one launch up to FUSED_UP_TO tokens, else two (three with a weights_dtype)."""
    T, H = x.shape
    if not 1 <= T <= FUSED_UP_TO:
        logits = F.linear(x, weight, bias)  # [T, E]
        ids, w = route_topk_op(logits, k, rule, renorm)
        return logits, ids, w if weights_dtype is None else w.to(weights_dtype)
    return launch(x, weight, bias, k, rule, renorm, default_blocks(T, weight.shape[0], H),
                  weights_dtype or torch.float32)


@route_logits_topk_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int, rule: str,
      renorm: bool, weights_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T, E = x.shape[0], weight.shape[0]
    return (x.new_empty(T, E), x.new_empty(T, k, dtype=torch.long),
            x.new_empty(T, k, dtype=weights_dtype or torch.float32))


def fused_supported(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether route_logits_topk takes the one-launch kernel for these operands (not where autograd would need the
    logits' graph: the op has no backward)."""
    T, H = x.shape
    E = weight.shape[0]
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    return (triton is not None and not grad and x.is_cuda and weight.device == x.device and x.dtype in _DTYPES
            and weight.dtype == x.dtype and x.stride(1) == 1 and weight.stride(1) == 1 and 1 <= T <= FUSED_UP_TO
            and E <= MAX_EXPERTS and H <= MAX_HIDDEN
            and (bias is None or (bias.device == x.device and bias.dtype == x.dtype and bias.stride(0) == 1)))


def route_logits_topk(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int,
                      rule: str = "softmax_topk", renorm: bool = False, weights_dtype: torch.dtype | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H] -> (logits [T, E] = F.linear(x, weight, bias), ids int64 [T, k] best first, weights fp32 [T, k]),
    the top-k by `rule` as route_topk; one launch on CUDA at decode sizes, else F.linear then route_topk.
    weights_dtype: the weights rounded to it, by the fused kernel's own store where it runs (no cast launch)."""
    check_route(k, weight.shape[0], rule)
    if fused_supported(x, weight, bias):
        return route_logits_topk_op(x, weight, bias, k, rule, renorm, weights_dtype)
    logits = F.linear(x, weight, bias)  # [T, E]
    ids, w = route_topk(logits, k, rule, renorm)
    return logits, ids, w if weights_dtype is None else w.to(weights_dtype)
