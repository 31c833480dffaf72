"""The fused decode prologue (moetandem/kernels/qk_rope.py, switched on by attention.QK_ROPE_FUSED): its PyTorch
reference and its Triton kernel (under Triton's interpreter on the CPU, in a child process that sets it, and on a
GPU) against the model's own ops (RMSNorm -> apply_rope -> cache write), then the switch through whole models
(OLMoE: norm over all heads, Qwen3-MoE: per head; the CPU with the decode path forced, and a compiled, captured
step on a GPU)."""
from __future__ import annotations

import importlib
import os

import pytest
import torch

from moetandem.kernels import qk_rope
from moetandem.kernels.qk_rope import decode_qk_rope_reference, decode_qk_rope_triton
from moetandem.models.cache import write
from moetandem.models.components.norm import RMSNorm
from moetandem.models.components.rope import apply_rope

att = importlib.import_module("moetandem.models.components.attention")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interpret = pytest.mark.skipif(not INTERPRET or qk_rope.triton is None, reason="needs TRITON_INTERPRET=1 and triton")

#: (norm, RMSNorm kind): OLMoE's norm over all heads, Qwen3 / GLM's per head, every kind per head, none (Mixtral)
NORMS = [("none", "cast"), ("full", "cast"), ("head", "cast"), ("head", "offset"), ("head", "fp32"), ("head", "none")]
HEADS = [(4, 4, 16), (8, 2, 32)]  # (nH, nKV, D): MHA, GQA


def problem(nH: int, nKV: int, D: int, norm: str, kind: str, rows: bool, dtype: torch.dtype, device: str = "cpu",
            B: int = 3, S: int = 24, seed: int = 0) -> dict:
    """Sequences at positions 0 (new), S/2 and S-1 (the cache's last) in B + 2 cache rows, random caches, norm
    weights away from one, the cos/sin rows of real RoPE tables at those positions."""
    g = torch.Generator().manual_seed(seed)
    n = {"full": (nH * D, nKV * D), "head": (D, D)}.get(norm)
    norms = None
    if n is not None:
        norms = tuple(RMSNorm(size, 1e-6, kind) for size in n)
        for m in norms:
            if kind != "none":
                m.weight.data = (torch.randn(m.weight.shape, generator=g) * (0.3 if kind == "offset" else 1.0))
    pos = torch.tensor([[0], [S // 2], [S - 1]])[:B]
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    ang = pos[..., None].float() * inv  # [B, 1, D/2]
    cos, sin = (torch.cat([f(ang)] * 2, -1) for f in (torch.cos, torch.sin))  # [B, 1, D]
    p = dict(qkv=torch.randn(B, 1, (nH + 2 * nKV) * D, generator=g) * 2,
             cache=tuple(torch.randn(B + 2, S, nKV, D, generator=g) for _ in range(2)),
             rows=torch.randperm(B + 2, generator=g)[:B] if rows else None, pos=pos, cos=cos, sin=sin)
    p = {k: (tuple(t.to(device, dtype) for t in v) if k == "cache" else v if v is None else
             v.to(device, dtype if v.is_floating_point() else v.dtype)) for k, v in p.items()}
    if norms is not None:
        norms = tuple(m.to(device, dtype) for m in norms)
    return {**p, "norms": norms, "norm": norm, "kind": kind, "nH": nH, "kv_len": S}


def pytorch_path(p: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's ops in Attention.forward's order on p's cache (written in place) -> (q [B, nH, D], lengths)."""
    qkv, kc, nH, norm = p["qkv"], p["cache"][0], p["nH"], p["norm"]
    B, (nKV, D) = qkv.shape[0], kc.shape[2:]
    q, k, v = qkv.split([nH * D, nKV * D, nKV * D], dim=-1)
    if norm == "full":
        q, k = p["norms"][0](q), p["norms"][1](k)
    q, k, v = q.view(B, 1, nH, D), k.view(B, 1, nKV, D), v.view(B, 1, nKV, D)
    if norm == "head":
        q, k = p["norms"][0](q), p["norms"][1](k)
    q = apply_rope(q.transpose(1, 2), p["cos"], p["sin"])  # [B, nH, 1, D]
    k = apply_rope(k.transpose(1, 2), p["cos"], p["sin"]).transpose(1, 2)
    write(p["cache"], (k, v), p["rows"], p["pos"])
    return q[:, :, 0], (p["pos"][:, 0] + 1).clamp(max=p["kv_len"])


def fused(p: dict, fn) -> tuple[torch.Tensor, torch.Tensor]:
    qn, kn = p["norms"] or (None, None)
    return fn(p["qkv"], getattr(qn, "weight", None), getattr(kn, "weight", None), 1e-6, p["norm"], p["kind"],
              p["nH"], p["cos"], p["sin"], *p["cache"], p["rows"], p["pos"], p["kv_len"])


def check(fn, heads: tuple, norm: tuple, rows: bool, dtype: torch.dtype, device: str = "cpu",
          ulps: float = 3) -> None:
    """fn against the model's ops: q, lengths and the two caches; what is not at (rows[b], pos[b]) untouched.
    bf16 / fp16: within `ulps` units of 2^-8 times the head's largest magnitude (eager rounds x·cos and x'·sin
    before adding, the fused path once; the reference measures up to 2 in bf16)."""
    want_p, got_p = (problem(*heads, *norm, rows, dtype, device) for _ in range(2))
    before = tuple(c.clone() for c in got_p["cache"])
    with torch.no_grad():
        want_q, want_len = pytorch_path(want_p)
        got_q, got_len = fused(got_p, fn)
    assert got_q.shape == want_q.shape and got_q.dtype == dtype and torch.equal(got_len, want_len)
    B, S = got_q.shape[0], before[0].shape[1]
    rows_ = torch.arange(B) if got_p["rows"] is None else got_p["rows"].cpu()
    written = torch.zeros(B + 2, S, dtype=torch.bool)
    written[rows_, got_p["pos"][:, 0].cpu()] = True
    tol = 1e-5 if dtype == torch.float32 else ulps * 2.0 ** -8
    for got, want, old in zip((got_q, *got_p["cache"]), (want_q, *want_p["cache"]), (None, *before)):
        scale = want.float().abs().amax(-1, keepdim=True)  # per head (the cache: per head of each position)
        assert ((got.float() - want.float()).abs() <= tol * scale + 1e-6).all(), (got - want).abs().max()
        if old is not None:
            assert torch.equal(got.cpu()[~written], old.cpu()[~written])
            assert not torch.equal(got.cpu()[written], old.cpu()[written])


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_model_ops(heads: tuple, norm: tuple, rows: bool, dtype: torch.dtype) -> None:
    check(decode_qk_rope_reference, heads, norm, rows, dtype)


def test_bad_arguments() -> None:
    p = problem(4, 2, 16, "head", "cast", True, torch.float32)
    with pytest.raises(ValueError):  # 3 query heads do not fill the packed row
        decode_qk_rope_reference(p["qkv"], None, None, 1e-6, "none", "cast", 3, p["cos"], p["sin"], *p["cache"],
                                 p["rows"], p["pos"], 24)
    with pytest.raises(ValueError):  # partial rotary: cos/sin shorter than the head
        decode_qk_rope_reference(p["qkv"], None, None, 1e-6, "none", "cast", 4, p["cos"][..., :8],
                                 p["sin"][..., :8], *p["cache"], p["rows"], p["pos"], 24)
    with pytest.raises(ValueError):
        decode_qk_rope_reference(p["qkv"], None, None, 1e-6, "layer", "cast", 4, p["cos"], p["sin"], *p["cache"],
                                 p["rows"], p["pos"], 24)


@interpret
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_interp_matches_model_ops(heads: tuple, norm: tuple, rows: bool, dtype: torch.dtype) -> None:
    """bf16 with 6 units: the interpreter rounds fp32 -> bf16 toward zero (RTNE on a GPU), at up to 3 points."""
    check(decode_qk_rope_triton, heads, norm, rows, dtype, ulps=6)


def check_against_reference(dtype: torch.dtype, tol: float, device: str = "cpu") -> None:
    """The kernel and the reference round at the same points: each element within tol (relative) of it."""
    for heads in HEADS:
        for norm in NORMS:
            a, b = (problem(*heads, *norm, True, dtype, device) for _ in range(2))
            qa, la = fused(a, decode_qk_rope_triton)
            qb, lb = fused(b, decode_qk_rope_reference)
            assert torch.equal(la, lb)
            for x, y in zip((qa, *a["cache"]), (qb, *b["cache"])):
                scale = y.float().abs().amax(-1, keepdim=True) if dtype != torch.float32 else y.float().abs()
                assert ((x.float() - y.float()).abs() <= tol * scale + 1e-6).all(), (heads, norm, dtype)


@interpret
def test_triton_interp_matches_reference_closely() -> None:
    check_against_reference(torch.float32, 1e-6)


def test_interp_subprocess() -> None:
    """The interpreter tests of this file (the kernel alone and through the models) in a child process with
    TRITON_INTERPRET=1, so a plain CPU `pytest` run checks the kernel."""
    if INTERPRET or qk_rope.triton is None:
        pytest.skip("runs in this process (TRITON_INTERPRET=1) or triton is missing")
    from kernel_checks import run_interpreted
    run_interpreted(__file__, "interp and not subprocess")


# ---- the switch through whole models


def decode_logits(path, monkeypatch: pytest.MonkeyPatch, fused_on: bool, device: str = "cpu",
                  dtype: str = "float32", steps: int = 6) -> tuple[list[torch.Tensor], int]:
    """Prefill 8 tokens (the mask path), then `steps` one-token forwards (the decode path, forced on the CPU):
    each step's logits and how many times the fused prologue ran."""
    import moetandem
    monkeypatch.setattr(att, "QK_ROPE_FUSED", fused_on)
    calls = [0]
    real = att.decode_qk_rope_op

    def counted(*a):
        calls[0] += 1
        return real(*a)
    monkeypatch.setattr(att, "decode_qk_rope_op", counted)
    if device == "cpu":
        monkeypatch.setattr(att, "decode_attention_supported", lambda *a: True)
    eng = moetandem.load(path, device=device, dtype=dtype, progress=False, use_graphs=False, compile="off")
    seq = torch.randint(0, 256, (8 + steps,), generator=torch.Generator().manual_seed(0)).tolist()
    cache = eng.kv_cache(2, 32)
    rows = torch.tensor([1], device=device)  # the sequence in cache row 1: rows are honoured
    out = []
    with torch.no_grad():
        eng.forward(torch.tensor([seq[:8]], device=device), torch.arange(8, device=device)[None], cache, 32,
                    rows=rows)
        for t in range(8, 8 + steps):
            logits = eng.forward(torch.tensor([[seq[t]]], device=device), torch.tensor([[t]], device=device),
                                 cache, 32, rows=rows)
            out.append(logits[0, -1].float().cpu())
    return out, calls[0]


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_interp_switch_keeps_model_logits(family: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OLMoE (q/k norm over all heads; clip_qkv off, as the released model) and Qwen3-MoE (per head, GQA): the
    switch on gives the default's logits (fp32) and runs the fused op once per layer and step. On the CPU the op
    is the PyTorch reference; under the interpreter, the Triton kernel (and the decode-attention kernel)."""
    from conftest import build_checkpoint
    path = build_checkpoint(family, tmp_path / "m", **({"clip_qkv": None} if family == "olmoe" else {}))
    monkeypatch.setenv("MOETANDEM_CACHE_DIR", str(tmp_path / "cache"))
    want, calls_off = decode_logits(path, monkeypatch, False)
    got, calls_on = decode_logits(path, monkeypatch, True)
    assert calls_off == 0 and calls_on == 3 * len(got)  # 3 layers
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_switch_skips_layers_it_cannot_fuse(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OLMoE with clip_qkv (the tiny config's): the switch leaves every layer on the PyTorch ops."""
    from conftest import build_checkpoint
    path = build_checkpoint("olmoe", tmp_path / "m")
    monkeypatch.setenv("MOETANDEM_CACHE_DIR", str(tmp_path / "cache"))
    _, calls = decode_logits(path, monkeypatch, True, steps=2)
    assert calls == 0


# ---- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("heads", HEADS + [(16, 16, 128), (32, 4, 128), (16, 2, 256), (8, 1, 80)])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_gpu(heads: tuple, norm: tuple, dtype: torch.dtype) -> None:
    check(decode_qk_rope_triton, heads, norm, True, dtype, "cuda", ulps=3 if dtype == torch.bfloat16 else 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_gpu_matches_reference_closely() -> None:
    """Same rounding points (RTNE on the GPU): bf16 within 2 units of 2^-8 times the head's magnitude, fp32 close."""
    check_against_reference(torch.bfloat16, 2 * 2.0 ** -8, "cuda")
    check_against_reference(torch.float32, 1e-5, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_compiled_captured_step_matches_default(family: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The switch on: the compiled, captured batch-1 step gives the default step's logits within bf16 rounding (or,
    where rounding flips a router's near tie, the fp32 forward's), its replay runs the fused kernel once per layer,
    and it launches fewer kernels than the default's."""
    from conftest import build_checkpoint
    from kernel_checks import assert_steps_match, captured_decode, eager_decode
    path = build_checkpoint(family, tmp_path / "m", **({"clip_qkv": None} if family == "olmoe" else {}))
    monkeypatch.setenv("MOETANDEM_CACHE_DIR", str(tmp_path / "cache"))
    seq = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(0)).tolist()

    def run(flag: bool) -> tuple[list[torch.Tensor], int, int]:
        monkeypatch.setattr(att, "QK_ROPE_FUSED", flag)
        logits, kernels = captured_decode(path, seq)
        return logits, sum("_qk_rope_kernel" in k for k in kernels), len(kernels)

    want, fused_off, launches_off = run(False)
    got, fused_on, launches_on = run(True)
    assert fused_off == 0 and fused_on == 3, (fused_off, fused_on)
    assert launches_on < launches_off, (launches_on, launches_off)
    assert_steps_match(got, want, eager_decode(path, seq), 1e-2, f"{family}: fused QK RoPE")


def test_compiled_layer_writes_the_cache_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inductor (on the CPU) keeps the op one call on the caches themselves: the compiled layer's output and cache
    writes equal eager's, the code it runs holds the op and no copy of a cache, and flipping the switch retraces."""
    from torch._inductor.utils import run_and_get_code

    from moetandem.models.components import GQASpec
    from test_decode_attention import layer_inputs
    monkeypatch.setattr(att, "decode_attention_supported", lambda *a: True)
    monkeypatch.setattr(att, "QK_ROPE_FUSED", True)
    attn, xs, cache, rows, pos, mask, _ = layer_inputs(GQASpec(8, 2, 16, qk_norm="full"), 3, 24, None, "cpu",
                                                      torch.float32)
    eager_cache = tuple(c.clone() for c in cache)
    torch._dynamo.reset()
    compiled = torch.compile(attn, fullgraph=True, dynamic=False)
    with torch.no_grad():
        want = attn(*xs, eager_cache, rows, pos, mask, 24)
        got, (code,) = run_and_get_code(compiled, *xs, cache, rows, pos, mask, 24)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(cache, eager_cache))
    assert "moetandem.decode_qk_rope" in code and "index_put" not in code
    allocs = [line for line in code.splitlines() if "empty_strided_cpu((" in line or "clone" in line]
    assert not any("(5, 24, 2, 16)" in line for line in allocs), allocs  # no copy of a cache
    monkeypatch.setattr(att, "QK_ROPE_FUSED", False)
    with torch.no_grad():
        _, (code,) = run_and_get_code(compiled, *xs, tuple(c.clone() for c in cache), rows, pos, mask, 24)
    assert "moetandem.decode_qk_rope" not in code and "index_put" in code
