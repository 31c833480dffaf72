"""Hybrid linear-attention stacks (Qwen3-Next): the gated delta rule's two forms, and the per-layer-kind cache
under continuous batching (row-addressed conv + recurrent state beside K/V)."""
from __future__ import annotations

import moetandem
import pytest
import torch

from conftest import build_checkpoint
from moetandem.batcher import Batcher
from moetandem.models.components.delta_rule import chunked, recurrent


def test_chunked_equals_recurrent_and_transformers():
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_recurrent_gated_delta_rule
    g_ = torch.Generator().manual_seed(0)
    B, L, nK, nV, dk, dv = 2, 150, 2, 4, 16, 8  # three chunks, the last one padded; grouped value heads
    q, k = (torch.randn(B, L, nK, dk, generator=g_) for _ in range(2))
    v = torch.randn(B, L, nV, dv, generator=g_)
    g = -torch.rand(B, L, nV, generator=g_)
    beta = torch.rand(B, L, nV, generator=g_)
    s0 = torch.randn(B, nV, dk, dv, generator=g_) * 0.1
    out_c, s_c = chunked(q, k, v, g, beta, s0)
    out_r, s_r = recurrent(q, k, v, g, beta, s0)
    torch.testing.assert_close(out_c, out_r, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s_c, s_r, rtol=1e-4, atol=1e-4)
    ref, s_ref = torch_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                                  use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(out_r, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_r, s_ref, rtol=1e-5, atol=1e-5)


def test_fla_op_is_one_opaque_call(monkeypatch):
    """The flash-linear-attention path as a custom op (fla's kernels stood in for by transformers' PyTorch forms,
    which take the same arguments): the recurrent form's results, and torch.compile traces it without a break."""
    from transformers.models.qwen3_next.modeling_qwen3_next import (torch_chunk_gated_delta_rule,
                                                                    torch_recurrent_gated_delta_rule)
    from moetandem.models.components import delta_rule
    monkeypatch.setattr(delta_rule, "_FLA", [(torch_chunk_gated_delta_rule, torch_recurrent_gated_delta_rule)])
    g_ = torch.Generator().manual_seed(3)
    for L in (1, 5):  # decode (the recurrent kernel) and prefill (the chunked one)
        q, k = (torch.randn(1, L, 2, 16, generator=g_) for _ in range(2))
        v = torch.randn(1, L, 4, 8, generator=g_)
        g, beta = -torch.rand(1, L, 4, generator=g_), torch.rand(1, L, 4, generator=g_)
        s0 = torch.randn(1, 4, 16, 8, generator=g_) * 0.1
        want = recurrent(q, k, v, g, beta, s0)
        got = delta_rule.fla_gated_delta_rule(q, k, v, g, beta, s0)
        compiled = torch.compile(delta_rule.fla_gated_delta_rule, backend="eager", fullgraph=True)(q, k, v, g, beta, s0)
        for a in (got, compiled):
            torch.testing.assert_close(a[0], want[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(a[1], want[1], rtol=1e-4, atol=1e-4)


def test_padding_tokens_leave_the_state_alone():
    g_ = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 9, 1, 8, generator=g_) for _ in range(2))
    v = torch.randn(1, 9, 1, 8, generator=g_)
    g, beta = -torch.rand(1, 9, 1, generator=g_), torch.rand(1, 9, 1, generator=g_)
    s0 = torch.zeros(1, 1, 8, 8)
    _, want = chunked(q[:, :5], k[:, :5], v[:, :5], g[:, :5], beta[:, :5], s0)
    g[:, 5:], beta[:, 5:] = 0.0, 0.0  # what GatedDeltaNet does to right-padding
    _, got = chunked(q, k, v, g, beta, s0)
    torch.testing.assert_close(got, want)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = build_checkpoint("qwen3_next", tmp_path_factory.mktemp("hybrid"))
    return moetandem.load(path, device="cpu", dtype="float32", progress=False)


def test_cache_is_per_layer_kind(engine):
    cache = engine.kv_cache(3, 32)
    for i, bufs in enumerate(cache.layers):
        if engine.args.is_linear(i):  # conv [R, 2, C, K-1] + recurrent [R, 2, nV, dk, dv], no per-token buffers
            assert [t.shape[:2] for t in bufs] == [(3, 2), (3, 2)] and bufs[1].dtype == torch.float32
        else:
            assert [t.shape[:2] for t in bufs] == [(3, 32), (3, 32)]


def test_long_prompt_matches_transformers(engine, tmp_path_factory):
    """A prompt over one chunk (64) prefilled in chunked form, then decoded recurrently."""
    from transformers import AutoModelForCausalLM
    path = build_checkpoint("qwen3_next", tmp_path_factory.mktemp("hybrid_long"))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    p = [(7 * i + 3) % 256 for i in range(90)]
    ids = torch.tensor([p])
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                           do_sample=False, pad_token_id=0)[0, len(p):].tolist()
    assert engine.generate([p], max_new_tokens=16)[0].token_ids == want


def test_continuous_batching_mixed_lengths(engine):
    """Requests of mixed lengths (one over a chunk) join and leave mid-flight and reuse each other's slots: each
    gets the tokens it gets alone (a reused row's stale conv/recurrent state is never read)."""
    prompts = [[5, 17, 42, 99], [(3 * i + 1) % 256 for i in range(70)], [200, 100], [9, 8, 7, 6, 5, 4, 3]]
    alone = [engine.generate([p], max_new_tokens=10)[0].token_ids for p in prompts]
    b = Batcher(engine, max_batch=2, max_len=96)
    reqs = [engine.make_sequence(p, max_new_tokens=10) for p in prompts]
    b.add(reqs[:2])  # right-padded prefill of 4 and 70 tokens together
    for _ in range(3):
        b.step()
    while not reqs[0].done:
        b.step()
    b.add([reqs[2]])  # into r0's old slot, while r1 is mid-way
    while not reqs[1].done:
        b.step()
    b.add([reqs[3]])
    while b.active:
        b.step()
    assert [r.out for r in reqs] == alone


def test_repeated_step_and_padding_rows(engine):
    """A decode step run twice at the same positions (CUDA-graph warm-up) gives the same logits, and extra rows
    writing into the scratch row (a padded graph batch) do not disturb the real rows."""
    b = Batcher(engine, max_batch=3, max_len=64)  # rows 0..2 + scratch row 3
    r0, r1 = engine.make_sequence([5, 6, 7, 8, 9], 8), engine.make_sequence([9, 10], 8)
    b.add([r0, r1])
    ids = torch.tensor([[r0.out[-1]], [r1.out[-1]]])
    pos = torch.tensor([[r0.next_pos], [r1.next_pos]])
    rows = torch.tensor([r0.slot, r1.slot])
    first = engine.forward(ids, pos, b.cache, 64, rows=rows)[:, -1]
    again = engine.forward(ids, pos, b.cache, 64, rows=rows)[:, -1]
    torch.testing.assert_close(again, first)
    padded = engine.forward(torch.cat([ids, torch.zeros(2, 1, dtype=torch.long)]),
                            torch.cat([pos, torch.zeros(2, 1, dtype=torch.long)]), b.cache, 64,
                            rows=torch.cat([rows, torch.tensor([3, 3])]))[:2, -1]
    torch.testing.assert_close(padded, first)
    nxt = engine.forward(first.argmax(-1)[:, None], pos + 1, b.cache, 64, rows=rows)[:, -1]  # the state moved on
    b2 = Batcher(engine, max_batch=3, max_len=64)
    s0, s1 = engine.make_sequence([5, 6, 7, 8, 9], 8), engine.make_sequence([9, 10], 8)
    b2.add([s0, s1])
    b2.step()
    b2.step()
    assert [s0.out[-1], s1.out[-1]] == nxt.argmax(-1).tolist()
