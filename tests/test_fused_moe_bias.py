"""Biased experts and gpt-oss's clamped SwiGLU in every expert path: the fused-MoE reference against a naive loop
(CPU), the executor's loop / grouped paths against it, and the Triton kernels against the reference, under
Triton's interpreter on the CPU (`TRITON_INTERPRET=1` with triton importable) and on a GPU."""
from __future__ import annotations

import importlib
import os

import pytest
import torch

from moetandem.experts.executor import run_experts
from moetandem.experts.store import flat_bias_views, flat_views
from moetandem.kernels import fused_moe, fused_moe_reference, fused_moe_supported, tuning
from moetandem.models.expert_activation import ExpertActivation

fm = importlib.import_module("moetandem.kernels.fused_moe")  # the module (the package exports the function)
interpret = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or fm.triton is None,
                               reason="needs TRITON_INTERPRET=1 and an importable triton")
ALPHA, LIMIT = 1.702, 1.5  # a low limit so the clamps bind on these random weights
GPT_OSS = ExpertActivation("clamped_swiglu", bias=True, alpha=ALPHA, limit=LIMIT)


def biased_problem(T: int, k: int, E: int, N: int, H: int, I: int, device: str = "cpu",
                   dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple:
    """Distinct experts per token, some weights 0, a slot table; weights and biases as views of flat slots
    [N, 3IH + 2I + H] (the ExpertStore's layout for biased families)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)  # [T, H]
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])  # [T, k]
    w = torch.rand(T, k, generator=g)
    w[torch.rand(T, k, generator=g) < 0.2] = 0
    tab = torch.full((E,), -1, dtype=torch.int32)
    tab[torch.randperm(E, generator=g)[:N]] = torch.randperm(N, generator=g).int()
    buf = (torch.randn(N, 3 * I * H + 2 * I + H, generator=g) * 3 * H ** -0.5).to(device, dtype)
    return (x.to(device, dtype), ids.to(device), w.to(device), *flat_views(buf, I, H),
            flat_bias_views(buf, I, H), tab.to(device))


def naive(x, ids, w, w13, w2, bias, tab, act: ExpertActivation) -> torch.Tensor:
    """One assignment at a time in fp32, written from the definition (as transformers' GptOssExperts)."""
    I = w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            s = int(tab[ids[t, j]])
            if s < 0 or float(w[t, j]) == 0:
                continue
            gu = w13[s].float() @ x[t].float() + bias[0][s].float()  # [2I]
            gate, up = gu[:I].clamp(max=act.limit), gu[I:].clamp(-act.limit, act.limit)
            h = (up + 1) * gate * torch.sigmoid(act.alpha * gate)
            out[t] += float(w[t, j]) * (w2[s].float() @ h + bias[1][s].float())
    return out


def test_reference_matches_naive() -> None:
    x, ids, w, w13, w2, bias, tab = biased_problem(9, 3, 10, 6, 24, 16)
    got = fused_moe_reference(x, ids, w, w13, w2, tab, "clamped_swiglu", bias=bias, alpha=ALPHA, limit=LIMIT)
    torch.testing.assert_close(got, naive(x, ids, w, w13, w2, bias, tab, GPT_OSS), rtol=1e-5, atol=1e-5)
    assert torch.equal(fused_moe(x, ids, w, w13, w2, tab, "clamped_swiglu", bias=bias, alpha=ALPHA, limit=LIMIT),
                       got)
    with pytest.raises(ValueError, match="biases"):
        fused_moe_reference(x, ids, w, w13, w2, tab, "clamped_swiglu", bias=(bias[0][:, :4], bias[1]))


def grouped_mm_loop(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch's grouped GEMM semantics, one group at a time: rows [offs[i-1], offs[i]) of a times b[i]."""
    out, start = [], 0
    for i, end in enumerate(offs.tolist()):
        out.append(a[start:end] @ b[i])
        start = end
    return torch.cat(out)


@pytest.mark.parametrize("grouped", [False, True])
def test_executor_paths_match_reference(grouped: bool, monkeypatch) -> None:
    """run_experts with the activation and biases (slot ids = expert ids through the table)."""
    import moetandem.experts.executor as executor
    x, ids, w, w13, w2, bias, tab = biased_problem(7, 2, 8, 8, 32, 16, seed=1)
    slots = tab.long()[ids].int()  # [T, k]
    want = naive(x, ids, w, w13, w2, bias, tab, GPT_OSS)
    if grouped:  # (on the CPU: the grouped path's bias and activation logic, with the GEMMs emulated)
        monkeypatch.setattr(executor, "_grouped_mm", grouped_mm_loop)
    got = run_experts(x, slots, w, w13, w2, grouped, act=GPT_OSS, bias=bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs biases"):
        run_experts(x, slots, w, w13, w2, grouped, act=GPT_OSS)


def run_plan(x, ids, w, w13, w2, tab, act: str, bias, host=None, block_m: int = 16) -> torch.Tensor:
    """The three Triton launches of fused_moe on a fixed config (no tuning): also what the interpreter runs."""
    p = fm._Plan(x, ids, w, w13, w2, tab, act, block_m, host, bias, ALPHA, LIMIT)
    p.up(tuning.CANDIDATES[1])
    p.down(tuning.CANDIDATES[1])
    return p.reduce()


@interpret
@pytest.mark.parametrize("act", ["clamped_swiglu", "silu", "gelu_tanh"])
def test_triton_interpreter_biases_and_activations(act: str) -> None:
    x, ids, w, w13, w2, bias, tab = biased_problem(5, 2, 6, 4, 32, 16, seed=2)
    ref = fused_moe_reference(x, ids, w, w13, w2, tab, act, bias=bias, alpha=ALPHA, limit=LIMIT)
    torch.testing.assert_close(run_plan(x, ids, w, w13, w2, tab, act, bias), ref, rtol=1e-4, atol=1e-4)


@interpret
def test_triton_interpreter_host_experts_with_biases() -> None:
    """Misses read from the mapped host copy (slot-table entry N + e), biases included."""
    x, ids, w, w13, w2, bias, tab = biased_problem(5, 2, 6, 3, 32, 16, seed=4)
    _, _, _, hw13, hw2, hbias, _ = biased_problem(1, 1, 6, 6, 32, 16, seed=5)  # every expert on the host
    mapped = torch.where(tab >= 0, tab, 3 + torch.arange(6)).int()  # [E]
    host = (hw13, hw2, *hbias)
    ref = fused_moe_reference(x, ids, w, w13, w2, mapped, "clamped_swiglu", host, bias, ALPHA, LIMIT)
    torch.testing.assert_close(run_plan(x, ids, w, w13, w2, mapped, "clamped_swiglu", bias, host), ref,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T", [1, 8, 64])
def test_triton_clamped_swiglu_gpu(T: int, tmp_path, monkeypatch) -> None:
    if not fused_moe_supported("cuda", torch.bfloat16):
        pytest.skip("needs Triton and sm80+")
    monkeypatch.setenv("MOETANDEM_CACHE_DIR", str(tmp_path))
    x, ids, w, w13, w2, bias, tab = biased_problem(T, 4, 32, 20, 2880, 2880, "cuda", torch.bfloat16, seed=T)
    out = fused_moe(x, ids, w, w13, w2, tab, "clamped_swiglu", bias=bias, alpha=ALPHA, limit=7.0)
    ref = fused_moe_reference(x.float(), ids, w, w13.float(), w2.float(), tab, "clamped_swiglu",
                              bias=(bias[0].float(), bias[1].float()), alpha=ALPHA, limit=7.0)
    err = float((out.float() - ref).norm() / ref.norm().clamp_min(1e-12))
    assert torch.isfinite(out).all() and err < 1.5e-2, err
