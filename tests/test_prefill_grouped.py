"""MOETANDEM_PREFILL_GROUPED_MM (opt-in): long steps over bf16 SwiGLU slots take torch's grouped GEMM instead of the
fused kernel; short steps, mapped host experts, biased or non-SwiGLU experts never do."""
from __future__ import annotations

import pytest
import torch

from moetandem.experts import executor
from moetandem.experts.executor import SWIGLU, _prefill_grouped, device_moe, loop_moe
from moetandem.models.expert_activation import ExpertActivation

CUDA = torch.cuda.is_available()


def _experts(n: int, H: int, I: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w13 = (torch.randn(n, 2 * I, H, generator=g) * 0.05).to(device, dtype)
    w2 = (torch.randn(n, H, I, generator=g) * 0.05).to(device, dtype)
    return w13, w2


def test_only_long_plain_steps_take_the_grouped_gemm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executor, "grouped_mm_supported", lambda *a: True)
    w13, _ = _experts(4, 64, 32, "cpu", torch.bfloat16)
    x64, x8 = torch.zeros(64, 64), torch.zeros(8, 64)
    monkeypatch.setattr(executor, "PREFILL_GROUPED_MM", 0)
    assert not _prefill_grouped(x64, w13, None, SWIGLU, None)  # off by default
    monkeypatch.setattr(executor, "PREFILL_GROUPED_MM", 16)
    assert _prefill_grouped(x64, w13, None, SWIGLU, None)
    assert not _prefill_grouped(x8, w13, None, SWIGLU, None)  # decode-sized steps keep the fused kernel
    assert not _prefill_grouped(x64, w13, (w13, w13), SWIGLU, None)  # mapped host experts: the fused kernel
    assert not _prefill_grouped(x64, w13, None, ExpertActivation("gelu_tanh"), None)
    monkeypatch.setattr(executor, "grouped_mm_supported", lambda *a: False)
    assert not _prefill_grouped(x64, w13, None, SWIGLU, None)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("n,k", [(64, 8), (128, 8), (60, 4)])
def test_grouped_prefill_matches_the_fused_kernel(n: int, k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 512-token step through either path: within bf16 tolerance of each other and of the per-slot reference,
    with some assignments on no slot (−1) and some of weight 0."""
    H, I, T = 256, 128, 512
    w13, w2 = _experts(n, H, I, "cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, H, generator=g).to("cuda", torch.bfloat16)
    ids = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(T)]).int().cuda()  # [T, k]
    ids[::7, -1] = -1
    w = torch.softmax(torch.randn(T, k, generator=g), -1).cuda()
    w[::5, 0] = 0
    ref = loop_moe(x.float(), ids, w, w13.float(), w2.float())
    monkeypatch.setattr(executor, "PREFILL_GROUPED_MM", 0)
    fused = device_moe(x, ids, w, w13, w2)
    monkeypatch.setattr(executor, "PREFILL_GROUPED_MM", 128)
    grouped = device_moe(x, ids, w, w13, w2)
    for got in (fused, grouped):
        err = (got.float() - ref).norm() / ref.norm()
        assert err < 2e-2, err
