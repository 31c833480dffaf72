"""Every family's decode step can be one CUDA graph: with graph-safe expert providers, the model's own code
(attention, MLA, linear attention, routers, norms, the per-layer-kind cache) never reads a tensor back to the host
during a decode forward. Checked on the CPU for every registered family (the GPU test suite captures real graphs)."""
from __future__ import annotations

import torch

from moetandem.experts.provider import ExpertProvider
from test_committee_parts import no_host_sync


class Zeros(ExpertProvider):
    """A graph-safe stand-in: the routed experts contribute nothing (no host work at all)."""

    graph_safe = True

    def compute(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def test_decode_forward_never_syncs(family_checkpoint):
    fam, path = family_checkpoint
    from moetandem.checkpoint import Checkpoint
    from moetandem.engine import Engine
    from moetandem.loader import load_dense
    from moetandem.models import FAMILIES
    ckpt = Checkpoint(path)
    family = FAMILIES[ckpt.config["model_type"]]
    args = family.args(ckpt.config, ckpt.path)
    net = load_dense(ckpt, family, args, torch.device("cpu"), torch.float32, progress=False)
    zeros = Zeros()
    eng = Engine(net, None, {b.layer: zeros for b in net.moe_blocks()}, zeros, None, torch.device("cpu"),
                 torch.float32, use_graphs=False)
    cache = eng.kv_cache(3, 64)
    prompt = torch.tensor([[5, 17, 42, 99, 3, 2, 7, 1]])
    rows = torch.tensor([1])
    with torch.inference_mode():
        eng.forward(prompt, torch.arange(8)[None], cache, 8, rows=rows)  # prefill may sync (eager)
        ids, pos = torch.tensor([[11]]), torch.tensor([[8]])
        with no_host_sync():  # what a captured decode step (graphs.py) runs: kv_len is the cache length
            logits = eng.model(ids, pos, cache, cache.max_len, eng.experts, rows=rows)[:, -1]
    assert logits.shape == (1, args.vocab_size) and torch.isfinite(logits).all()
