"""Continuous batching: sequences joining and leaving mid-flight decode exactly as they would alone."""
from __future__ import annotations

import moetandem
import pytest

from conftest import build_checkpoint
from moetandem import ContextLengthError, Engine
from moetandem.batcher import Batcher


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = build_checkpoint("qwen2_moe", tmp_path_factory.mktemp("batcher"))
    return moetandem.load(path, device="cpu", dtype="float32", progress=False)


def test_join_and_leave_mid_flight(engine):
    prompts = [[5, 17, 42, 99], [1, 2, 3, 4, 5, 6, 7, 8, 9], [200, 100]]
    alone = [engine.generate([p], max_new_tokens=12)[0].token_ids for p in prompts]
    b = Batcher(engine, max_batch=2, max_len=64)
    r0, r1, r2 = (engine.make_sequence(p, max_new_tokens=12) for p in prompts)
    b.add([r0])
    for _ in range(3):
        b.step()
    b.add([r1])  # joins while r0 is mid-way
    assert b.free_slots() == 0
    while not r0.done:
        b.step()
    assert b.free_slots() == 1  # r0 left; its slot (and stale KV rows) go to r2
    b.add([r2])
    while b.active:
        b.step()
    assert [r0.out, r1.out, r2.out] == alone
    assert {r.finish_reason for r in (r0, r1, r2)} == {"length"}


def test_cancel_frees_slot_and_others_continue(engine):
    b = Batcher(engine, max_batch=2, max_len=64)
    keep, drop = engine.make_sequence([9, 8, 7], 10), engine.make_sequence([1, 1, 1], 10)
    b.add([keep, drop])
    b.step()
    b.cancel(drop)
    assert drop.finish_reason == "cancelled" and b.free_slots() == 1
    while b.active:
        b.step()
    assert keep.out == engine.generate([[9, 8, 7]], max_new_tokens=10)[0].token_ids


def test_sequence_must_fit_cache(engine):
    b = Batcher(engine, max_batch=1, max_len=16)
    with pytest.raises(ContextLengthError):
        b.add([engine.make_sequence(list(range(10)), max_new_tokens=10)])
    assert b.free_slots() == 1


def test_padding_rows_into_the_scratch_row_do_not_disturb_real_rows(engine):
    """What a padded CUDA-graph batch does, checked eagerly: extra rows writing into the scratch cache row."""
    import torch
    b = Batcher(engine, max_batch=3, max_len=64)  # cache rows 0..2 + scratch row 3
    r0, r1 = engine.make_sequence([5, 6, 7, 8], 8), engine.make_sequence([9, 10], 8)
    b.add([r0, r1])
    ids = torch.tensor([[r0.out[-1]], [r1.out[-1]]])
    pos = torch.tensor([[r0.next_pos], [r1.next_pos]])
    rows = torch.tensor([r0.slot, r1.slot])
    k_before = [k.clone() for k in b.cache.k]
    real = engine.forward(ids, pos, b.cache, 64, rows=rows)[:, -1]
    for k, kb in zip(b.cache.k, k_before):  # rewind: the padded run below writes the same K/V again
        k.copy_(kb)
    padded = engine.forward(torch.cat([ids, torch.zeros(2, 1, dtype=torch.long)]),
                          torch.cat([pos, torch.zeros(2, 1, dtype=torch.long)]), b.cache, 64,
                          rows=torch.cat([rows, torch.tensor([3, 3])]))[:2, -1]
    torch.testing.assert_close(padded, real)


def test_decode_steps_reuse_device_inputs_and_match_plain_forward(tmp_path):
    """The decode step keeps its inputs on the device: a greedy batch that keeps its rows feeds the step's own
    argmax back without a host copy; sampled rows, logits processors and a changed batch copy their inputs in.
    Tokens equal the plain forward path (no static buffers) in every case."""
    path = build_checkpoint("qwen2_moe", tmp_path / "plain")
    ref = moetandem.load(path, device="cpu", dtype="float32", progress=False, use_graphs=False)
    eng = moetandem.load(path, device="cpu", dtype="float32", progress=False)
    assert ref.graphs is None and eng.graphs is not None

    def run(e: Engine) -> list[list[int]]:
        b = Batcher(e, max_batch=4, max_len=64)
        greedy = e.make_sequence([5, 17, 42, 99], max_new_tokens=14)
        sampled = e.make_sequence([1, 2, 3], max_new_tokens=6, temperature=0.8, seed=3)
        masked = e.make_sequence([7, 7, 7], max_new_tokens=9)
        masked.logits_processor = lambda row: row.index_fill(0, row.topk(2).indices[:1], float("-inf"))
        b.add([greedy])
        for _ in range(3):
            b.step()
        b.add([sampled, masked])
        while b.active:
            b.step()
        return [greedy.out, sampled.out, masked.out]

    assert run(eng) == run(ref)
    b = Batcher(eng, max_batch=2, max_len=64)
    b.add([eng.make_sequence([3, 1, 4, 1, 5], max_new_tokens=10)])
    before = eng.graphs.input_copies
    while b.active:
        b.step()
    assert eng.graphs.input_copies - before == 1  # 9 steps: only the first one's inputs came from the host


def test_warm_up_prepares_every_batch_size_and_leaves_the_slots_alone(engine):
    """A server warms every decode bucket before it reports ready; the padding-only steps write into the scratch
    row, so sequences decoded afterwards (and their KV rows) are exactly as without the warm-up."""
    from moetandem.graphs import buckets
    prompts = [[5, 17, 42, 99], [1, 2, 3, 4, 5, 6, 7, 8, 9], [200, 100]]
    cold = Batcher(engine, max_batch=5, max_len=64)
    seen: list[int] = []
    warm = Batcher(engine, max_batch=5, max_len=64)
    assert warm.warm_up(lambda a, s: seen.append(a)) == seen == buckets(5) == [1, 2, 4, 5]
    assert {a for a, _ in engine.graphs.entries} >= {1, 2, 4, 5}
    outs = []
    for b in (cold, warm):
        seqs = [engine.make_sequence(p, max_new_tokens=10) for p in prompts]
        b.add(seqs)
        while b.active:
            b.step()
        outs.append([s.out for s in seqs])
    assert outs[0] == outs[1] == [engine.generate([p], max_new_tokens=10)[0].token_ids for p in prompts]
    assert warm.free_slots() == 5
