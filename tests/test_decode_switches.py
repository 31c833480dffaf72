"""The switches (on by default) that drop kernels from the compiled decode step: MOETANDEM_ROPE=flip (rope.py ROPE_FLIP:
rotate_half as a flip of the halves, the same values bit for bit) and MOETANDEM_ROUTER_WEIGHTS=kernel (routers.py
ROUTER_WEIGHTS_CAST: the fused router stores its weights in the model's dtype; its kernel's check is in
test_router_kernel.py). A compiled decode step with them gives the eager model's logits, and inductor's decode step
launches fewer kernels per layer with each (bench/kernel_census.py: inductor's Triton scheduling on the CPU)."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

import moetandem
from conftest import build_checkpoint
from moetandem.graphs import allow_layer_frames
from moetandem.models import KVCache
from moetandem.models.components.rope import apply_rope

rope = importlib.import_module("moetandem.models.components.rope")
routers = importlib.import_module("moetandem.models.components.routers")
attention = importlib.import_module("moetandem.models.components.attention")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("D, d", ((8, 8), (64, 64), (64, 32)))  # d < D: partial rotary
def test_flip_is_the_cat_bit_for_bit(dtype: torch.dtype, D: int, d: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """_flip_half is rotate_half's cat exactly, and apply_rope traced with the switch (dynamo, no inductor: the
    same ops run) gives the eager apply_rope bit for bit."""
    g = torch.Generator().manual_seed(D + d)
    x = torch.randn(2, 3, 5, D, generator=g).to(dtype)  # [B, h, L, D]
    cos, sin = torch.randn(2, 5, d, generator=g).to(dtype), torch.randn(2, 5, d, generator=g).to(dtype)
    x1, x2 = x[..., :d].chunk(2, dim=-1)
    assert torch.equal(rope._flip_half(x[..., :d]), torch.cat([-x2, x1], dim=-1))
    want = apply_rope(x, cos, sin)
    monkeypatch.setattr(rope, "ROPE_FLIP", True)
    assert torch.equal(apply_rope(x, cos, sin), want)  # eager: the cat
    traced: list[str] = []

    def backend(gm: torch.fx.GraphModule, inputs: list) -> object:
        traced.extend(str(n.target) for n in gm.graph.nodes)
        return gm.forward
    torch._dynamo.reset()
    got = torch.compile(apply_rope, backend=backend, fullgraph=True)(x, cos, sin)
    torch._dynamo.reset()
    assert torch.equal(got, want) and "flip" in traced
    assert sum("cat" in t for t in traced) == int(d < D)  # only partial rotary's [turned | rest]


def _decode(fn: object, eng: object, cache: KVCache, token: int, at: int) -> torch.Tensor:
    ids, pos = torch.tensor([[token]]), torch.tensor([[at]])
    return fn(ids, pos, cache, cache.max_len, eng.experts, rows=torch.tensor([0]))[:, -1]  # type: ignore[operator]


def _switches(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    monkeypatch.setattr(rope, "ROPE_FLIP", on)
    monkeypatch.setattr(routers, "ROUTER_WEIGHTS_CAST", on)


@pytest.mark.parametrize("family", ("olmoe", "qwen3_moe"))
def test_compiled_decode_step_with_switches(family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One decode step after an eager prefill: compiled (inductor, CPU) with the switches on and off, and the eager
    model with them on, all give the eager model's logits (fp32)."""
    eng = moetandem.load(build_checkpoint(family, tmp_path / family), device="cpu", progress=False, use_graphs=False,
                         compile="off")
    model = eng.model
    cache = KVCache(eng.args, 2, 16, torch.device("cpu"), torch.float32)
    prompt = torch.tensor([[3, 17, 42, 9, 100]])
    _switches(monkeypatch, False)
    with torch.no_grad():
        model(prompt, torch.arange(5)[None], cache, cache.max_len, eng.experts, rows=torch.tensor([0]))
        want = _decode(model, eng, cache, 7, 5)  # [1, V]; rewriting position 5's K/V later writes the same values
        allow_layer_frames(len(model.model.layers))
        got = {}
        for on in (False, True):
            _switches(monkeypatch, on)
            torch._dynamo.reset()
            got[on] = _decode(torch.compile(model, dynamic=False), eng, cache, 7, 5)
        torch._dynamo.reset()
        eager_on = _decode(model, eng, cache, 7, 5)
    assert torch.equal(eager_on, want)
    for on in (False, True):
        torch.testing.assert_close(got[on], want, rtol=1e-5, atol=1e-5)
    assert want.abs().max() > 0


@pytest.mark.parametrize("family", ("olmoe", "qwen3"))
def test_census_switches_drop_kernels(family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inductor's Triton scheduling of the CUDA decode step, per layer: the flip removes the rotate-half cat's
    kernels (one per half, q and k) and fuses the q/k norm reductions into the RoPE kernels; the router switch
    removes the weights' cast kernel. With the fused QK RoPE (the default) the RoPE is not inductor's: it is off
    here, as it is for a layer fusable_prologue refuses."""
    kc = importlib.import_module("bench.kernel_census")
    monkeypatch.setattr(attention, "QK_ROPE_FUSED", False)
    per_layer = {}
    for flip, cast in ((False, False), (True, False), (True, True)):
        monkeypatch.setattr(rope, "ROPE_FLIP", flip)
        monkeypatch.setattr(routers, "ROUTER_WEIGHTS_CAST", cast)
        _, per_layer[flip, cast], step = kc.census(family, "small", tmp_path / f"{flip}{cast}")
        assert any("aten.cat" in x.aten for x in step) != flip  # the rotate-half cat's kernels, only without
    assert per_layer[True, False] <= per_layer[False, False] - 4, per_layer
    assert per_layer[True, True] == per_layer[True, False] - 1, per_layer
