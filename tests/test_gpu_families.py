"""Every registered family's compiled CUDA-graph decode step (the shipped path: torch.compile with the decode switches
on, fused QK RoPE where a layer allows it, the fused router and MoE) against its own eager bf16 forward, teacher
forced over the same tokens. Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

import moetandem
from conftest import build_checkpoint, family_configs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("fam", list(family_configs()))  # Switch (encoder-decoder, not compiled): test_switch_graphs
def test_compiled_graph_step_matches_eager(fam: str, tmp_path) -> None:
    path = build_checkpoint(fam, tmp_path / fam)
    fast = moetandem.load(path, device="cuda", dtype="bfloat16", progress=False, compile="on")
    if fast.graphs is None:
        pytest.skip(f"{fam}: no CUDA-graph decode for this family")
    V = fast.args.vocab_size
    seq = torch.randint(0, min(V, 256), (2, 24), generator=torch.Generator().manual_seed(2)).cuda()
    pos = torch.arange(24, device="cuda").expand(2, 24)
    n0 = 6
    with torch.no_grad():
        cache = fast.kv_cache(3, 64)  # rows 0, 1 + the scratch row 2
        eager_cache = fast.kv_cache(2, 64)  # no graph: the eager forward's own rows
        fast.forward(seq[:, :n0], pos[:, :n0], cache, n0)
        fast.forward(seq[:, :n0], pos[:, :n0], eager_cache, n0)
        for t in range(n0, 24):
            logits, _ = fast.graphs.step(seq[:, t].tolist(), [t, t], [0, 1], cache, scratch_row=2)
            got = logits[:2].float()
            want = fast.forward(seq[:, t:t + 1], pos[:, t:t + 1], eager_cache, 64)[:, -1].float()
            err = float((got - want).norm() / want.norm())
            assert err < 2e-2, f"{fam} step {t}: compiled graph vs eager bf16, relative error {err:.3g}"
