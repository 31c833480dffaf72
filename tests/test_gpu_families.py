"""Every registered family's compiled CUDA-graph decode step (the shipped path: torch.compile with the decode
switches on, fused QK RoPE where a layer allows it, the fused router and MoE) against its own eager bf16 forward,
teacher forced over the same tokens (or, at a step where bf16 rounding flips a tiny router's near tie, the fp32
forward). Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

import moetandem
from conftest import build_checkpoint, family_configs
from kernel_checks import assert_steps_match

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

    def eager(dtype: str) -> list[torch.Tensor]:
        eng = moetandem.load(path, device="cuda", dtype=dtype, progress=False, compile="off", use_graphs=False)
        cache = eng.kv_cache(2, 64)
        eng.forward(seq[:, :n0], pos[:, :n0], cache, n0)
        return [eng.forward(seq[:, t:t + 1], pos[:, t:t + 1], cache, 64)[:, -1].float() for t in range(n0, 24)]

    with torch.no_grad():
        cache = fast.kv_cache(3, 64)  # rows 0, 1 + the scratch row 2
        fast.forward(seq[:, :n0], pos[:, :n0], cache, n0)
        got = [fast.graphs.step(seq[:, t].tolist(), [t, t], [0, 1], cache, scratch_row=2)[0][:2].float().clone()
               for t in range(n0, 24)]
        want, ref = eager("bfloat16"), eager("float32")
    assert_steps_match(got, want, ref, 2e-2, f"{fam}: compiled graph")
