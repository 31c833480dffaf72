"""Decode-size linear layers, tuned: y = F.linear(x, weight, bias) for a few tokens on CUDA, by whichever of cuBLAS
and the Triton GEMV candidates (kernels/gemv.py) was fastest for this (GPU, dtype, N, K, bias, T bucket).

At batch-1 decode the attention projections and the lm_head are GEMVs that read their weight once; cuBLAS's
choice for them reached about half of an H200's HBM bandwidth on 8-25 MB matrices. The choice is timed at first use
(triton.testing.do_bench, which flushes the L2 between calls, as a decode step's weight bytes do) and kept in a JSON
file per GPU under ~/.cache/moetandem/decode_linear/ (the fused MoE's cache machinery, kernels/tuning.py). Never
searches while a CUDA graph is being captured: then the cached choice or cuBLAS. MOETANDEM_DECODE_LINEAR_TUNE=0 turns
the search off (cached choice or cuBLAS). Off by default until it is measured against cuBLAS on a GPU
(bench/decode_linear.py): MOETANDEM_DECODE_LINEAR=1 (read at import) turns the op on; otherwise F.linear.

Custom op `moetandem::decode_linear` (opaque to torch.compile, graph-safe once tuned); `decode_linear` calls it where
it applies (CUDA, T <= DECODE_UP_TO, no autograd) and is exactly F.linear everywhere else, e.g. the CPU."""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch
import torch.nn.functional as F

from moetandem.kernels import tuning
from moetandem.kernels.gemv import CANDIDATES, GemvConfig, fits, gemv, triton

DECODE_UP_TO = 8  # tokens (rows of x) up to which the op applies; past that a tensor-core GEMM is cuBLAS's game
ENABLED = os.environ.get("MOETANDEM_DECODE_LINEAR", "0") == "1"  # experimental: see the module docstring
CUBLAS = GemvConfig("cublas", 0, 0, 1, 0, 0)  # the F.linear "candidate"
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CACHE: tuning.ConfigCache[GemvConfig] = tuning.ConfigCache("decode_linear", GemvConfig.from_json)


def tuning_enabled() -> bool:
    return os.environ.get("MOETANDEM_DECODE_LINEAR_TUNE", "1") != "0"


def cache_key(dtype: torch.dtype, N: int, K: int, bias: bool, tokens: int) -> str:
    return f"{str(dtype).removeprefix('torch.')},N={N},K={K},bias={int(bias)},T={tuning.t_bucket(tokens)}"


@functools.lru_cache(maxsize=None)
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _timer(fn: Callable[[], object]) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


def run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, c: GemvConfig) -> torch.Tensor:
    """x [T, K] -> [T, N] by candidate c (CUBLAS: F.linear)."""
    return F.linear(x, weight, bias) if c.kind == "cublas" else gemv(x, weight, bias, c)


def search(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           timer: Callable[[Callable[[], object]], float] = _timer) -> GemvConfig:
    """The fastest of cuBLAS and the Triton candidates that suit every T of x's bucket, on these operands; a candidate
    that fails to run or disagrees with cuBLAS (relative error > 1e-2) is not one."""
    ref = F.linear(x, weight, bias).float()
    T = tuning.t_bucket(x.shape[0])
    best = (timer(lambda: F.linear(x, weight, bias)), CUBLAS)
    for c in CANDIDATES:
        if not fits(c, T):
            continue
        try:
            y = gemv(x, weight, bias, c)
        except Exception:  # noqa: BLE001 - e.g. out of shared memory for this tile: not a candidate here
            continue
        if float((y.float() - ref).norm()) > 1e-2 * float(ref.norm()) + 1e-6:
            continue
        best = min(best, (timer(lambda c=c: gemv(x, weight, bias, c)), c), key=lambda b: b[0])
    return best[1]


def pick(gpu: str, key: str, tune: Callable[[], GemvConfig]) -> GemvConfig:
    """The cached choice for (gpu, key), else tune() stored for next time; cuBLAS, untuned and unstored, while a
    CUDA graph is being captured or with tuning off."""
    c = CACHE.get(gpu, key)
    if c is not None:
        return c
    if torch.cuda.is_current_stream_capturing() or not tuning_enabled():
        return CUBLAS
    c = tune()
    CACHE.put(gpu, key, c)
    return c


def choice(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> GemvConfig:
    """What runs x [T, K] · weight [N, K]ᵀ: cuBLAS off CUDA, else pick() for this GPU and shape bucket."""
    if not x.is_cuda or triton is None:
        return CUBLAS
    gpu = _gpu_name(x.device.index if x.device.index is not None else torch.cuda.current_device())
    key = cache_key(x.dtype, weight.shape[0], weight.shape[1], bias is not None, x.shape[0])
    return pick(gpu, key, lambda: search(x, weight, bias))


@torch.library.custom_op("moetandem::decode_linear", mutates_args=())
def decode_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K], weight [N, K], bias [N] or None (one dtype, unit inner strides) -> [T, N] = F.linear(x, weight,
    bias) by the tuned choice (cuBLAS off CUDA)."""
    return run(x, weight, bias, choice(x, weight, bias))


@decode_linear_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def decode_linear_supported(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether decode_linear takes the op: CUDA, 1..DECODE_UP_TO rows of x, one float dtype, unit inner strides, and
    no autograd (the op has no backward)."""
    K = weight.shape[-1]
    if not (ENABLED and triton is not None and x.is_cuda and weight.device == x.device and weight.dim() == 2):
        return False
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    return (not grad and x.dtype in _DTYPES and weight.dtype == x.dtype and x.shape[-1] == K and x.numel() > 0
            and x.numel() // K <= DECODE_UP_TO and weight.stride(1) == 1
            and (bias is None or (bias.device == x.device and bias.dtype == x.dtype and bias.stride(0) == 1)))


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., K]: the tuned op at decode sizes on CUDA, F.linear itself elsewhere."""
    if not decode_linear_supported(x, weight, bias):
        return F.linear(x, weight, bias)
    y = decode_linear_op(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias)  # [T, N]
    return y.view(*x.shape[:-1], weight.shape[0])
