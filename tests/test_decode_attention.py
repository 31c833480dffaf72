"""The decode-attention kernel (moetandem/kernels/decode_attention.py): its PyTorch reference against SDPA with the
equivalent mask (CPU); the Triton kernels against the reference under Triton's interpreter on the CPU (directly
with TRITON_INTERPRET=1, else in a subprocess that sets it) and on a GPU; the model's decode path (write + kernel)
against its mask + SDPA path, on the CPU (the reference behind the op) and on a GPU (graphs, torch.compile)."""
from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from moetandem.kernels.decode_attention import (decode_attention, decode_attention_reference,
                                                decode_attention_supported, decode_attention_triton)
from moetandem.models.components import GemmaAttentionSpec, GQASpec
from kernel_checks import run_interpreted
from moetandem.graphs import capture_graph

da = importlib.import_module("moetandem.kernels.decode_attention")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interpret = pytest.mark.skipif(not INTERPRET or da.triton is None, reason="needs TRITON_INTERPRET=1 and triton")

#: (B, nH, nKV, D, S, window, sinks): GQA ratios 1/4/8, windows, sinks, lengths of 1 and off the block size
CASES = [(1, 2, 2, 64, 5, None, False), (3, 4, 1, 64, 37, None, False), (2, 8, 2, 128, 50, None, True),
         (3, 8, 1, 64, 70, 20, False), (2, 4, 4, 128, 33, 7, True), (3, 16, 2, 64, 45, None, False)]


def problem(B: int, nH: int, nKV: int, D: int, S: int, sinks: bool, device: str = "cpu",
            dtype: torch.dtype = torch.float32, seed: int = 0, first_len_one: bool = True) -> tuple:
    """Caches of B + 2 rows (sequences in a shuffled subset of them), lengths in [1, S] with the first 1."""
    g = torch.Generator().manual_seed(seed)
    R = B + 2
    q = torch.randn(B, nH, D, generator=g)
    k, v = torch.randn(R, S, nKV, D, generator=g), torch.randn(R, S, nKV, D, generator=g)
    rows = torch.randperm(R, generator=g)[:B]
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    if first_len_one:
        lengths[0] = 1
    s = torch.randn(nH, generator=g) * 2 if sinks else None
    to = (lambda t: None if t is None else t.to(device, dtype))
    return to(q), to(k), to(v), rows.to(device), lengths.to(device), to(s)


def sdpa_oracle(q, k, v, rows, lengths, window, sinks) -> torch.Tensor:
    """SDPA over the gathered rows with the causal/window mask forward_layers builds; sinks as an extra key of
    zeros whose additive mask is the sink logit (as Attention._with_sinks)."""
    B, nH, D = q.shape
    S, nKV = k.shape[1], k.shape[2]
    keys, values = k[rows].transpose(1, 2).float(), v[rows].transpose(1, 2).float()  # [B, nKV, S, D]
    pos = (lengths - 1)[:, None]  # [B, 1]
    kpos = torch.arange(S)
    mask = kpos[None, None] <= pos[:, :, None]  # [B, 1, S]
    if window:
        mask &= kpos[None, None] > pos[:, :, None] - window
    bias = torch.zeros(B, 1, 1, S).masked_fill(~mask[:, None], float("-inf"))  # [B, 1, 1, S]
    if sinks is not None:
        pad = keys.new_zeros(B, nKV, 1, D)
        keys, values = torch.cat([keys, pad], 2), torch.cat([values, pad], 2)
        bias = torch.cat([bias.expand(B, nH, 1, S), sinks.float()[None, :, None, None].expand(B, nH, 1, 1)], -1)
    out = F.scaled_dot_product_attention(q.float()[:, :, None], keys, values, attn_mask=bias,
                                         enable_gqa=nH != nKV)  # [B, nH, 1, D]
    return out[:, :, 0]


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_sdpa(case: tuple) -> None:
    B, nH, nKV, D, S, window, sinks = case
    q, k, v, rows, lengths, s = problem(B, nH, nKV, D, S, sinks)
    got = decode_attention_reference(q, k, v, rows, lengths, window=window, sinks=s)
    torch.testing.assert_close(got, sdpa_oracle(q, k, v, rows, lengths, window, s), rtol=1e-5, atol=1e-5)
    assert torch.equal(decode_attention(q, k, v, rows, lengths, window=window, sinks=s), got) or INTERPRET


def test_reference_rows_none_and_scale() -> None:
    q, k, v, rows, lengths, _ = problem(3, 4, 2, 64, 20, False)
    ident = torch.arange(3)
    torch.testing.assert_close(decode_attention_reference(q, k, v, None, lengths, 0.3),
                               decode_attention_reference(q, k, v, ident, lengths, 0.3))
    # the sink is a logit: a huge one takes all the probability, so the output vanishes
    out = decode_attention_reference(q, k, v, rows, lengths, sinks=torch.full((4,), 1e4))
    assert out.abs().max() < 1e-6


def test_bad_shapes_and_cpu_support() -> None:
    q, k, v, rows, lengths, _ = problem(2, 4, 2, 64, 10, False)
    with pytest.raises(ValueError):
        decode_attention_reference(q[:, :3], k, v, rows, lengths)  # 3 heads over 2 KV heads
    with pytest.raises(ValueError):
        decode_attention_reference(q, k, v, rows, lengths[:1])
    with pytest.raises(ValueError):
        decode_attention_reference(q, k, v, rows, lengths, sinks=torch.zeros(3))
    assert not decode_attention_supported("cpu", torch.float32, 64)


def check_triton(case: tuple, device: str, dtype: torch.dtype, splits: int | None, tol: float,
                 block_n: int | None = None, use_dot: bool | None = None) -> None:
    B, nH, nKV, D, S, window, sinks = case
    q, k, v, rows, lengths, s = problem(B, nH, nKV, D, S, sinks, device, dtype)
    got = decode_attention_triton(q, k, v, rows, lengths, window=window, sinks=s, splits=splits, block_n=block_n,
                                  use_dot=use_dot)
    ref = decode_attention_reference(q.float(), k.float(), v.float(), rows, lengths, window=window,
                                     sinks=None if s is None else s.float())
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol)


@interpret
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_interpreter(case: tuple, splits: int) -> None:
    check_triton(case, "cpu", torch.float32, splits, 1e-4, block_n=16)


@interpret
@pytest.mark.parametrize("splits", [1, 2])
def test_triton_interpreter_padded_dot_for_one_head(splits: int) -> None:
    """One query head per KV head takes FMAs by default; the padded tensor-core dot must agree."""
    check_triton((2, 4, 4, 64, 33, 9, True), "cpu", torch.float32, splits, 1e-4, block_n=16, use_dot=True)
    with pytest.raises(ValueError):
        check_triton((1, 4, 2, 64, 8, None, False), "cpu", torch.float32, splits, 1e-4, use_dot=False)


@interpret
def test_triton_interpreter_fp16_and_auto_splits() -> None:
    check_triton((2, 8, 2, 64, 40, 9, True), "cpu", torch.float16, None, 2e-3, block_n=16)
    q, k, v, rows, lengths, _ = problem(2, 4, 2, 64, 30, False)  # rows None: row b; the q view of a wider tensor
    wide = torch.randn(2, 4, 1, 64)[:, :, 0]
    torch.testing.assert_close(decode_attention_triton(wide, k, v, None, lengths, splits=2, block_n=16),
                               decode_attention_reference(wide, k, v, None, lengths), rtol=1e-4, atol=1e-4)


def test_triton_interpreter_subprocess() -> None:
    """The interpreter tests above in a child process with TRITON_INTERPRET=1 (it must be set before triton
    compiles the kernels), so a plain `pytest` run checks the kernels too."""
    if INTERPRET or da.triton is None:
        pytest.skip("runs in this process (TRITON_INTERPRET=1) or triton is missing")
    run_interpreted(__file__, "triton_interpreter and not subprocess")


# ---- the model's decode path (write + kernel) against its mask + SDPA path


def layer_inputs(spec, B: int, S: int, window: int | None, device: str, dtype: torch.dtype, seed: int = 0):
    """A layer with random weights, a cache with earlier tokens in shuffled rows, one new token per sequence."""
    torch.manual_seed(seed)
    attn = spec.build(64, 1e-6).to(device, dtype)
    if getattr(attn, "sinks", None) is not None:
        torch.nn.init.normal_(attn.sinks, std=1.0)
    D, nKV = spec.head_dim, spec.num_kv_heads
    cache = tuple(torch.randn(B + 2, S, nKV, D, device=device, dtype=dtype) for _ in range(2))
    x = torch.randn(B, 1, 64, device=device, dtype=dtype)
    pos = torch.tensor([[0], [S - 1], [S // 2]][:B], device=device)  # [B, 1]: a new sequence, a full row, midway
    rows = torch.randperm(B + 2)[:B].to(device)
    ang = pos[..., None].float() * torch.linspace(0.1, 1.0, D // 2, device=device)  # [B, 1, D/2]
    cos, sin = (torch.cat([f(ang)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))  # [B, 1, D]
    kpos = torch.arange(S, device=device)
    mask = kpos[None, None] <= pos[:, :, None]
    if window:
        mask &= kpos[None, None] > pos[:, :, None] - window
    return attn, (x, cos, sin), cache, rows, pos, mask[:, None], window


def decode_both(monkeypatch, module: str, spec, B: int, S: int, window: int | None, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
    """The layer's output and cache after one step through the kernel and through the mask."""
    mod = importlib.import_module(module)
    outs, caches = [], []
    for kernel in (True, False):
        attn, xs, cache, rows, pos, mask, window = layer_inputs(spec, B, S, window, device, dtype)
        monkeypatch.setattr(mod, "decode_attention_supported", lambda *a, on=kernel: on)
        with torch.no_grad():
            outs.append(attn(*xs, cache, rows, pos, mask, S, window=window))
        caches.append(cache)
    return outs[0], outs[1], caches[0], caches[1]


GQA = [GQASpec(4, 4, 16), GQASpec(8, 2, 16, sinks=True), GQASpec(8, 1, 16, qk_norm="head", output_gate=True)]


@pytest.mark.parametrize("spec", GQA)
@pytest.mark.parametrize("window", [None, 5])
def test_attention_decode_path_matches_mask_path(spec: GQASpec, window: int | None, monkeypatch) -> None:
    kernel, masked, c1, c2 = decode_both(monkeypatch, "moetandem.models.components.attention", spec, 3, 24, window)
    torch.testing.assert_close(kernel, masked, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(c1, c2))  # the same K/V written


def test_decode_path_never_syncs(monkeypatch) -> None:
    """The write, the lengths and the op's call read nothing back to the host (a captured step could not)."""
    from test_committee_parts import no_host_sync
    mod = importlib.import_module("moetandem.models.components.attention")
    monkeypatch.setattr(mod, "decode_attention_supported", lambda *a: True)
    attn, xs, cache, rows, pos, mask, _ = layer_inputs(GQASpec(8, 2, 16, sinks=True), 3, 24, 5, "cpu", torch.float32)
    with torch.inference_mode(), no_host_sync():
        out = attn(*xs, cache, rows, pos, mask, 24, window=5)
    assert out.shape == (3, 1, 64) and torch.isfinite(out).all()


def test_gemma_attention_decode_path_matches_mask_path(monkeypatch) -> None:
    spec = GemmaAttentionSpec(4, 2, 32, k_eq_v=True)
    kernel, masked, _, _ = decode_both(monkeypatch, "moetandem.models.components.gemma_attention", spec, 3, 20, 6)
    torch.testing.assert_close(kernel, masked, rtol=1e-4, atol=1e-5)


# ---- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", CASES + [(3, 32, 4, 128, 5000, None, False), (2, 16, 16, 256, 3000, 1024, True),
                                          (2, 16, 2, 512, 700, None, False), (1, 8, 1, 80, 300, None, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("splits", [None, 1, 7])
@pytest.mark.parametrize("use_dot", [None, True])
def test_triton_gpu(case: tuple, dtype: torch.dtype, splits: int | None, use_dot: bool | None) -> None:
    check_triton(case, "cuda", dtype, splits, 2e-2 if dtype == torch.bfloat16 else 2e-3, use_dot=use_dot)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replay_with_new_lengths_and_rows() -> None:
    """Lengths and rows are data: one capture serves every step (no host sync, fixed grid)."""
    q, k, v, rows, lengths, s = problem(3, 16, 2, 128, 4096, True, "cuda", torch.bfloat16)
    sq, srows, slen = q.clone(), rows.clone(), lengths.clone()
    def call() -> torch.Tensor:
        return decode_attention(sq, k, v, srows, slen, sinks=s, window=1000)
    graph, out = capture_graph(call, None, call)
    for seed in range(3):
        q2, _, _, rows2, len2, _ = problem(3, 16, 2, 128, 4096, True, "cuda", torch.bfloat16, seed=seed + 1,
                                           first_len_one=False)
        sq.copy_(q2), srows.copy_(rows2), slen.copy_(len2)
        graph.replay()
        ref = decode_attention_reference(q2.float(), k.float(), v.float(), rows2, len2, window=1000, sinks=s.float())
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("spec", GQA)
@pytest.mark.parametrize("window", [None, 100])
def test_attention_decode_path_gpu(spec: GQASpec, window: int | None, monkeypatch) -> None:
    kernel, masked, c1, c2 = decode_both(monkeypatch, "moetandem.models.components.attention", spec, 3, 600, window,
                                         "cuda", torch.bfloat16)
    torch.testing.assert_close(kernel.float(), masked.float(), rtol=3e-2, atol=3e-2)
    assert all(torch.equal(a, b) for a, b in zip(c1, c2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_attention_decode_compiles() -> None:
    """torch.compile keeps the op whole (no graph break) and gives the eager result."""
    attn, xs, cache, rows, pos, mask, _ = layer_inputs(GQASpec(8, 2, 64, sinks=True), 3, 300, None, "cuda",
                                                      torch.bfloat16)
    with torch.no_grad():
        eager = attn(*xs, tuple(c.clone() for c in cache), rows, pos, mask, 300)
        compiled = torch.compile(attn, fullgraph=True, dynamic=False)(*xs, cache, rows, pos, mask, 300)
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=2e-2, atol=2e-2)
