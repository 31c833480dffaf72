"""Our engine against transformers on tiny random checkpoints of every family (fp32, CPU)."""
from __future__ import annotations

import moetandem
import pytest
import torch

from moetandem import Engine

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [1, 2, 3], [200, 100, 50, 25, 12, 6, 3, 1, 0, 9, 18, 36, 72]]


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    from transformers import AutoModelForCausalLM
    fam, path = tiny_checkpoint
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = moetandem.load(path, device="cpu", dtype="float32", progress=False)
    return fam, hf, ours


def test_logits_match(pair):
    fam, hf, ours = pair
    from moetandem.models import KVCache
    for p in PROMPTS:
        ids = torch.tensor([p])
        with torch.no_grad():
            ref = hf(ids).logits[0]  # [L, V]
            cache = KVCache(ours.args, 1, len(p), torch.device("cpu"), torch.float32)
            got = ours.forward(ids, torch.arange(len(p))[None], cache, len(p))[0]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4, msg=f"{fam} logits differ")


def test_greedy_tokens_match_transformers(pair):
    fam, hf, ours = pair
    for p in PROMPTS:
        with torch.no_grad():
            ids = torch.tensor([p])
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                              min_new_tokens=40, pad_token_id=0)[0, len(p):].tolist()
        got = ours.generate([p], max_new_tokens=40)[0].token_ids
        assert got == ref, f"{fam}: greedy tokens differ"


def test_batched_equals_one_by_one(pair):
    fam, _, ours = pair
    batched = [g.token_ids for g in ours.generate(PROMPTS, max_new_tokens=32)]
    single = [ours.generate([p], max_new_tokens=32)[0].token_ids for p in PROMPTS]
    assert batched == single
    sampled_b = [g.token_ids for g in ours.generate(PROMPTS[:1], max_new_tokens=16, temperature=0.8, top_p=0.9, seed=3)]
    sampled_a = [g.token_ids for g in ours.generate(PROMPTS[:1], max_new_tokens=16, temperature=0.8, top_p=0.9, seed=3)]
    assert sampled_a == sampled_b  # a seed makes sampling reproducible
