"""The fused MoE's per-assignment outputs (`fused_moe_parts`, custom op `moetandem::fused_moe_parts`): [T, k, H]
fp32 with zeros where an assignment has no work, summing to fused_moe's result; and MOETANDEM_MOE_SUM=graph, which
has a compiled decode step sum them itself (experts/executor.py). The reference and the executor's switch on the
CPU; the Triton kernels under the interpreter (here with TRITON_INTERPRET=1, else in a child process); a compiled
decode step on a GPU."""
from __future__ import annotations

import importlib
import os

import pytest
import torch

from moetandem.kernels import (fused_moe_op, fused_moe_parts_op, fused_moe_reference, fused_moe_reference_parts,
                               tuning)
from test_fused_moe_formats import QUANT, byte_slots, experts, routing
from test_fused_moe_miss_format import case

fm = importlib.import_module("moetandem.kernels.fused_moe")
ex = importlib.import_module("moetandem.experts.executor")
interpret = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or fm.triton is None,
                               reason="needs TRITON_INTERPRET=1 and an importable triton")
CONFIG = tuning.KernelConfig(32, 64, 4, 1)


def formatted(fmt: str, N: int, H: int, I: int, seed: int) -> tuple:
    """(w13, w2) and scales of N experts in fmt (float experts as they are for bf16: the interpreter has no bf16)."""
    if fmt == "bf16":
        return experts(N, H, I, seed), None
    _, d, s = byte_slots(*experts(N, H, I, seed), fmt)
    return d, s


def idle(ids: torch.Tensor, w: torch.Tensor, tab: torch.Tensor, n_keys: int) -> torch.Tensor:
    """[T, k] True where an assignment has no work: no slot (or past the keys) or weight 0."""
    s = tab.long()[ids.long()]
    return (s < 0) | (s >= n_keys) | (w == 0)


# ---------------------------------------------------------------- reference and custom op (CPU)

@pytest.mark.parametrize("fmt", ("bf16", "int4"))
def test_reference_parts_are_each_assignment_alone(fmt: str) -> None:
    """Row (t, j) is what the reference gives for that one assignment alone; skipped ones are exactly 0."""
    T, k, E, N, H, I = 3, 4, 9, 5, 64, 32
    ids, w, tab = routing(T, k, E, N, seed=2, zero_frac=0.3)
    d, s = formatted(fmt, N, H, I, seed=2)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(2))
    parts = fused_moe_reference_parts(x, ids, w, *d, tab, fmt=fmt, scales=s)  # [T, k, H]
    assert parts.shape == (T, k, H) and parts.dtype == torch.float32
    skip = idle(ids, w, tab, N)
    assert skip.any() and not skip.all()
    assert torch.equal(parts[skip], torch.zeros_like(parts[skip]))
    for t in range(T):
        for j in range(k):
            one = fused_moe_reference(x[t:t + 1], ids[t:t + 1, j:j + 1], w[t:t + 1, j:j + 1], *d, tab, fmt=fmt,
                                      scales=s)  # [1, H]
            torch.testing.assert_close(parts[t, j], one[0], rtol=1e-5, atol=1e-6)


def test_parts_op_off_cuda_and_its_fake() -> None:
    """The op carries every argument (host experts of another format included) and has a fake of [T, k, H] fp32."""
    c = case("int8", T=2, k=3, E=7, N=3, H=64, I=32, seed=4)
    args = (c["x"], c["ids"], c["w"], *c["d"], c["tab"], "silu", *c["host"], None, None, None, None, 1.702, 7.0,
            "bf16", None, None, *c["hs"], "int8")
    parts = fused_moe_parts_op(*args)
    assert parts.shape == (2, 3, 64) and parts.dtype == torch.float32
    torch.testing.assert_close(parts.sum(1), fused_moe_op(*args), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(parts.sum(1), c["want"], rtol=1e-5, atol=1e-5)
    checks = torch.library.opcheck(fused_moe_parts_op, args)
    assert all(v == "SUCCESS" for v in checks.values()), checks


# ---------------------------------------------------------------- MOETANDEM_MOE_SUM=graph (executor, CPU)

class Recorder:
    """A torch.compile backend that runs the graph as traced and keeps each traced graph's call targets."""

    def __init__(self) -> None:
        self.graphs: list[set[str]] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs.append({str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")})
        return gm.forward


PARTS, FUSED = "moetandem.fused_moe_parts.default", "moetandem.fused_moe.default"


@pytest.mark.parametrize("T", [1, 2, 3])
def test_graph_sum_switch_in_a_traced_step(T: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """With MOE_SUM_GRAPH a traced decode step (T <= DIRECT_MAX_TOKENS) calls the parts op and sums in the graph,
    to the default's result bit for bit; flipping the flag retraces (dynamo guards on it); eager calls and larger T
    keep moetandem::fused_moe."""
    from moetandem.models.expert_activation import SWIGLU
    k, E, N, H, I = 4, 8, 6, 64, 32
    ids, w, tab = routing(T, k, E, N, seed=T, zero_frac=0.3)
    slots = tab[ids.long()]  # [T, k] slot ids, -1 = not resident
    d, s = formatted("int4", N, H, I, seed=3)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).to(torch.bfloat16)

    def step(x: torch.Tensor, slots: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return ex.packed_moe(x, slots, w, *d, None, SWIGLU, None, "int4", s, None) + x

    torch._dynamo.reset()
    rec = Recorder()
    compiled = torch.compile(step, backend=rec, fullgraph=True)
    monkeypatch.setattr(ex, "MOE_SUM_GRAPH", False)
    want = compiled(x, slots, w)
    assert FUSED in rec.graphs[0] and PARTS not in rec.graphs[0]
    monkeypatch.setattr(ex, "MOE_SUM_GRAPH", True)
    assert torch.equal(step(x, slots, w), want)  # eager: the kernel's sum
    got = compiled(x, slots, w)
    assert len(rec.graphs) == 2  # retraced on the flag
    in_graph = T <= fm.DIRECT_MAX_TOKENS
    assert (PARTS in rec.graphs[1]) == in_graph and (FUSED in rec.graphs[1]) != in_graph, rec.graphs[1]
    assert not any("sum" in op for op in rec.graphs[1]), rec.graphs[1]  # adds: no reduction for inductor to keep
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)  # fp32 adds in k's order, one cast
    monkeypatch.setattr(ex, "MOE_SUM_GRAPH", False)
    assert torch.equal(compiled(x, slots, w), want) and len(rec.graphs) == 2  # the first trace again


# ---------------------------------------------------------------- Triton under the interpreter

def plan(x, ids, w, d, tab, fmt="bf16", s=None, direct=True, host=None, host_scales=None, host_fmt=None,
         reverse=False) -> torch.Tensor:
    """Both GEMMs of a plan into a y poisoned with NaN (reverse: the sides' launches in the other order) ->
    y [T, k, H], and the plan's own sum."""
    p = fm._Plan(x, ids, w, *d, tab, "silu", 16, host, None, 1.702, 7.0, fmt, s, host_scales, direct=direct,
                 host_fmt=host_fmt)
    assert (p.al is None) == direct
    p.y.fill_(float("nan"))
    if reverse:
        p.sides.reverse()
    p.up(CONFIG)
    p.down(CONFIG)
    return p.y.view(p.T, p.k, p.H).clone(), p.reduce()


@interpret
@pytest.mark.parametrize("fmt", QUANT + ("bf16",))
@pytest.mark.parametrize("T,k", [(1, 4), (2, 8)])
def test_triton_interpreter_direct_parts(fmt: str, T: int, k: int) -> None:
    """Direct path: every y row is written (NaN poison gone), skipped assignments' rows are exactly 0, and parts
    summed = the plan's sum = the reference."""
    E, N, H, I = 9, 5, 192, 96
    ids, w, tab = routing(T, k, E, N, seed=3 * k + T, zero_frac=0.3)
    d, s = formatted(fmt, N, H, I, seed=k)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))  # [T, H]
    y, out = plan(x, ids, w, d, tab, fmt, s)
    skip = idle(ids, w, tab, N)
    assert skip.any() and not skip.all()
    assert torch.isfinite(y).all() and torch.equal(y[skip], torch.zeros_like(y[skip]))
    ref = fused_moe_reference_parts(x, ids, w, *d, tab, fmt=fmt, scales=s)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.sum(1), out, rtol=1e-6, atol=1e-6)


@interpret
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("reverse", [False, True])
def test_triton_interpreter_direct_parts_two_sides(fmt: str, reverse: bool) -> None:
    """bf16 (fp32) slots and host misses in fmt: two launches per GEMM. Each writes its own side's rows; only an
    assignment no side computes is zeroed, so neither launch, in either order, overwrites the other's rows."""
    c = case(fmt, T=2, k=4, E=9, N=4, H=128, I=64, seed=6)
    y, out = plan(c["x"], c["ids"], c["w"], c["d"], c["tab"], host=c["host"], host_scales=c["hs"], host_fmt=fmt,
                  reverse=reverse)
    keys = c["tab"].long()[c["ids"].long()]  # [T, k]: < N device slot, N + e host expert
    assert ((keys < 4) & (c["w"] != 0)).any() and ((keys >= 4) & (c["w"] != 0)).any()  # both sides have work
    skip = c["w"] == 0  # every expert has a key here: only weight 0 skips
    assert skip.any() and torch.isfinite(y).all() and torch.equal(y[skip], torch.zeros_like(y[skip]))
    want = fused_moe_reference_parts(c["x"], c["ids"], c["w"], *c["d"], c["tab"], host=c["host"],
                                     host_scales=c["hs"], host_fmt=fmt)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, c["want"], rtol=1e-4, atol=1e-4)


@interpret
@pytest.mark.parametrize("T", [1, 2, 5])
def test_triton_interpreter_fused_moe_parts_entry(T: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """fused_moe_parts and fused_moe themselves on the Triton path (support and tuning stubbed: the interpreter
    runs on the CPU): direct at T <= 2; at T = 5 the aligned path, whose skipped rows fused_moe_parts zeroes."""
    class Poisoned(fm._Plan):  # y starts as NaN: every row fused_moe_parts returns was written
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self.y.fill_(float("nan"))

    monkeypatch.setattr(fm, "_Plan", Poisoned)
    monkeypatch.setattr(fm, "fused_moe_supported", lambda *a, **kw: True)
    monkeypatch.setattr(fm, "_config", lambda *a, **kw: tuning.MoEConfig(16, CONFIG, CONFIG))
    monkeypatch.setattr(fm, "fused_moe_reference", None)  # the reference must not run
    monkeypatch.setattr(fm, "fused_moe_reference_parts", None)
    k, E, N, H, I = 4, 9, 5, 128, 64
    ids, w, tab = routing(T, k, E, N, seed=10 + T, zero_frac=0.3)
    d, s = formatted("int8", N, H, I, seed=T)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
    parts = fm.fused_moe_parts(x, ids, w, *d, tab, fmt="int8", scales=s)
    ref = fused_moe_reference_parts(x, ids, w, *d, tab, fmt="int8", scales=s)
    skip = idle(ids, w, tab, N)
    assert parts.shape == (T, k, H) and skip.any() and torch.equal(parts[skip], torch.zeros_like(parts[skip]))
    torch.testing.assert_close(parts, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(parts.sum(1), fm.fused_moe(x, ids, w, *d, tab, fmt="int8", scales=s), rtol=1e-6,
                               atol=1e-6)


def test_interpreter_subprocess() -> None:
    """The interpreter tests above, in a child process with TRITON_INTERPRET=1 (plain CPU pytest runs)."""
    if fm.triton is None or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs triton; already interpreting")
    from kernel_checks import run_interpreted
    run_interpreted(__file__, "triton_interpreter and not subprocess")


# ---------------------------------------------------------------- GPU: a compiled decode step

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_sum_compiled_decode_matches_default(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MOE_SUM_GRAPH on: the compiled, captured batch-1 step gives the default step's logits within bf16 rounding,
    and its replay runs no `_sum_kernel` (the default's runs one per MoE layer). Top-8: above inductor's unrolling
    threshold, where `y.sum(1)` would have stayed a kernel of its own."""
    from conftest import build_checkpoint
    from kernel_checks import captured_decode
    path = build_checkpoint("olmoe", tmp_path / "m", num_experts_per_tok=8)
    monkeypatch.setenv("MOETANDEM_CACHE_DIR", str(tmp_path / "cache"))
    seq = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(0)).tolist()

    def run(flag: bool) -> tuple[list[torch.Tensor], int]:
        monkeypatch.setattr(ex, "MOE_SUM_GRAPH", flag)
        logits, kernels = captured_decode(path, seq)
        return logits, sum("_sum_kernel" in k for k in kernels)

    want, sums_default = run(False)
    got, sums_graph = run(True)
    assert sums_default > 0 and sums_graph == 0, (sums_default, sums_graph)
    for t, (a, b) in enumerate(zip(got, want)):
        err = float((a - b).norm() / b.norm())
        assert err < 1e-2, f"step {t}: relative error {err:.3g}"
