"""The one-kernel router (kernels/router.py) and the fused logits + top-k router (kernels/router_logits.py) against
torch, run by Triton's interpreter on the CPU (in this process under TRITON_INTERPRET=1, else in a child process that
sets it), compiled for sm90 without a GPU, and on a GPU when there is one (also inside a CUDA graph)."""
import os
import random

import pytest
import torch
import torch.nn.functional as F

from moetandem.errors import InvalidRequestError
from kernel_checks import run_interpreted
from moetandem.kernels.router import route_topk, route_topk_op, route_topk_reference

CASES = [(3, 64, 8, "softmax_topk", False), (2, 60, 8, "softmax_topk", True), (4, 8, 2, "softmax_topk", True),
         (2, 32, 4, "topk_softmax", False), (1, 512, 10, "softmax_topk", True), (5, 7, 1, "topk_softmax", False)]


def check(device: str, launch) -> None:
    g = torch.Generator().manual_seed(0)
    for T, E, k, rule, renorm in CASES:
        dtype = torch.bfloat16 if E <= 64 else torch.float32  # no ties among a row's largest (their order is free)
        logits = torch.randn(T, E, generator=g).to(device, dtype)
        ids, w = launch(logits, k, rule, renorm)
        rid, rw = route_topk_reference(logits, k, rule, renorm)
        assert ids.dtype == torch.long and w.dtype == torch.float32 and ids.shape == (T, k)
        assert torch.equal(ids.cpu(), rid.cpu()), (T, E, k, rule)
        torch.testing.assert_close(w.cpu(), rw.cpu(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (see below)")
def test_triton_interpreter_kernel_matches_torch() -> None:
    pytest.importorskip("triton")
    check("cpu", route_topk_op)


def test_triton_interpreter_subprocess() -> None:
    """The interpreter test above in a child process, so a plain `pytest` run checks the kernel too."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("runs in this process")
    run_interpreted(__file__, "triton_interpreter and not subprocess")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_matches_torch_on_the_gpu() -> None:
    check("cuda", route_topk)


def test_cpu_path_is_torch_and_bad_input_is_refused() -> None:
    logits = torch.randn(3, 16)
    ids, w = route_topk(logits, 4, "softmax_topk", True)
    assert torch.allclose(w.sum(-1), torch.ones(3))
    with pytest.raises(InvalidRequestError, match="choose one of"):
        route_topk(logits, 4, "sigmoid")
    with pytest.raises(InvalidRequestError, match="top-k must be"):
        route_topk(logits, 17)


# ---- the fused router: logits and top-k in one launch (kernels/router_logits.py)
FUSED_E, FUSED_K, FUSED_T = (32, 64, 128, 256, 60), (1, 2, 4, 6, 8), (1, 3, 8)


def fused_cases() -> list[tuple]:
    """(T, E, H, k, bias, rule, renorm, dtype): each E with three of the k (each k with three E), every T, with and
    without bias, both rules; H not always a multiple of the hidden block."""
    rng = random.Random(1)
    cases = []
    for i in range(15):
        E, k, T = FUSED_E[i % 5], FUSED_K[(i + i // 5) % 5], FUSED_T[i % 3]
        rule = "topk_softmax" if i % 4 == 3 else "softmax_topk"
        cases.append((T, E, rng.choice((64, 200, 512)), k, i % 2 == 0, rule, i % 3 == 1,
                      rng.choice((torch.bfloat16, torch.float32))))
    return cases


def untied(row: torch.Tensor, k: int) -> bool:
    """Whether a row's k+1 largest values are distinct (then the chosen ids are unique, whoever breaks ties)."""
    top = torch.topk(row.float(), min(k + 1, row.numel())).values
    return top.unique().numel() == top.numel()


def check_fused_case(device: str, launch, T: int, E: int, H: int, k: int, bias: bool, rule: str, renorm: bool,
                     dtype: torch.dtype, seed: int = 0, x_pad: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H + x_pad, generator=g).to(device, dtype)[:, :H]  # rows may be strided
    w = (torch.randn(E, H, generator=g) * H ** -0.5).to(device, dtype)
    b = torch.randn(E, generator=g).to(device, dtype) if bias else None
    logits, ids, wts = launch(x, w, b, k, rule, renorm)
    case = (T, E, H, k, bias, rule, renorm, dtype)
    assert logits.shape == (T, E) and logits.dtype == dtype, case
    assert ids.shape == wts.shape == (T, k) and ids.dtype == torch.long and wts.dtype == torch.float32, case
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())  # [T, E]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(logits.float().cpu(), ref.cpu(), **tol)
    rid, rw = route_topk_reference(logits, k, rule, renorm)  # the selection, from the kernel's own logits
    torch.testing.assert_close(wts.cpu(), rw.cpu(), rtol=1e-5, atol=1e-6)
    assert torch.equal(logits.gather(1, ids).cpu(), logits.gather(1, rid).cpu()), case  # the same values chosen
    for t in range(T):
        assert ids[t].unique().numel() == k, case
        if untied(logits[t], k):
            assert torch.equal(ids[t].cpu(), rid[t].cpu()), (case, t)


def check_fused(device: str, launch) -> None:
    from moetandem.kernels.router_logits import counters
    for i, case in enumerate(fused_cases()):
        check_fused_case(device, launch, *case, seed=i, x_pad=8 * (i % 2))
        assert not counters(torch.empty(0, device=device).device).any(), case  # ready for the next call


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (see above)")
def test_triton_interpreter_fused_router_matches_torch() -> None:
    """Random shapes through the op; the arrival counters are back at 0 after each call, so the next is right."""
    pytest.importorskip("triton")
    from moetandem.kernels.router_logits import route_logits_topk_op
    check_fused("cpu", route_logits_topk_op)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (see above)")
def test_triton_interpreter_fused_router_tilings_and_prefill() -> None:
    """The tilings bench/router.py sweeps give the same answer; past FUSED_MAX_TOKENS the op takes two launches;
    the op's fake (torch.compile's view of it) agrees with what it returns."""
    pytest.importorskip("triton")
    from moetandem.kernels.router_logits import FUSED_MAX_TOKENS, default_blocks, launch, route_logits_topk_op
    for bt, be, nw in ((1, 1, 1), (2, 4, 2), (4, 8, 4), (8, 2, 1)):
        blocks = default_blocks(8, 60, 200, block_t=bt, block_e=be, num_warps=nw)
        check_fused_case("cpu", lambda *a: launch(*a, blocks), 8, 60, 200, 6, True, "softmax_topk", True,
                         torch.float32, seed=bt)
    check_fused_case("cpu", route_logits_topk_op, FUSED_MAX_TOKENS + 5, 64, 96, 8, False, "softmax_topk", False,
                     torch.float32)
    x, w, b = torch.randn(3, 64), torch.randn(60, 64), torch.randn(60)
    torch.library.opcheck(route_logits_topk_op, (x, w, b, 4, "softmax_topk", True))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (see above)")
@pytest.mark.parametrize("T", (1, 3, 7))  # 7 > FUSED_UP_TO: F.linear + route_topk, then the cast
def test_triton_interpreter_fused_router_weights_dtype(T: int) -> None:
    """weights_dtype (MOETANDEM_ROUTER_WEIGHTS=kernel): the kernel's store gives the fp32 weights rounded as
    Tensor.to rounds (fp16 here: the interpreter truncates fp32 -> bf16, the GPU rounds to nearest even, see the
    GPU test); logits and ids unchanged; the fake agrees."""
    pytest.importorskip("triton")
    from moetandem.kernels.router_logits import route_logits_topk_op
    g = torch.Generator().manual_seed(T)
    x, w, b = torch.randn(T, 64, generator=g), torch.randn(60, 64, generator=g), torch.randn(60, generator=g)
    want = route_logits_topk_op(x, w, b, 8, "softmax_topk", False)
    for dt in (torch.float16, torch.float32):
        got = route_logits_topk_op(x, w, b, 8, "softmax_topk", False, dt)
        assert got[2].dtype == dt and torch.equal(got[2], want[2].to(dt))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.library.opcheck(route_logits_topk_op, (x, w, b, 4, "softmax_topk", True, torch.float16))


def test_router_weights_switch_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A linear router's route() gives the same weights, in the model's dtype, with the switch on and off."""
    from moetandem.models.components import routers
    r = routers.SoftmaxTopK(norm_topk_prob=False).build(48, 16, 4)
    torch.nn.init.normal_(r.weight)
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(1))
    out = {}
    for on in (False, True):
        monkeypatch.setattr(routers, "ROUTER_WEIGHTS_CAST", on)
        out[on] = r.route(x, torch.bfloat16)
    assert out[True][2].dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(out[True], out[False]))


def test_fused_router_cpu_path_is_unchanged() -> None:
    """On the CPU route_logits_topk is F.linear then route_topk, and a linear router's route() is exactly its
    forward() then select(): the parity tests see what they saw before the fused kernel."""
    from moetandem.kernels.router_logits import route_logits_topk
    from moetandem.models.components.routers import SoftmaxTopK, TopKSoftmax
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(5, 48, generator=g), torch.randn(16, 48, generator=g), torch.randn(16, generator=g)
    logits, ids, wts = route_logits_topk(x, w, b, 4, "softmax_topk", True)
    assert torch.equal(logits, F.linear(x, w, b))
    rid, rw = route_topk(F.linear(x, w, b), 4, "softmax_topk", True)
    assert torch.equal(ids, rid) and torch.equal(wts, rw)
    for spec in (SoftmaxTopK(norm_topk_prob=True), SoftmaxTopK(), TopKSoftmax()):
        r = spec.build(48, 16, 4)
        with torch.no_grad():
            r.weight.copy_(w)
            if r.bias is not None:
                r.bias.copy_(b)
        logits, ids, wts = r.route(x, torch.bfloat16)
        rid, rw = r.select(r(x), torch.bfloat16)
        assert torch.equal(logits, r(x)) and torch.equal(ids, rid) and torch.equal(wts, rw) and wts.dtype == torch.bfloat16
    with pytest.raises(InvalidRequestError, match="top-k must be"):
        route_logits_topk(x, w, None, 17)


def test_fused_router_compiles_for_sm90() -> None:
    """Without a GPU: Triton's NVIDIA passes and ptxas, as a T=1 OLMoE launch would specialize it; the counter is
    an acquire/release atomic at GPU scope and nothing spills."""
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs triton's compiler (not its interpreter)")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from moetandem.kernels import router_logits as rl
    for T, E, bias in ((1, 64, False), (8, 128, True)):
        b = rl.default_blocks(T, E, 2048)
        ce = dict(H=2048, HAS_BIAS=bias, K=8, KP=8, RULE=0, RENORM=False, BLOCK_T=b.block_t, BLOCK_E=b.block_e,
                  BLOCK_H=b.block_h, E_ALL=E)
        types = dict(ids_ptr="*i64", wts_ptr="*fp32", count_ptr="*i32", T="i32", E="i32", s_xt="i32", s_we="i32")
        kern = rl._logits_topk_kernel
        sig = {n: "constexpr" if n in ce else types.get(n, "*bf16") for n in kern.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kern.arg_names) if n not in ce and n != "T"}
        try:
            ck = triton.compile(ASTSource(kern, sig, ce, attrs), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": b.num_warps})
        except (RuntimeError, FileNotFoundError) as e:  # no bundled ptxas on this install
            if "ptxas" in str(e).lower():
                pytest.skip(f"no ptxas: {e}")
            raise
        ptx = ck.asm["ptx"]
        assert ck.asm["cubin"] and "atom.global.gpu.acq_rel.add" in ptx and "atom.global.gpu.acq_rel.exch" in ptx
        assert "ld.global.cg" in ptx and ".local" not in ptx, (T, E)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_router_matches_torch_on_the_gpu() -> None:
    """The same cases on the GPU, then many back-to-back launches of varying T (a block of logits read before its
    writer's release would show as ids that disagree with the kernel's own final logits)."""
    from moetandem.kernels.router_logits import route_logits_topk
    check_fused("cuda", route_logits_topk)
    for i in range(300):
        check_fused_case("cuda", route_logits_topk, 1 + i % 16, (64, 128, 60)[i % 3], 2048, 8, i % 2 == 0,
                         "softmax_topk", i % 5 == 0, torch.bfloat16, seed=100 + i)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_router_in_a_cuda_graph_replayed_with_new_inputs() -> None:
    """16 layers' calls captured in one graph (one shared counter buffer), replayed twice with different x: each
    replay's ids/weights are those of F.linear + route_topk on the same input, and the counters end at 0."""
    from moetandem.kernels.router_logits import FUSED_UP_TO, counters, fused_supported, route_logits_topk
    g = torch.Generator().manual_seed(7)
    for T, E in ((1, 64), (FUSED_UP_TO, 128)):
        ws = [(torch.randn(E, 2048, generator=g) * 2048 ** -0.5).to("cuda", torch.bfloat16) for _ in range(16)]
        x = torch.zeros(T, 2048, device="cuda", dtype=torch.bfloat16)
        assert fused_supported(x, ws[0], None)
        outs: list = []

        def step() -> None:
            outs[:] = [route_logits_topk(x, w, None, 8, "softmax_topk", True) for w in ws]
        step()  # compile and make the counters outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        for _ in range(2):
            x.copy_(torch.randn(T, 2048, generator=g).to("cuda", torch.bfloat16))
            graph.replay()
            torch.cuda.synchronize()
            for w, (logits, ids, wts) in zip(ws, outs):
                ref = F.linear(x, w)  # [T, E]
                torch.testing.assert_close(logits.float(), ref.float(), rtol=1e-2, atol=1e-2)
                rid, rw = route_topk(logits, 8, "softmax_topk", True)  # from the replay's own logits
                assert torch.equal(ids, rid) and torch.allclose(wts, rw, rtol=1e-5, atol=1e-6)
            assert not counters(x.device).any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_linear_router_routes_with_the_fused_op_under_torch_compile() -> None:
    """A model's router (SoftmaxTopKRouter.route) through torch.compile, as the decode step runs it: the op stays one
    opaque call and gives what it gives eagerly."""
    from moetandem.kernels.router_logits import fused_supported
    from moetandem.models.components.routers import SoftmaxTopK
    r = SoftmaxTopK(norm_topk_prob=True).build(2048, 64, 8)
    torch.nn.init.normal_(r.weight, std=2048 ** -0.5)
    r = r.to("cuda", torch.bfloat16)
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        assert fused_supported(x, r.weight, r.bias)
        want = r.route(x, torch.bfloat16)
        got = torch.compile(lambda x: r.route(x, torch.bfloat16), dynamic=False, fullgraph=True)(x)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_router_bf16_weights_round_as_torch_does() -> None:
    """The kernel's fp32 -> bf16 store (weights_dtype) is Tensor.to's round to nearest even, bit for bit."""
    from moetandem.kernels.router_logits import route_logits_topk_op
    g = torch.Generator(device="cuda").manual_seed(0)
    for T in (1, 2, 4):
        x = torch.randn(T, 2048, device="cuda", generator=g, dtype=torch.bfloat16)
        w = torch.randn(64, 2048, device="cuda", generator=g, dtype=torch.bfloat16) * 2048 ** -0.5
        want = route_logits_topk_op(x, w, None, 8, "softmax_topk", False)
        got = route_logits_topk_op(x, w, None, 8, "softmax_topk", False, torch.bfloat16)
        assert torch.equal(got[2], want[2].to(torch.bfloat16)) and torch.equal(got[1], want[1])
