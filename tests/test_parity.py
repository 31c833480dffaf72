"""Our engine against transformers on tiny random checkpoints of every registered family (fp32, CPU), loaded
through `moetandem.load`: logits, decode steps, greedy tokens, batching, and an exact committee at half the
experts. (gpt-oss's MXFP4 checkpoints: tests/test_gpt_oss.py.)"""
from __future__ import annotations

import moetandem
import pytest
import torch
from safetensors.torch import load_file

from moetandem import Engine
from moetandem.checkpoint import Checkpoint
from moetandem.experts.provider import ExpertProvider
from moetandem.loader import load_dense
from moetandem.models import FAMILIES, KVCache

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [1, 2, 3], [200, 100, 50, 25, 12, 6, 3, 1, 0, 9, 18, 36, 72]]


def load_ours(path) -> Engine:
    ckpt = Checkpoint(path)
    family = FAMILIES[ckpt.config["model_type"]]
    if family.experts_unsupported is None:
        return moetandem.load(path, device="cpu", dtype="float32", progress=False)
    args = family.args(ckpt.config, ckpt.path)
    net = load_dense(ckpt, family, args, torch.device("cpu"), torch.float32, progress=False)
    ref = reference_experts(path, ckpt.config)
    experts = {b.layer: ref for b in net.moe_blocks()}
    return Engine(net, None, experts, ref, None, torch.device("cpu"), torch.float32, use_graphs=False)


@pytest.fixture(scope="module")
def pair(family_checkpoint):
    from transformers import AutoModelForCausalLM
    fam, path = family_checkpoint
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return fam, path, hf, load_ours(path), [reference_tokens(hf, p, 40) for p in PROMPTS]


def reference_tokens(hf, p: list[int], n: int) -> list[int]:
    ids = torch.tensor([p])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          min_new_tokens=n, pad_token_id=0)
    return out[0, len(p):].tolist()


def test_logits_match(pair):
    fam, _, hf, ours, _ = pair
    for p in PROMPTS:
        ids = torch.tensor([p])
        with torch.no_grad():
            ref = hf(ids).logits[0]  # [L, V]
            cache = KVCache(ours.args, 1, len(p), torch.device("cpu"), torch.float32)
            got = ours.forward(ids, torch.arange(len(p))[None], cache, len(p))[0]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4, msg=f"{fam} logits differ")


def test_greedy_tokens_match_transformers(pair):
    fam, _, _, ours, ref = pair
    for p, want in zip(PROMPTS, ref):
        assert ours.generate([p], max_new_tokens=40)[0].token_ids == want, f"{fam}: greedy tokens differ"


def test_decode_logits_match(pair):
    """Decode steps (one token against the cache: MLA's absorbed path, sinks over a window) track transformers."""
    fam, _, hf, ours, _ = pair
    p = PROMPTS[2]
    with torch.no_grad():
        ref = hf(torch.tensor([p])).logits[0]  # [L, V]
        cache = KVCache(ours.args, 1, len(p), torch.device("cpu"), torch.float32)
        ours.forward(torch.tensor([p[:4]]), torch.arange(4)[None], cache, 4)
        for i in range(4, len(p)):
            got = ours.forward(torch.tensor([[p[i]]]), torch.tensor([[i]]), cache, i + 1)[0, -1]
            torch.testing.assert_close(got, ref[i], rtol=1e-4, atol=1e-4, msg=f"{fam} step {i} differs")


def test_committee_exact_matches_transformers(pair):
    fam, path, _, _, ref = pair
    if FAMILIES[fam].experts_unsupported is not None:
        pytest.skip(FAMILIES[fam].experts_unsupported)
    eng = moetandem.load(path, device="cpu", dtype="float32", progress=False, expert_budget=0.5, fidelity="exact")
    for p, want in zip(PROMPTS, ref):  # greedy: the first 16 of transformers' 40 tokens
        assert eng.generate([p], max_new_tokens=16)[0].token_ids == want[:16], f"{fam}: committee tokens differ"
    assert eng.expert_stats()["misses"] > 0  # the budget really forced misses


def test_batched_equals_one_by_one(pair):
    fam, _, _, ours, _ = pair
    batched = [g.token_ids for g in ours.generate(PROMPTS, max_new_tokens=32)]
    single = [ours.generate([p], max_new_tokens=32)[0].token_ids for p in PROMPTS]
    assert batched == single
    sampled_b = [g.token_ids for g in ours.generate(PROMPTS[:1], max_new_tokens=16, temperature=0.8, top_p=0.9, seed=3)]
    sampled_a = [g.token_ids for g in ours.generate(PROMPTS[:1], max_new_tokens=16, temperature=0.8, top_p=0.9, seed=3)]
    assert sampled_a == sampled_b  # a seed makes sampling reproducible


class GeGLUReferenceExperts(ExpertProvider):
    """Gemma-4 routed experts as transformers computes them: fused gate_up [E, 2I, H], down [E, H, I],
    down(gelu_tanh(gate(x)) * up(x)). The expert path must do this (an expert activation beside SwiGLU)."""

    def __init__(self, path) -> None:
        self.w: dict[str, torch.Tensor] = {}
        for f in path.glob("*.safetensors"):
            self.w.update({k: v for k, v in load_file(str(f)).items() if ".experts." in k})

    def compute(self, layer, x, expert_ids, weights):
        gate_up = next(v for k, v in self.w.items() if k.endswith(f"layers.{layer}.experts.gate_up_proj"))
        down = next(v for k, v in self.w.items() if k.endswith(f"layers.{layer}.experts.down_proj"))
        out = torch.zeros_like(x)  # [T, H]
        for j in range(expert_ids.shape[1]):
            for e in expert_ids[:, j].unique().tolist():
                t = (expert_ids[:, j] == e).nonzero()[:, 0]
                g, u = torch.nn.functional.linear(x[t], gate_up[e]).chunk(2, dim=-1)  # [t, I] each
                y = torch.nn.functional.linear(torch.nn.functional.gelu(g, approximate="tanh") * u, down[e])
                out[t] += y * weights[t, j, None]
        return out


def reference_experts(path, config: dict) -> ExpertProvider:
    """The routed experts of a family the providers cannot run yet, computed here as transformers does."""
    return GeGLUReferenceExperts(path)
