"""The direct path's GEMV kernels (kernels/fused_moe_gemv.py, MOETANDEM_MOE_GEMV=1): with the switch on, dense
experts at T <= DIRECT_MAX_TOKENS give what the reference and the tl.dot direct path give (activations, biases, slot
tables with misses and zero weights, mapped host experts, per-assignment parts), every GEMV tuning candidate included,
and never launch the tl.dot kernels; the switch and its tuning keys (CPU); the kernels compile for sm90 without
tensor-core dots (CPU, ptxas); the same on a GPU. Interpreter tests: here with TRITON_INTERPRET=1, else in a child."""
from __future__ import annotations

import importlib
import os
import re

import pytest
import torch

from kernel_checks import rel_err
from moetandem.kernels import fused_moe_reference, fused_moe_reference_parts, fused_moe_supported, tuning
from test_fused_moe_formats import byte_slots, experts, routing
from test_fused_moe_parts import idle

fm = importlib.import_module("moetandem.kernels.fused_moe")
interpret = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or fm.triton is None,
                               reason="needs TRITON_INTERPRET=1 and an importable triton")
DOT = tuning.KernelConfig(32, 64, 4, 1)
GEMV = tuning.KernelConfig(16, 64, 2, 1)  # a small BLOCK_K: several K tiles at the test shapes


def plan(x, ids, w, d, tab, gemv: bool, c: tuning.KernelConfig, act: str = "silu", host=None, bias=None,
         limit: float = 1.5, fmt: str = "bf16", s=None):
    """(y [T, k, H] after both GEMMs (NaN-poisoned first: every row must be written), the sum [T, H])."""
    p = fm._Plan(x, ids, w, *d, tab, act, 16, host, bias, 1.702, limit, fmt, s, gemv=gemv)
    assert p.direct and p.gemv == (gemv and fmt == "bf16")
    p.y.fill_(float("nan"))
    p.up(c)
    p.down(c)
    return p.y.view(p.T, p.k, p.H).clone(), p.reduce()


@pytest.fixture
def no_dot(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tl.dot GEMM kernels must not run (the GEMV path replaces both)."""
    class Refuse:
        def __getitem__(self, grid: object) -> None:
            raise AssertionError("a tl.dot kernel was launched on the GEMV path")
    monkeypatch.setattr(fm, "_gate_up_kernel", Refuse())
    monkeypatch.setattr(fm, "_down_kernel", Refuse())


# ---------------------------------------------------------------- the switch and its tuning keys (CPU)

def test_switch_reads_the_environment_once_and_applies_to_dense_direct_plans_only() -> None:
    assert fm.GEMV_DIRECT is (os.environ.get("MOETANDEM_MOE_GEMV", "").strip().lower() in ("1", "on"))
    x = torch.zeros(fm.DIRECT_MAX_TOKENS + 1, 64)
    ids, w, tab = routing(x.shape[0], 2, 6, 4, seed=0)
    d = experts(4, 64, 32, seed=0)
    assert fm._Plan(x[:1], ids[:1], w[:1], *d, tab, "silu", 16, gemv=True).gemv
    assert not fm._Plan(x[:1], ids[:1], w[:1], *d, tab, "silu", 16, gemv=False).gemv
    assert not fm._Plan(x, ids, w, *d, tab, "silu", 16, gemv=True).gemv  # aligned path: tl.dot
    _, q, s = byte_slots(*d, "int8")
    assert not fm._Plan(x[:1], ids[:1], w[:1], *q, tab, "silu", 16, fmt="int8", scales=s, gemv=True).gemv


@pytest.mark.parametrize("on", [False, True])
@pytest.mark.parametrize("T,fmt", [(1, "bf16"), (2, "bf16"), (3, "bf16"), (1, "int8")])
def test_gemv_tuning_key_and_default(on: bool, T: int, fmt: str, tmp_path, monkeypatch) -> None:
    """",gemv" keys (never mixing with the tl.dot entries) exactly where the GEMV kernels run; with tuning off (as
    while capturing) their default config, else the tl.dot default."""
    monkeypatch.setattr(fm, "GEMV_DIRECT", on)
    monkeypatch.setattr(fm, "_gpu_name", lambda index: "test-gpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setenv("MOETANDEM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("MOETANDEM_FUSED_MOE_TUNE", "0")
    keys: list[str] = []
    monkeypatch.setattr(tuning.CACHE, "get", lambda gpu, key: keys.append(key))
    x = torch.zeros(T, 64)
    ids, w, _ = routing(T, 2, 6, 6, seed=0)
    d = experts(6, 64, 32, seed=0)
    cfg = fm._config(x, ids, *d[:1], None, fmt, None, lambda bm: None)
    gemv = on and T <= fm.DIRECT_MAX_TOKENS and fmt == "bf16"
    assert keys[0].endswith(",gemv") == gemv and (",direct" in keys[0]) == (T <= fm.DIRECT_MAX_TOKENS)
    assert (cfg.up == cfg.down == tuning.GEMV_DEFAULT) == gemv


def test_gemv_candidates_are_their_own() -> None:
    """Distinct, valid tiles (powers of two; block_k 0 = whole K), the default among them, acc2d only here."""
    c = tuning.GEMV_CANDIDATES
    assert len(set(c)) == len(c) and tuning.GEMV_DEFAULT in c
    assert all(k.block_n & (k.block_n - 1) == 0 and (k.block_k == 0 or k.block_k >= 128) for k in c)
    assert {k.num_stages for k in c} >= {1, 2} and any(k.acc2d for k in c) and any(k.block_k == 0 for k in c)
    assert not any(k.acc2d for k in tuning.CANDIDATES)
    assert tuning.MoEConfig.from_json(tuning.MoEConfig(16, c[-1], c[0]).to_json()) == tuning.MoEConfig(16, c[-1],
                                                                                                       c[0])


# ---------------------------------------------------------------- Triton interpreter

CASES = [  # E (odd counts), N slots, H, I, T, k, activation, biases
    (9, 5, 192, 96, 1, 8, "silu", False),
    (7, 7, 96, 40, 2, 2, "gelu_tanh", False),
    (5, 3, 80, 24, 2, 1, "clamped_swiglu", True),
    (13, 6, 128, 64, 1, 2, "gelu", True),
    (11, 4, 160, 48, 2, 8, "silu", True),
]


@interpret
@pytest.mark.parametrize("E,N,H,I,T,k,act,has_bias", CASES)
def test_triton_interpreter_gemv_equals_reference(E, N, H, I, T, k, act, has_bias, no_dot) -> None:
    ids, w, tab = routing(T, k, E, N, seed=E + T * k, zero_frac=0.3)
    g = torch.Generator().manual_seed(E)
    d = experts(N, H, I, seed=E)
    bias = (torch.randn(N, 2 * I, generator=g), torch.randn(N, H, generator=g)) if has_bias else None
    x = torch.randn(T, H, generator=g) * (4 if act == "clamped_swiglu" else 1)
    y, out = plan(x, ids, w, d, tab, True, GEMV, act, bias=bias)
    skip = idle(ids, w, tab, N)
    assert torch.isfinite(y).all() and torch.equal(y[skip], torch.zeros_like(y[skip]))
    ref = fused_moe_reference_parts(x, ids, w, *d, tab, act, None, bias, 1.702, 1.5)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, fused_moe_reference(x, ids, w, *d, tab, act, None, bias, 1.702, 1.5),
                               rtol=1e-4, atol=1e-4)


@interpret
@pytest.mark.parametrize("E,N,H,I,T,k,act,has_bias", CASES[:3])
def test_triton_interpreter_gemv_equals_the_dot_path(E, N, H, I, T, k, act, has_bias) -> None:
    """Same inputs, same y within fp32 accumulation order (the tl.dot kernels' tiles sum K in another order)."""
    ids, w, tab = routing(T, k, E, N, seed=E + T * k, zero_frac=0.3)
    g = torch.Generator().manual_seed(E)
    d = experts(N, H, I, seed=E)
    bias = (torch.randn(N, 2 * I, generator=g), torch.randn(N, H, generator=g)) if has_bias else None
    x = torch.randn(T, H, generator=g)
    y_gemv, out_gemv = plan(x, ids, w, d, tab, True, GEMV, act, bias=bias)
    y_dot, out_dot = plan(x, ids, w, d, tab, False, DOT, act, bias=bias)
    torch.testing.assert_close(y_gemv, y_dot, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_gemv, out_dot, rtol=1e-5, atol=1e-5)


@interpret
def test_triton_interpreter_gemv_every_candidate(no_dot) -> None:
    """Each tile the search may pick (unrolled or looped K, whole-K tiles, acc2d) gives the reference, with I and H
    not multiples of the tiles."""
    T, k, E, N, H, I = 2, 2, 7, 4, 144, 40
    ids, w, tab = routing(T, k, E, N, seed=1, zero_frac=0.0)
    d = experts(N, H, I, seed=1)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(1))
    ref = fused_moe_reference(x, ids, w, *d, tab)
    for c in tuning.GEMV_CANDIDATES:
        torch.testing.assert_close(plan(x, ids, w, d, tab, True, c)[1], ref, rtol=1e-4, atol=1e-4, msg=str(c))


@interpret
@pytest.mark.parametrize("T", [1, 2])
def test_triton_interpreter_gemv_mapped_host_experts(T: int, no_dot) -> None:
    """gpt-oss-like: clamped SwiGLU with biases; slot-table entries N + e read expert e of the mapped host copy
    (the NS split), a few entries -1 and weights 0."""
    k, E, N, H, I = 4, 9, 3, 64, 48
    ids, w, tab = routing(T, k, E, N, seed=5 + T, zero_frac=0.25)
    g = torch.Generator().manual_seed(6)
    w13, w2 = experts(N, H, I, seed=6)
    host = (*experts(E, H, I, seed=7), torch.randn(E, 2 * I, generator=g), torch.randn(E, H, generator=g))
    bias = (torch.randn(N, 2 * I, generator=g), torch.randn(N, H, generator=g))
    mapped = torch.where(tab >= 0, tab, N + torch.arange(E)).int()  # [E]
    mapped[ids[0, 0]] = -1  # one miss nobody maps; one device slot, one host expert, both weighted
    mapped[ids[0, 1]], mapped[ids[0, 2]], w[0, 1:3] = 0, N + int(ids[0, 2]), 0.5
    keys = mapped.long()[ids]
    assert ((keys >= N) & (w != 0)).any() and ((keys >= 0) & (keys < N) & (w != 0)).any()
    x = torch.randn(T, H, generator=g) * 4
    y, out = plan(x, ids, w, (w13, w2), mapped, True, GEMV, "clamped_swiglu", host, bias)
    ref = fused_moe_reference_parts(x, ids, w, w13, w2, mapped, "clamped_swiglu", host, bias, 1.702, 1.5)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(y[0, 0], torch.zeros_like(y[0, 0]))
    torch.testing.assert_close(out, ref.sum(1), rtol=1e-5, atol=1e-5)


@interpret
@pytest.mark.parametrize("reverse", [False, True])
def test_triton_interpreter_gemv_key_ranges(reverse: bool, no_dot) -> None:
    """One side split in two launches over keys [0, NS) and [NS, N), in either order: each writes only its own
    assignments' rows, the idle ones are zeroed by the LO == 0 launch alone, the result is the one-launch one."""
    import dataclasses
    T, k, E, N, H, I = 2, 4, 9, 4, 64, 32
    ids, w, tab = routing(T, k, E, N, seed=8, zero_frac=0.25)
    mapped = torch.where(tab >= 0, tab, N + torch.arange(E)).int()
    mapped[ids[1, 0]] = -1
    d, host = experts(N, H, I, seed=8), experts(E, H, I, seed=9)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(8))
    p = fm._Plan(x, ids, w, *d, mapped, "silu", 16, host, gemv=True)
    (sd,) = p.sides
    p.sides = [dataclasses.replace(sd, hi=N), dataclasses.replace(sd, lo=N)][::-1 if reverse else 1]
    p.y.fill_(float("nan"))
    p.up(GEMV)
    p.down(GEMV)
    y = p.y.view(T, k, H)
    ref = fused_moe_reference_parts(x, ids, w, *d, mapped, host=host)
    assert torch.isfinite(y).all() and torch.equal(y[1, 0], torch.zeros_like(y[1, 0]))
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


@interpret
@pytest.mark.parametrize("T", [1, 2])
def test_triton_interpreter_gemv_fused_moe_parts_entry(T: int, no_dot, monkeypatch: pytest.MonkeyPatch) -> None:
    """fused_moe_parts and fused_moe with GEMV_DIRECT on (support and tuning stubbed: the interpreter runs on the
    CPU): the GEMV default config, every row written, the reference's parts."""
    monkeypatch.setattr(fm, "GEMV_DIRECT", True)
    monkeypatch.setattr(fm, "fused_moe_supported", lambda *a, **kw: True)
    monkeypatch.setattr(fm, "_config", lambda *a, **kw: tuning.default_config(0, 0, gemv=True))
    monkeypatch.setattr(fm, "fused_moe_reference", None)  # the reference must not run
    monkeypatch.setattr(fm, "fused_moe_reference_parts", None)
    k, E, N, H, I = 8, 11, 6, 128, 64
    ids, w, tab = routing(T, k, E, N, seed=20 + T, zero_frac=0.3)
    d = experts(N, H, I, seed=T)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
    parts = fm.fused_moe_parts(x, ids, w, *d, tab, "gelu_tanh")
    ref = fused_moe_reference_parts(x, ids, w, *d, tab, "gelu_tanh")
    skip = idle(ids, w, tab, N)
    assert parts.shape == (T, k, H) and skip.any() and torch.equal(parts[skip], torch.zeros_like(parts[skip]))
    torch.testing.assert_close(parts, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(parts.sum(1), fm.fused_moe(x, ids, w, *d, tab, "gelu_tanh"), rtol=1e-6, atol=1e-6)


def test_interpreter_subprocess() -> None:
    """The interpreter tests above, in a child process with TRITON_INTERPRET=1 (plain CPU pytest runs)."""
    if fm.triton is None or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs triton; already interpreting")
    from kernel_checks import run_interpreted
    run_interpreted(__file__, "triton_interpreter and not subprocess")


# ---------------------------------------------------------------- sm90 compile (CPU) and the GPU

@pytest.mark.parametrize("c", [tuning.GEMV_DEFAULT, tuning.KernelConfig(8, 0, 4, 1),
                               tuning.KernelConfig(16, 256, 4, 1, True), tuning.KernelConfig(16, 128, 4, 3)])
def test_gemv_kernels_compile_for_sm90(c: tuning.KernelConfig) -> None:
    """At the OLMoE shape (K = H 2048 for gate+up, I 1024 for down): no tensor-core dot, no async copies into shared
    memory, 16-byte weight loads; where warps split N only (not K), one barrier in all (the epilogue's), not one per
    K tile (the activation row is loaded in the weight tile's layout, never converted through shared memory)."""
    if fm.triton is None or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs triton's compiler (not its interpreter)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    g = importlib.import_module("moetandem.kernels.fused_moe_gemv")
    types = {"x_ptr": "*bf16", "w_ptr": "*bf16", "hw_ptr": "*bf16", "b_ptr": "*bf16", "hb_ptr": "*bf16",
             "h_ptr": "*bf16", "y_ptr": "*fp32", "rw_ptr": "*fp32", "ids_ptr": "*i64", "table_ptr": "*i32",
             "alpha": "fp32", "limit": "fp32"}
    for kernel, K in ((g._gate_up_gemv_kernel, 2048), (g._down_gemv_kernel, 1024)):
        ce = {"K": K, "HAS_BIAS": False, "HAS_TABLE": True, "UNROLL": c.num_stages == 1, "ACC2D": c.acc2d,
              "BLOCK_N": c.block_n, "BLOCK_K": g.block_k(c, K), "sw_k": 1, "ACT": 0, "sx_k": 1}
        ce = {n: v for n, v in ce.items() if n in kernel.arg_names}
        sig = {n: "constexpr" if n in ce else types.get(n, "i32") for n in kernel.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
                 if n not in ce and n not in ("alpha", "limit", "TOP_K", "NS", "LO", "HI")}
        try:
            ck = triton.compile(ASTSource(kernel, sig, ce, attrs), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": c.num_warps, "num_stages": c.num_stages})
        except (RuntimeError, FileNotFoundError) as e:  # no bundled ptxas on this install
            if "ptxas" in str(e).lower():
                pytest.skip(f"no ptxas: {e}")
            raise
        ptx = ck.asm["ptx"]
        assert ck.asm["cubin"] and "mma" not in ptx and "cp.async" not in ptx, (kernel, c)
        assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", ptx), (kernel, c)
        if c.block_k and c.block_k <= 256:  # 8 bf16 a thread, 32 threads a warp: a warp's K span
            assert ptx.count("bar.sync") <= 1, (kernel, c)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T", [1, 2])
def test_gemv_equals_dot_on_the_gpu(T: int, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 at the OLMoE / Qwen3 / an odd layer shape: the GEMV direct path (every candidate at one shape; fused_moe
    with the switch on and its own tuning) against the tl.dot direct path and the fp32 reference."""
    if not fused_moe_supported("cuda", torch.bfloat16):
        pytest.skip("needs Triton and sm80+")
    monkeypatch.setenv("MOETANDEM_CACHE_DIR", str(tmp_path))
    for E, N, H, I, k in ((64, 40, 2048, 1024, 8), (128, 100, 2048, 768, 8), (61, 33, 1024, 520, 2)):
        ids, w, tab = (t.cuda() for t in routing(T, k, E, N, seed=E + T))
        w13, w2 = (t.cuda().bfloat16() for t in experts(N, H, I, seed=T))
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        ref = fused_moe_reference(x.float(), ids, w, w13.float(), w2.float(), tab)
        _, dot = plan(x, ids, w, (w13, w2), tab, False, tuning.CANDIDATES[1])
        if E == 64:
            for c in tuning.GEMV_CANDIDATES:
                y, out = plan(x, ids, w, (w13, w2), tab, True, c)
                assert rel_err(out, ref) < 1.5e-2 and rel_err(out, dot) < 1e-2, c
        for on in (False, True):
            monkeypatch.setattr(fm, "GEMV_DIRECT", on)
            assert rel_err(fm.fused_moe(x, ids, w, w13, w2, tab), ref) < 1.5e-2
            assert rel_err(fm.fused_moe_parts(x, ids, w, w13, w2, tab).sum(1), ref) < 1.5e-2


# ---------------------------------------------------------------- bench/fused_moe.py --gemv (CPU side)

def test_bench_gemv_columns_and_switch() -> None:
    """The bench parses --gemv, prints the GEMV columns ('-' where the direct path does not run) and sets the
    switch only within its block."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    b = importlib.import_module("bench.fused_moe")
    r = subprocess.run([sys.executable, str(root / "bench" / "fused_moe.py"), "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--gemv" in r.stdout, r.stderr[-2000:]
    hdr = b.table_header(True).splitlines()
    assert hdr[0].count("|") - 1 == hdr[1].count("---") == 14 and "gemv µs" in hdr[0]
    row = dict(T=4, slots="64/64", grouped_us=100.0, fused_us=50.0, expert_mb=100.0, grouped_gbs=1000.0,
               fused_gbs=2000.0, fused_pct=41.7, speedup=2.0, rel_err={}, first_call_s=1.0)
    assert b.table_row("olmoe-1b-7b", row, True).split("<!--")[0].count("|") - 1 == 14
    row.update(T=1, gemv_us=40.0, gemv_gbs=2500.0, gemv_pct=52.1, gemv_speedup=1.25)
    assert "| 40.0 | 2500 | 52% | 1.25x |" in b.table_row("olmoe-1b-7b", row, True)
    assert "40.0" not in b.table_row("olmoe-1b-7b", row, False)
    before = fm.GEMV_DIRECT
    with b.gemv_direct(not before):
        assert fm.GEMV_DIRECT is (not before)
    with b.gemv_direct(None):
        assert fm.GEMV_DIRECT is before
    assert fm.GEMV_DIRECT is before
