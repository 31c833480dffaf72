"""Fused MoE: the PyTorch reference against a naive per-assignment loop (CPU), the device alignment, the tuning
cache, and the Triton kernels against the reference (GPU, incl. CUDA-graph capture and replay with new ids)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernel_checks import check_every_candidate, rel_err
from moetandem.experts.store import flat_views
from moetandem.kernels import fused_moe, fused_moe_reference, fused_moe_supported
from moetandem.kernels import tuning
from moetandem.kernels.align import align_torch, num_blocks_bound
from moetandem.graphs import capture_graph

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def naive(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
          table: torch.Tensor | None, act: str = "silu") -> torch.Tensor:
    """One assignment at a time, in fp32."""
    T, k = ids.shape
    I = w13.shape[1] // 2
    out = torch.zeros(T, x.shape[1], dtype=torch.float32)  # [T, H]
    for t in range(T):
        for j in range(k):
            s = int(ids[t, j]) if table is None else int(table[ids[t, j]])
            if s < 0 or float(w[t, j]) == 0:
                continue
            gu = w13[s].float() @ x[t].float()  # [2I]
            approx = "tanh" if act == "gelu_tanh" else "none"
            a = F.silu(gu[:I]) if act == "silu" else F.gelu(gu[:I], approximate=approx)
            out[t] += float(w[t, j]) * (w2[s].float() @ (a * gu[I:]))
    return out


def problem(T: int, k: int, E: int, N: int, H: int, I: int, device: str = "cpu", dtype: torch.dtype = torch.float32,
            table: bool = False, zero_frac: float = 0.2, seed: int = 0) -> tuple:
    """Routing with distinct experts per token, some weights exactly 0, weights as views of a flat slot buffer."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)  # [T, H]
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])  # [T, k]
    w = torch.rand(T, k, generator=g)  # [T, k]
    w[torch.rand(T, k, generator=g) < zero_frac] = 0
    tab = None
    if table:
        tab = torch.full((E,), -1, dtype=torch.int32)  # [E]
        tab[torch.randperm(E, generator=g)[:N]] = torch.randperm(N, generator=g).int()
    gd = torch.Generator(device).manual_seed(seed)
    buf = torch.randn(N, 3 * I * H, generator=gd, device=device, dtype=dtype) * H ** -0.5  # [N, 3IH]
    w13, w2 = flat_views(buf, I, H)  # [N, 2I, H] strides (3IH, H, 1); [N, H, I] strides (3IH, I, 1)
    mv = (lambda t: None if t is None else t.to(device))
    return x.to(device, dtype), mv(ids), mv(w), w13, w2, mv(tab), buf


@pytest.mark.parametrize("k", [1, 2, 4, 6, 8])
@pytest.mark.parametrize("E,N,table", [(60, 60, False), (7, 7, False), (60, 23, True), (7, 4, True)])
def test_reference_matches_naive(k: int, E: int, N: int, table: bool) -> None:
    if k > E:
        pytest.skip("k > E")
    x, ids, w, w13, w2, tab, _ = problem(9, k, E, N, 24, 16, table=table, seed=k + E)
    torch.testing.assert_close(fused_moe_reference(x, ids, w, w13, w2, tab), naive(x, ids, w, w13, w2, tab),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_moe(x, ids, w, w13, w2, tab), fused_moe_reference(x, ids, w, w13, w2, tab))


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
def test_reference_gelu(act: str) -> None:
    x, ids, w, w13, w2, tab, _ = problem(5, 3, 11, 6, 16, 8, table=True)
    torch.testing.assert_close(fused_moe_reference(x, ids, w, w13, w2, tab, act), naive(x, ids, w, w13, w2, tab, act),
                               rtol=1e-5, atol=1e-5)


def test_unknown_activation_and_bad_shapes() -> None:
    x, ids, w, w13, w2, tab, _ = problem(2, 2, 4, 4, 8, 4)
    with pytest.raises(NotImplementedError, match="relu"):
        fused_moe(x, ids, w, w13, w2, activation="relu")
    with pytest.raises(ValueError):
        fused_moe(x[:, :4], ids, w, w13, w2)


def poison_skipped(ids: torch.Tensor, w: torch.Tensor, tab: torch.Tensor | None, buf: torch.Tensor) -> int:
    """NaN into every slot that only weight-0 assignments route to: reading any of it would show in the output."""
    slots = ids.long() if tab is None else tab.long()[ids.long()]
    busy = set(slots[(w != 0) & (slots >= 0)].tolist())
    idle = set(slots[(w == 0) & (slots >= 0)].tolist()) - busy
    for s in idle:
        buf[s] = float("nan")
    return len(idle)


def test_reference_reads_nothing_for_skipped() -> None:
    x, ids, w, w13, w2, tab, buf = problem(6, 4, 30, 20, 16, 8, table=True, zero_frac=0.4, seed=3)
    assert poison_skipped(ids, w, tab, buf) > 0
    assert torch.isfinite(fused_moe_reference(x, ids, w, w13, w2, tab)).all()


def test_align_torch_layout() -> None:
    _, ids, w, _, _, tab, _ = problem(40, 6, 60, 25, 8, 8, table=True, seed=5)
    al = align_torch(ids, w, tab, 25, 16)
    assert al.num_blocks == num_blocks_bound(240, 25, 16)
    seen = []
    for b in range(al.num_blocks):
        s, r = int(al.block_slot[b]), int(al.block_rows[b])
        assert (s < 0) == (r == 0)
        for a in al.sorted_ids[b * 16: b * 16 + r].tolist():
            assert int(tab[ids.view(-1)[a]]) == s and float(w.view(-1)[a]) != 0
            seen.append(a)
    busy = [a for a in range(240) if int(tab[ids.view(-1)[a]]) >= 0 and float(w.view(-1)[a]) != 0]
    assert sorted(seen) == busy


def test_tuning_cache_roundtrip(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MOETANDEM_CACHE_DIR", str(tmp_path))
    cfg = tuning.MoEConfig(32, tuning.CANDIDATES[0], tuning.CANDIDATES[2])
    cache = tuning.ConfigCache()
    cache.put("NVIDIA H200", "k1", cfg)
    assert list((tmp_path / "fused_moe").glob("*.json"))
    assert tuning.ConfigCache().get("NVIDIA H200", "k1") == cfg
    assert tuning.t_bucket(1) == 1 and tuning.t_bucket(3) == 4 and tuning.t_bucket(9999) == 4096
    assert tuning.block_m_choices(8, 128) == [16] and tuning.block_m_choices(4096, 64)[-1] == 64


def test_tuning_search_without_memory_to_time_falls_back(tmp_path, monkeypatch) -> None:
    """Under a tight --gpu-memory cap the timer cannot allocate its L2-flush buffer: no config is timed, the search
    answers None (the caller runs the default, kept in memory only); any other failure of every config is an error."""
    monkeypatch.setenv("MOETANDEM_CACHE_DIR", str(tmp_path))
    launched: list[int] = []

    def launch(plan: int, kc: tuning.KernelConfig) -> None:
        launched.append(plan)

    def no_memory(fn) -> float:
        raise torch.OutOfMemoryError("CUDA out of memory")

    def broken(fn) -> float:
        raise ValueError("out of shared memory")

    assert tuning.search([16], lambda bm: bm, launch, launch, no_memory) is None
    with pytest.raises(RuntimeError, match="no kernel configuration ran") as err:
        tuning.search([16], lambda bm: bm, launch, launch, broken)
    assert isinstance(err.value.__cause__, ValueError)
    picked = tuning.search([16, 32], lambda bm: bm, launch, launch, lambda fn: (fn(), 1.0)[1])
    assert picked is not None and picked.block_m == 16 and launched
    cache = tuning.ConfigCache()
    cache.remember("NVIDIA H200", "k", picked)
    assert cache.get("NVIDIA H200", "k") == picked and not list(tmp_path.rglob("*.json"))


def test_supported_on_cpu() -> None:
    assert not fused_moe_supported("cpu", torch.bfloat16)


# ---------------------------------------------------------------- GPU


@pytest.fixture
def tune_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MOETANDEM_CACHE_DIR", str(tmp_path))
    return tmp_path


SHAPES = [(2880, 2880, 32, 4), (2048, 768, 128, 8), (2048, 1408, 60, 4)]  # (H, I, E, k): gpt-oss, Qwen3, Qwen2-MoE


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("T", [1, 3, 8, 64, 256])
@pytest.mark.parametrize("H,I,E,k", SHAPES)
@pytest.mark.parametrize("table", [False, True])
def test_triton_matches_reference(T: int, H: int, I: int, E: int, k: int, table: bool, tune_dir, monkeypatch) -> None:
    pytestmark_gpu()
    if T not in (1, 64):  # the search runs on some buckets; every config's correctness has its own test
        monkeypatch.setenv("MOETANDEM_FUSED_MOE_TUNE", "0")
    N = E // 2 if table else E
    x, ids, w, w13, w2, tab, buf = problem(T, k, E, N, H, I, "cuda", torch.bfloat16, table=table, seed=T + H)
    poison_skipped(ids, w, tab, buf)
    out = fused_moe(x, ids, w, w13, w2, tab)  # [T, H]
    ref = fused_moe_reference(x.float(), ids, w, w13.float(), w2.float(), tab)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1.5e-2, rel_err(out, ref)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype,act", [(torch.float16, "silu"), (torch.float32, "silu"), (torch.bfloat16, "gelu"),
                                       (torch.bfloat16, "gelu_tanh")])
def test_triton_dtypes_and_activations(dtype: torch.dtype, act: str, tune_dir) -> None:
    pytestmark_gpu()
    x, ids, w, w13, w2, tab, _ = problem(17, 4, 20, 12, 256, 192, "cuda", dtype, table=True)
    out = fused_moe(x, ids, w, w13, w2, tab, act)
    ref = fused_moe_reference(x.float(), ids, w, w13.float(), w2.float(), tab, act)
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1.5e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("T", [3, 64])
def test_triton_every_candidate_config(T: int) -> None:
    """Any config the search may pick gives the right answer (BLOCK_M 16/32/64 x every tile)."""
    pytestmark_gpu()
    from moetandem.kernels.fused_moe import _Plan
    x, ids, w, w13, w2, tab, _ = problem(T, 8, 128, 100, 2048, 768, "cuda", torch.bfloat16, table=True)
    ref = fused_moe_reference(x.float(), ids, w, w13.float(), w2.float(), tab)
    check_every_candidate(lambda bm: _Plan(x, ids, w, w13, w2, tab, "silu", bm), ref, 1.5e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("T", [1, 8])
def test_cuda_graph_replay_with_new_ids(T: int, tune_dir) -> None:
    pytestmark_gpu()
    E, N, H, I, k = 64, 40, 2048, 1024, 8
    x, ids, w, w13, w2, tab, _ = problem(T, k, E, N, H, I, "cuda", torch.bfloat16, table=True, seed=1)
    fused_moe(x, ids, w, w13, w2, tab)  # eager first: tunes and compiles outside capture
    g, out = capture_graph(lambda: fused_moe(x, ids, w, w13, w2, tab), None,
                           lambda: fused_moe(x, ids, w, w13, w2, tab))  # out [T, H]: the static output
    for seed in (7, 8):
        gen = torch.Generator().manual_seed(seed)
        x.copy_(torch.randn(T, H, generator=gen))
        ids.copy_(torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]))
        w.copy_(torch.rand(T, k, generator=gen))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, fused_moe(x, ids, w, w13, w2, tab))
        ref = fused_moe_reference(x.float(), ids, w, w13.float(), w2.float(), tab)
        assert rel_err(out, ref) < 1.5e-2


def pytestmark_gpu() -> None:
    if not fused_moe_supported("cuda", torch.bfloat16):
        pytest.skip("needs Triton and sm80+")



def host_problem(T: int, k: int, E: int, N: int, H: int, I: int, device: str, dtype: torch.dtype, seed: int = 3):
    """A slot table where the resident experts use their device slot and every other expert reads its mapped host
    copy (entry N + e): the committee's exact path. Returns the problem and the all-resident equivalent."""
    x, ids, w, w13, w2, tab, buf = problem(T, k, E, N, H, I, device, dtype, table=True, seed=seed)
    full = torch.empty(E, 3 * I * H, dtype=dtype)  # every expert, in host memory
    g = torch.Generator().manual_seed(seed + 1)
    full.copy_(torch.randn(E, 3 * I * H, generator=g) * H ** -0.5)
    cpu_tab = tab.cpu().long()
    for e in range(E):  # the resident ones hold the same bytes as their host copy
        if cpu_tab[e] >= 0:
            buf[cpu_tab[e]].copy_(full[e])
    if device == "cuda":
        full = full.pin_memory()
    mapped = torch.where(cpu_tab >= 0, cpu_tab, N + torch.arange(E)).int().to(device)  # [E]
    hw13, hw2 = flat_views(full, I, H)
    return x, ids, w, w13, w2, mapped, (hw13, hw2), full


def test_reference_reads_misses_from_host() -> None:
    x, ids, w, w13, w2, mapped, host, full = host_problem(5, 4, 12, 5, 16, 8, "cpu", torch.float32)
    fw13, fw2 = flat_views(full, 8, 16)
    want = naive(x, ids, w, fw13, fw2, None)  # every expert resident
    assert torch.allclose(fused_moe_reference(x, ids, w, w13, w2, mapped, host=host), want, atol=1e-5)
    assert torch.allclose(fused_moe(x, ids, w, w13, w2, mapped, host=host), want, atol=1e-5)
    with pytest.raises(ValueError, match="host weights"):
        fused_moe_reference(x, ids, w, w13, w2, mapped, host=(host[0][:, :, :8], host[1]))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("T", [1, 8])
def test_triton_zero_copy_host_experts(T: int, tune_dir) -> None:
    """Misses read from pinned host memory inside the kernel equal the all-resident result, also in a graph."""
    pytestmark_gpu()
    E, N, H, I, k = 64, 24, 2048, 1024, 8
    x, ids, w, w13, w2, mapped, host, full = host_problem(T, k, E, N, H, I, "cuda", torch.bfloat16)
    fw13, fw2 = flat_views(full.cuda(), I, H)
    want = fused_moe(x, ids, w, fw13, fw2)  # all resident
    got = fused_moe(x, ids, w, w13, w2, mapped, host=host)
    assert rel_err(got, want) < 1e-2
    def call() -> torch.Tensor:
        return fused_moe(x, ids, w, w13, w2, mapped, host=host)
    g, out = capture_graph(call, None, call)
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(out, want) < 1e-2
