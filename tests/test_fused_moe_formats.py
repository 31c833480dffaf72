"""Quantized experts (int8, fp8, int4, mxfp4; kernels/quant.py) in the fused MoE: the reference against plain
dequantize-then-compute (CPU), the Triton kernels against the reference under Triton's interpreter
(`TRITON_INTERPRET=1` with triton importable; tiny shapes) and on a GPU. Experts live as views of flat byte slot
buffers, as the committee holds them: data and scales of both matrices in one uint8 row per slot."""
from __future__ import annotations

import importlib
import os

import pytest
import torch

from kernel_checks import check_every_candidate, rel_err
from moetandem.kernels import fused_moe, fused_moe_op, fused_moe_reference, fused_moe_supported, quant, tuning
from moetandem.graphs import capture_graph

fm = importlib.import_module("moetandem.kernels.fused_moe")  # the module (the package exports the function)
interpret = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or fm.triton is None,
                               reason="needs TRITON_INTERPRET=1 and an importable triton")
QUANT = ("int8", "fp8", "int4", "mxfp4")
ALIGN = 16  # bytes: every part of a slot starts aligned, so any dtype can view it


def byte_slots(w13: torch.Tensor, w2: torch.Tensor, fmt: str, pin: bool = False, chunk: int = 16):
    """Float experts w13 [n, 2I, H], w2 [n, H, I] -> (buf uint8 [n, bytes], (d13, d2), (s13, s2) | None): the
    quantized data and scales as strided views into one flat byte row per expert, on w13's device (pin: in pinned
    host memory, as the committee maps its host experts). Quantized `chunk` experts at a time."""
    n, views = w13.shape[0], []
    for a in range(0, n, chunk):
        parts = [quant.quantize(w[a:a + chunk], fmt) for w in (w13, w2)]  # [(data, scale)] x 2
        tensors = [t for p in parts for t in p if t is not None]
        if not views:  # lay out the slot: each part ALIGN-aligned
            sizes = [-(-t[0].numel() * t.element_size() // ALIGN) * ALIGN for t in tensors]
            dev = "cpu" if pin else w13.device
            buf = torch.zeros(n, sum(sizes), dtype=torch.uint8, device=dev, pin_memory=pin)  # [n, bytes]
            off = 0
            for t, size in zip(tensors, sizes):
                nbytes = t[0].numel() * t.element_size()
                views.append(buf[:, off:off + nbytes].view(t.dtype).view(n, *t.shape[1:]))  # a strided slot view
                off += size
        for v, t in zip(views, tensors):
            v[a:a + chunk].copy_(t)
    if fmt == "bf16":
        return buf, (views[0], views[1]), None
    return buf, (views[0], views[2]), (views[1], views[3])


def experts(n: int, H: int, I: int, seed: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device).manual_seed(seed)
    return (torch.randn(n, 2 * I, H, generator=g, device=device) * H ** -0.5,
            torch.randn(n, H, I, generator=g, device=device) * I ** -0.5)


def routing(T: int, k: int, E: int, N: int, seed: int, zero_frac: float = 0.2) -> tuple:
    """Distinct experts per token, some weights exactly 0, and a slot table with -1 (non-resident) entries."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])  # [T, k]
    w = torch.rand(T, k, generator=g)  # [T, k]
    w[torch.rand(T, k, generator=g) < zero_frac] = 0
    tab = torch.full((E,), -1, dtype=torch.int32)  # [E]
    tab[torch.randperm(E, generator=g)[:N]] = torch.randperm(N, generator=g).int()
    return ids, w, tab


def dequantized(d: tuple, s: tuple | None, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(quant.dequantize(di, si, fmt) for di, si in zip(d, s or (None, None)))  # type: ignore[return-value]


def poison_idle(ids: torch.Tensor, w: torch.Tensor, tab: torch.Tensor, scales: tuple) -> int:
    """NaN into the scales of every slot only weight-0 assignments route to: reading one would show."""
    slots = tab.long()[ids.long()]
    busy = set(slots[(w != 0) & (slots >= 0)].tolist())
    idle = set(slots[(w == 0) & (slots >= 0)].tolist()) - busy
    for s in idle:
        for sc in scales:
            sc[s] = float("nan")
    return len(idle)


# ---------------------------------------------------------------- reference (CPU)

@pytest.mark.parametrize("fmt", QUANT)
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_reference_is_dequantize_then_compute(fmt: str, k: int) -> None:
    T, E, N, H, I = 6, 11, 7, 64, 96  # odd expert and slot counts
    ids, w, tab = routing(T, k, E, N, seed=k)
    _, d, s = byte_slots(*experts(N, H, I, seed=k), fmt)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(k))  # [T, H]
    want = fused_moe_reference(x, ids, w, *dequantized(d, s, fmt), tab)  # plain fp32 experts
    got = fused_moe_reference(x, ids, w, *d, tab, fmt=fmt, scales=s)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(fused_moe(x, ids, w, *d, tab, fmt=fmt, scales=s), got)  # off CUDA: the reference
    xb = x.bfloat16()  # bf16 activations: GEMMs in bf16 on the dequantized weights
    wb = tuple(t.bfloat16() for t in dequantized(d, s, fmt))
    torch.testing.assert_close(fused_moe_reference(xb, ids, w, *d, tab, fmt=fmt, scales=s),
                               fused_moe_reference(xb, ids, w, *wb, tab), rtol=0, atol=0)


def test_custom_op_carries_the_format() -> None:
    """torch.ops.moetandem.fused_moe takes fmt and the scales as flat arguments (what torch.compile / graphs see)."""
    T, k, E, N, H, I = 4, 2, 6, 4, 64, 64
    ids, w, tab = routing(T, k, E, N, seed=1)
    _, d, s = byte_slots(*experts(N, H, I, seed=1), "int4")
    x = torch.randn(T, H)
    want = fused_moe_reference(x, ids, w, *d, tab, fmt="int4", scales=s)
    got = torch.ops.moetandem.fused_moe(x, ids, w, *d, tab, "silu", None, None, None, None, None, None, 1.702, 7.0,
                                        "int4", *s)
    assert torch.equal(got, want)
    assert torch.equal(fused_moe_op(x, ids, w, *d, tab, fmt="int4", s13=s[0], s2=s[1]), want)
    args = (x, ids, w, *d, tab, "silu", None, None, None, None, None, None, 1.702, 7.0, "int4", *s)
    checks = torch.library.opcheck(fused_moe_op, args)  # schema, fake tensor (torch.compile), registration
    assert all(v == "SUCCESS" for v in checks.values()), checks


def test_bad_format_arguments() -> None:
    x = torch.randn(2, 64)
    ids, w, tab = routing(2, 2, 4, 4, seed=0)
    _, d, s = byte_slots(*experts(4, 64, 32, seed=0), "int4")
    with pytest.raises(ValueError, match="need scales"):
        fused_moe(x, ids, w, *d, tab, fmt="int4")
    with pytest.raises(ValueError, match="scales must be"):
        fused_moe(x, ids, w, *d, tab, fmt="int4", scales=(s[0][:, :, :1].float().repeat(1, 1, 3), s[1]))
    _, d8, s8 = byte_slots(*experts(4, 64, 32, seed=0), "int8")
    with pytest.raises(ValueError, match="must be torch.float8_e4m3fn"):
        fused_moe(x, ids, w, *d8, tab, fmt="fp8", scales=s8)
    with pytest.raises(ValueError, match="disagree"):
        fused_moe(x[:, :32], ids, w, *d, tab, fmt="int4", scales=s)
    with pytest.raises(ValueError, match="host_scales"):
        fused_moe(x, ids, w, *d, tab, host=d, fmt="int4", scales=s)
    from moetandem.errors import InvalidRequestError
    with pytest.raises(InvalidRequestError, match="unknown expert format"):
        fused_moe(x, ids, w, *d, tab, fmt="q4_k", scales=s)


def test_tuning_key_and_support_know_the_format() -> None:
    assert tuning.cache_key("int4", "bfloat16", 64, 2048, 1024, 8, 3, (128, 128)) != \
        tuning.cache_key("mxfp4", "bfloat16", 64, 2048, 1024, 8, 3, (128, 128))
    assert not fused_moe_supported("cpu", torch.uint8, "int4")
    assert not fused_moe_supported("cuda", torch.uint8, "int8")  # not the format's data dtype


# ---------------------------------------------------------------- Triton under the interpreter (tiny)

#: BLOCK_K 64: int4's groups of 64 on w13 (H = 192) and int8's per-channel groups scale whole tiles, mxfp4's 32
#: scale each element; BLOCK_K 128: K = 192 and K = 96 end in a partial tile
CONFIGS = (tuning.KernelConfig(32, 64, 4, 1), tuning.CANDIDATES[2])


def run_plan(x, ids, w, d, tab, fmt, s, act="silu", host=None, bias=None, host_scales=None,
             c: tuning.KernelConfig = CONFIGS[0]) -> torch.Tensor:
    """The three Triton launches of fused_moe on a fixed config (no tuning): what the interpreter runs."""
    p = fm._Plan(x, ids, w, *d, tab, act, 16, host, bias, 1.702, 1.5, fmt, s, host_scales)
    p.up(c)
    p.down(c)
    return p.reduce()


@interpret
@pytest.mark.parametrize("fmt", QUANT + ("bf16",))
@pytest.mark.parametrize("k,c", [(1, 0), (4, 1), (8, 0)])
def test_triton_interpreter_formats(fmt: str, k: int, c: int) -> None:
    T, E, N, H, I = 3, 9, 5, 192, 96
    ids, w, tab = routing(T, k, E, N, seed=k + 10)
    _, d, s = byte_slots(*experts(N, H, I, seed=k), fmt)
    if fmt == "bf16":  # float experts as they are (fp32: the interpreter has no bf16 arithmetic)
        d = experts(N, H, I, seed=k)
    elif fmt != "mxfp4":
        poison_idle(ids, w, tab, s)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(k))  # [T, H]
    ref = fused_moe_reference(x, ids, w, *d, tab, fmt=fmt, scales=s)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(run_plan(x, ids, w, d, tab, fmt, s, c=CONFIGS[c]), ref, rtol=1e-4, atol=1e-4)


@interpret
def test_triton_interpreter_mxfp4_gpt_oss() -> None:
    """gpt-oss: mxfp4 experts, bf16-typed biases, clamped SwiGLU with a binding limit."""
    T, k, E, N, H, I = 4, 4, 7, 5, 64, 64
    ids, w, tab = routing(T, k, E, N, seed=3)
    _, d, s = byte_slots(*experts(N, H, I, seed=3), "mxfp4")
    g = torch.Generator().manual_seed(4)
    bias = (torch.randn(N, 2 * I, generator=g), torch.randn(N, H, generator=g))
    x = torch.randn(T, H, generator=g) * 4  # [T, H]
    ref = fused_moe_reference(x, ids, w, *d, tab, "clamped_swiglu", bias=bias, alpha=1.702, limit=1.5, fmt="mxfp4",
                              scales=s)
    torch.testing.assert_close(run_plan(x, ids, w, d, tab, "mxfp4", s, "clamped_swiglu", bias=bias), ref,
                               rtol=1e-4, atol=1e-4)


@interpret
@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_triton_interpreter_mapped_host_experts(fmt: str) -> None:
    """Misses read from the host copy (slot-table entry N + e), scales included, equal the all-resident result."""
    T, k, E, N, H, I = 4, 2, 7, 3, 64, 64
    ids, w, tab = routing(T, k, E, N, seed=5, zero_frac=0.0)
    full = experts(E, H, I, seed=6)  # every expert, host side
    _, hd, hs = byte_slots(*full, fmt)
    resident = tab.long().argsort()[-N:]  # experts in slots 0..N-1 (tab[e] = slot)
    order = resident[tab.long()[resident].argsort()]
    _, d, s = byte_slots(full[0][order], full[1][order], fmt)
    mapped = torch.where(tab >= 0, tab, N + torch.arange(E)).int()  # [E]
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(7))  # [T, H]
    want = fused_moe_reference(x, ids, w, *hd, None, fmt=fmt, scales=hs)  # all resident
    ref = fused_moe_reference(x, ids, w, *d, mapped, host=hd, fmt=fmt, scales=s, host_scales=hs)
    torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run_plan(x, ids, w, d, mapped, fmt, s, host=hd, host_scales=hs), want,
                               rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
#: (H, I, E, k): Qwen3-30B-A3B, OLMoE-1B-7B; gpt-oss-20b for mxfp4 with biases
GPU_SHAPES = [(2048, 768, 128, 8), (2048, 1024, 64, 8)]


def gpu_case(fmt: str, T: int, H: int, I: int, E: int, k: int, N: int, seed: int = 0) -> tuple:
    """Quantized on the GPU into flat byte slots, bf16 activations; also the fp32 dequantized oracle's weights."""
    if not fused_moe_supported("cuda", quant.data_dtype(fmt), fmt):
        pytest.skip(f"{fmt} needs a newer GPU or Triton")
    ids, w, tab = routing(T, k, E, N, seed)
    _, d, s = byte_slots(*experts(N, H, I, seed, "cuda"), fmt)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.bfloat16)  # [T, H]
    return x, ids.cuda(), w.cuda(), d, s, tab.cuda(), dequantized(d, s, fmt)



@pytest.fixture
def tune_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MOETANDEM_CACHE_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fmt", ("bf16",) + QUANT)
@pytest.mark.parametrize("T", [1, 8, 64])
@pytest.mark.parametrize("H,I,E,k", GPU_SHAPES)
def test_triton_formats_gpu(fmt: str, T: int, H: int, I: int, E: int, k: int, tune_dir, monkeypatch) -> None:
    if T != 1:  # the search runs at T = 1 only (compiling every tile per format is slow); every config has its own test
        monkeypatch.setenv("MOETANDEM_FUSED_MOE_TUNE", "0")
    x, ids, w, d, s, tab, deq = gpu_case(fmt, T, H, I, E, k, N=E * 3 // 4 + 1, seed=T)
    if s is not None and fmt != "mxfp4":
        poison_idle(ids, w, tab, s)
    out = fused_moe(x, ids, w, *d, tab, fmt=fmt, scales=s)  # [T, H]
    ref = fused_moe_reference(x.float(), ids, w, *deq, tab)  # dequantized, fp32
    assert torch.isfinite(out).all() and rel_err(out, ref) < 2e-2, rel_err(out, ref)
    bf = fused_moe_reference(x, ids, w, *(t.bfloat16() for t in deq), tab)  # dequantize, then bf16
    assert rel_err(out, bf) < 2e-2, rel_err(out, bf)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("T", [1, 8])
def test_triton_mxfp4_gpt_oss_gpu(T: int, tune_dir) -> None:
    H, I, E, k = 2880, 2880, 32, 4
    x, ids, w, d, s, tab, deq = gpu_case("mxfp4", T, H, I, E, k, N=20, seed=T)
    g = torch.Generator(device="cuda").manual_seed(T)
    bias = (torch.randn(20, 2 * I, generator=g, device="cuda").bfloat16(),
            torch.randn(20, H, generator=g, device="cuda").bfloat16())
    out = fused_moe(x, ids, w, *d, tab, "clamped_swiglu", bias=bias, fmt="mxfp4", scales=s)
    ref = fused_moe_reference(x.float(), ids, w, *deq, tab, "clamped_swiglu", bias=tuple(b.float() for b in bias))
    assert torch.isfinite(out).all() and rel_err(out, ref) < 2e-2, rel_err(out, ref)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fmt", QUANT)
def test_triton_every_candidate_config_gpu(fmt: str) -> None:
    """Any config the search may pick is right: BLOCK_M 16/32/64 x every tile (tile- and element-scaled)."""
    x, ids, w, d, s, tab, deq = gpu_case(fmt, 40, 2048, 768, 64, 8, N=40)
    ref = fused_moe_reference(x.float(), ids, w, *deq, tab)
    check_every_candidate(lambda bm: fm._Plan(x, ids, w, *d, tab, "silu", bm, fmt=fmt, scales=s), ref, 2e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fmt", QUANT)
def test_triton_zero_copy_host_and_graph_gpu(fmt: str, tune_dir) -> None:
    """Misses read packed from pinned host memory (entry N + e) equal the all-resident result, also replayed in a
    CUDA graph with new routing."""
    T, k, E, N, H, I = 8, 8, 32, 12, 1024, 512
    if not fused_moe_supported("cuda", quant.data_dtype(fmt), fmt):
        pytest.skip(f"{fmt} needs a newer GPU or Triton")
    ids, w, tab = routing(T, k, E, N, seed=2)
    full = experts(E, H, I, seed=3, device="cuda")
    _, hd, hs = byte_slots(*full, fmt, pin=True)  # every expert, pinned host
    _, fd, fs = byte_slots(*full, fmt)  # every expert, device
    order = torch.full((N,), -1, dtype=torch.long)
    order[tab.long()[tab >= 0]] = torch.arange(E)[tab >= 0]  # slot -> expert
    _, d, s = byte_slots(full[0][order.cuda()], full[1][order.cuda()], fmt)
    mapped = torch.where(tab >= 0, tab, N + torch.arange(E)).int().cuda()  # [E]
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids, w = ids.cuda(), w.cuda()

    def call() -> torch.Tensor:
        return fused_moe(x, ids, w, *d, mapped, host=hd, fmt=fmt, scales=s, host_scales=hs)

    assert rel_err(call(), fused_moe(x, ids, w, *fd, fmt=fmt, scales=fs)) < 1e-2
    graph, out = capture_graph(call, None, call)
    for seed in (7, 8):
        ids2, w2_, _ = routing(T, k, E, N, seed)
        ids.copy_(ids2)
        w.copy_(w2_)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, call())
        assert rel_err(out, fused_moe(x, ids, w, *fd, fmt=fmt, scales=fs)) < 1e-2
