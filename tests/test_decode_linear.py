"""The decode linear (kernels/gemv.py, kernels/linear.py): every Triton GEMV candidate against F.linear in Triton's
interpreter (in this process under TRITON_INTERPRET=1, else in a child process that sets it), compiled for sm90
without a GPU, the op's fake and its tuning rules on the CPU, and on a GPU when there is one (also in a CUDA graph)."""
from __future__ import annotations

import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernel_checks import rel_err, run_interpreted
from moetandem.kernels import gemv as G
from moetandem.kernels import linear as L
from moetandem.kernels import tuning
from moetandem.models.components.linear import DecodeLinear

#: (N, K): tails of N and K that no tile divides, and whole tiles
SHAPES = ((37, 600), (64, 512), (130, 1000), (5, 48))
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def operands(T: int, N: int, K: int, bias: bool, dtype: torch.dtype, device: str = "cpu", seed: int = 0,
             x_pad: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x [T, K] (rows strided by x_pad extra columns), W [N, K], bias [N]: values rounded to bf16 when dtype is
    "bf16 as fp32" (the interpreter has no bf16 arithmetic), in dtype."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K + x_pad, generator=g)[:, :K]
    w = torch.randn(N, K, generator=g) * K ** -0.5
    b = torch.randn(N, generator=g) if bias else None
    return tuple(None if t is None else t.to(device, dtype) for t in (x, w, b))  # type: ignore[return-value]


@pytest.fixture(autouse=True)
def _op_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The op is off by default until measured on a GPU (MOETANDEM_DECODE_LINEAR=1); these tests turn it on."""
    monkeypatch.setattr(L, "ENABLED", True)


@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 (see below)")
def test_triton_interpreter_every_candidate_matches_f_linear() -> None:
    """Each candidate, every T it takes up to 8, shapes with tails, with and without bias, fp32 and bf16 values."""
    pytest.importorskip("triton")
    for i, c in enumerate(G.CANDIDATES):
        for T in (1, 2, 3, 4, 8):
            if not G.fits(c, T):
                continue
            j = i + T
            N, K = SHAPES[j % len(SHAPES)]
            bf16 = j % 3 == 0
            x, w, b = operands(T, N, K, j % 2 == 0, torch.float32, seed=j, x_pad=8 * (j % 2))
            if bf16:
                x, w, b = (None if t is None else t.bfloat16().float() for t in (x, w, b))
            ref = F.linear(x.double(), w.double(), None if b is None else b.double())
            y = G.gemv(x, w, b, c)
            assert y.shape == (T, N) and y.dtype == x.dtype, (c, T)
            torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{c} T={T}: {m}")


@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 (see below)")
def test_triton_interpreter_search_takes_the_fastest_fitting_candidate() -> None:
    """search() times cuBLAS first, then each candidate that fits the T bucket, and keeps the fastest."""
    pytest.importorskip("triton")
    x, w, b = operands(3, 37, 600, True, torch.float32)
    fitting = [c for c in G.CANDIDATES if G.fits(c, 4)]
    assert fitting and len(fitting) < len(G.CANDIDATES)  # T=3 is timed as its bucket, 4: some tiles drop out
    calls = []

    def timer(fn) -> float:
        fn()
        calls.append(1)
        return 0.5 if len(calls) == 3 else 1.0  # the second fitting candidate is the fastest
    assert L.search(x, w, b, timer) == fitting[1] and len(calls) == 1 + len(fitting)
    assert L.search(x, w, b, lambda fn: 1.0) == L.CUBLAS  # ties go to cuBLAS


def test_triton_interpreter_subprocess() -> None:
    """The interpreter tests above in a child process, so a plain `pytest` run checks the kernels too."""
    pytest.importorskip("triton")
    if INTERPRETED:
        pytest.skip("runs in this process")
    run_interpreted(__file__, "triton_interpreter and not subprocess")


def test_cpu_path_is_f_linear_and_the_fake_agrees() -> None:
    """On the CPU decode_linear is F.linear itself and DecodeLinear is nn.Linear (same state dict, same output); the
    op's fake (torch.compile's view of it) agrees with what it returns."""
    for T, bias in ((1, True), (4, False), (300, True)):
        x, w, b = operands(T, 37, 600, bias, torch.float32)
        assert not L.decode_linear_supported(x, w, b)
        assert torch.equal(L.decode_linear(x, w, b), F.linear(x, w, b))
    ref, mod = nn.Linear(48, 20), DecodeLinear(48, 20)
    assert list(mod.state_dict()) == list(ref.state_dict())
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(2, 1, 48)
    assert torch.equal(mod(x), ref(x))
    for bias in (True, False):
        x, w, b = operands(3, 37, 64, bias, torch.float32)
        torch.library.opcheck(L.decode_linear_op, (x, w, b))


def test_tuning_rules(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """pick(): tunes once and keeps the choice (also on disk, under its own directory); while a graph is being
    captured, or with tuning off, cuBLAS without tuning or storing anything."""
    monkeypatch.setenv("MOETANDEM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(L, "CACHE", tuning.ConfigCache("decode_linear", G.GemvConfig.from_json))
    tuned: list[str] = []

    def tune() -> G.GemvConfig:
        tuned.append("x")
        return G.CANDIDATES[3]
    key = L.cache_key(torch.bfloat16, 6144, 2048, False, 3)
    assert key == L.cache_key(torch.bfloat16, 6144, 2048, False, 4) != L.cache_key(torch.bfloat16, 6144, 2048, True, 4)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert L.pick("NVIDIA H200", key, tune) == L.CUBLAS and not tuned and L.CACHE.get("NVIDIA H200", key) is None
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setenv("MOETANDEM_DECODE_LINEAR_TUNE", "0")
    assert L.pick("NVIDIA H200", key, tune) == L.CUBLAS and not tuned
    monkeypatch.delenv("MOETANDEM_DECODE_LINEAR_TUNE")
    assert L.pick("NVIDIA H200", key, tune) == G.CANDIDATES[3] and len(tuned) == 1
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)  # cached: used in a capture too
    assert L.pick("NVIDIA H200", key, tune) == G.CANDIDATES[3] and len(tuned) == 1
    assert (tmp_path / "decode_linear" / "NVIDIA_H200.json").exists()
    assert tuning.ConfigCache("decode_linear", G.GemvConfig.from_json).get("NVIDIA H200", key) == G.CANDIDATES[3]
    assert G.GemvConfig.from_json(L.CUBLAS.to_json()) == L.CUBLAS
    assert not (tmp_path / "fused_moe").exists()  # the fused MoE's cache is its own


def compile_sm90(c: G.GemvConfig, T: int, bias: bool = False):
    """Triton's NVIDIA passes and ptxas, specialized as a bf16 launch would be (unit inner strides, 16-aligned
    pointers and sizes)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    kern = G._gemv_fma_kernel if c.kind == "fma" else G._gemv_dot_kernel
    ce = dict(HAS_BIAS=bias, SPLIT=c.split_k > 1, BLOCK_T=max(16, G.block_t(T)) if c.kind == "dot" else G.block_t(T),
              BLOCK_N=c.block_n, BLOCK_K=c.block_k)
    if c.kind == "dot":
        ce["PRECISION"] = "tf32"
    types = dict(y_ptr="*fp32" if c.split_k > 1 else "*bf16", T="i32", N="i32", K="i32", K_SPLIT="i32", s_xt="i32",
                 s_wn="i32", s_yt="i32", s_yk="i32")
    sig = {n: "constexpr" if n in ce else types.get(n, "*bf16") for n in kern.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kern.arg_names) if n not in ce and n != "T"}
    return triton_mod().compile(ASTSource(kern, sig, ce, attrs), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": c.num_warps, "num_stages": c.num_stages})


def triton_mod():
    return pytest.importorskip("triton")


def test_gemv_candidates_compile_for_sm90() -> None:
    """Every candidate at T = 1 and its largest T: no spills. The fma kernel: 16-byte W loads, the next tile's
    loads before the current tile's FMAs in the loop, and no barrier or shared memory there. The dot kernel: tiles
    arrive by cp.async (pipelined through shared memory) into tensor-core dots."""
    triton_mod()
    if INTERPRETED:
        pytest.skip("needs triton's compiler (not its interpreter)")
    for c in G.CANDIDATES:
        for T in sorted({1, max(t for t in (1, 2, 4, 8, 16) if G.fits(c, t))}):
            try:
                ck = compile_sm90(c, T, bias=T > 1)
            except (RuntimeError, FileNotFoundError) as e:  # no bundled ptxas on this install
                if "ptxas" in str(e).lower():
                    pytest.skip(f"no ptxas: {e}")
                raise
            ptx = ck.asm["ptx"]
            assert ck.asm["cubin"] and ".local" not in ptx, (c, T)
            if c.kind == "dot":
                assert "cp.async" in ptx and "mma" in ptx, (c, T)
                continue
            loop = ptx[ptx.index("Inner Loop Header"):]
            loop = loop[:loop.index("bra")]  # up to the back branch
            first_fma = loop.index("fma.rn.f32")
            assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", loop[:first_fma]), (c, T)
            assert "bar.sync" not in loop and "st.shared" not in loop, (c, T)  # x arrives in W's layout


# ---- on a GPU
REAL = {"olmoe qkv": (6144, 2048), "olmoe o": (2048, 2048), "olmoe lm_head": (50304, 2048),
        "qwen3 qkv": (5120, 2048), "qwen3 o": (2048, 4096), "qwen3 lm_head": (151936, 2048)}
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
def test_every_candidate_matches_f_linear_on_the_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """bf16 on the real projection shapes: each candidate, then the tuned op, within bf16 rounding of F.linear."""
    monkeypatch.setenv("MOETANDEM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(L, "CACHE", tuning.ConfigCache("decode_linear", G.GemvConfig.from_json))
    for name, (N, K) in REAL.items():
        for T in (1, 4, 8):
            x, w, b = operands(T, N, K, name == "olmoe o", torch.bfloat16, "cuda", seed=T)
            ref = F.linear(x, w, b)
            for c in G.CANDIDATES:
                if G.fits(c, T):
                    assert rel_err(G.gemv(x, w, b, c), ref) < 1e-2, (name, T, c)
            assert L.decode_linear_supported(x, w, b)
            assert rel_err(L.decode_linear(x, w, b), ref) < 1e-2, (name, T, L.choice(x, w, b))


@pytest.mark.gpu
@gpu
def test_op_in_a_cuda_graph_replayed_with_new_inputs(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """16 layers' distinct qkv and o weights in one graph: tuned at the warm-up (none during the capture), each
    replay's outputs are F.linear's on the replay's input; a shape first met inside a capture runs cuBLAS, untuned."""
    from moetandem.graphs import capture_graph
    monkeypatch.setenv("MOETANDEM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(L, "CACHE", tuning.ConfigCache("decode_linear", G.GemvConfig.from_json))
    g = torch.Generator().manual_seed(5)
    ws = [((torch.randn(6144, 2048, generator=g) * 2048 ** -0.5).to("cuda", torch.bfloat16),
           (torch.randn(2048, 2048, generator=g) * 2048 ** -0.5).to("cuda", torch.bfloat16)) for _ in range(16)]
    x = torch.zeros(1, 2048, device="cuda", dtype=torch.bfloat16)
    outs: list[torch.Tensor] = []

    def step() -> None:
        outs.clear()
        for wq, wo in ws:
            q = L.decode_linear(x, wq)  # [1, 6144]
            outs.append(q)
            outs.append(L.decode_linear(q[:, :2048], wo))  # [1, 2048]
    graph, _ = capture_graph(step, None, step)
    assert L.CACHE.get(L._gpu_name(torch.cuda.current_device()), L.cache_key(torch.bfloat16, 6144, 2048, False, 1))
    for _ in range(2):
        x.copy_(torch.randn(1, 2048, generator=g).to("cuda", torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        for i, (wq, wo) in enumerate(ws):
            q = F.linear(x, wq)
            assert rel_err(outs[2 * i], q) < 1e-2
            assert rel_err(outs[2 * i + 1], F.linear(outs[2 * i][:, :2048], wo)) < 1e-2
    fresh = (torch.randn(1000, 2048, generator=g) * 2048 ** -0.5).to("cuda", torch.bfloat16)  # never tuned
    out: list[torch.Tensor] = []
    g2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g2):
        out.append(L.decode_linear(x, fresh))
    g2.replay()
    torch.cuda.synchronize()
    assert rel_err(out[0], F.linear(x, fresh)) < 1e-2
    assert L.CACHE.get(L._gpu_name(torch.cuda.current_device()), L.cache_key(torch.bfloat16, 1000, 2048, False, 1)) \
        is None


@pytest.mark.gpu
@gpu
def test_decode_linear_module_under_torch_compile() -> None:
    """DecodeLinear through torch.compile (fullgraph): the op stays one opaque call and gives what it gives eagerly."""
    m = DecodeLinear(2048, 6144, bias=True).to("cuda", torch.bfloat16)
    x = torch.randn(1, 1, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        want = m(x)
        got = torch.compile(m, dynamic=False, fullgraph=True)(x)
    assert got.shape == (1, 1, 6144) and torch.equal(got, want)
    assert rel_err(want, F.linear(x, m.weight, m.bias)) < 1e-2
