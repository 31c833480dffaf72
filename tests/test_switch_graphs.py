"""The encoder-decoder decode step over static buffers (graphs.Seq2SeqStep): attending over the whole static cache
with later positions masked gives the logits of a cache read up to the current position, generate through it gives
the tokens of the growing-kv_len loop, and on CUDA the captured graph gives the eager step's tokens."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moetandem
from moetandem.graphs import Seq2SeqStep
from moetandem.models import KVCache
from moetandem.text2text import encode_sources
from test_switch import SOURCES, build


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("switch") / "switch")


@pytest.fixture(scope="module")
def engine(ckpt: Path):
    return moetandem.load(ckpt, device="cpu", dtype="float32", progress=False)


def growing_greedy(engine, sources: list[list[int]], steps: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """The decode loop before static steps: kv_len = t + 1 at step t. Greedy tokens per source and logits per step."""
    model = engine.model
    with torch.inference_mode():
        src, mask = encode_sources(engine, sources)
        cross = model.cross_kv(model.encode(src, mask, engine.experts))
        cache = KVCache(engine.args.decoder_cache(), len(sources), steps, engine.device, engine.dtype)
        tok = torch.full((len(sources), 1), engine.args.decoder_start_token_id, dtype=torch.long)
        outs, logits = [], []
        for t in range(steps):
            pos = torch.full((len(sources), 1), t, dtype=torch.long)
            lg = model.decode(tok, pos, cache, t + 1, cross, mask, engine.experts)[:, -1]
            tok = lg.argmax(dim=-1, keepdim=True)
            outs.append(tok[:, 0].tolist())
            logits.append(lg)
    return [list(col) for col in zip(*outs)], logits


def test_static_step_logits_equal_growing_kv_len(engine) -> None:
    steps = 16
    want_tokens, want_logits = growing_greedy(engine, SOURCES, steps)
    assert all(len(set(t)) > 3 for t in want_tokens), "a degenerate random model would hide mismatches"
    model = engine.model
    with torch.inference_mode():
        src, mask = encode_sources(engine, SOURCES)
        cross = model.cross_kv(model.encode(src, mask, engine.experts))
        cache = KVCache(engine.args.decoder_cache(), len(SOURCES), steps, engine.device, engine.dtype)
        step = Seq2SeqStep(model, engine.experts, cache, cross, mask, engine.args.decoder_start_token_id, False)
        for t in range(steps):
            logits, greedy = step.step()  # greedy: the step feeds itself its argmax
            # equal up to fp32 summation order (the attention reduces over the whole cache, masked keys weigh 0):
            # from one cache state the steps differ by ~4e-7 of the logit scale, compounded over the steps' own
            # K/V by < 1e-5; a key seen too early or a wrong bias would be off by whole logits
            scale = float(want_logits[t].abs().max())
            torch.testing.assert_close(logits, want_logits[t], rtol=0, atol=5e-5 * scale)
            assert greedy == [want_tokens[b][t] for b in range(len(SOURCES))]
        assert step.input_copies == 0 and int(step.pos[0, 0]) == steps
        # the host's tokens replace the argmax when they differ (a finished row's padding, a sampled token)
        step.pos.zero_()  # rewind: the cache has room for `steps` positions
        fed = [greedy[0], engine.args.pad_token_id]
        assert fed != greedy
        _, greedy = step.step(fed)
        assert step.input_copies == 1
        step.step(greedy)  # what the step already fed itself: nothing travels
        assert step.input_copies == 1


def test_generate_tokens_as_the_growing_loop(engine) -> None:
    want, _ = growing_greedy(engine, SOURCES, 16)
    assert [g.token_ids for g in engine.generate(SOURCES, max_new_tokens=16)] == want
    # a seeded sampled row beside a greedy row (hot: this model's logits span hundreds): the greedy row keeps
    # its tokens, the sampled one is reproducible and not greedy
    from moetandem.batcher import Request
    from moetandem.text2text import generate_seq2seq

    def mixed() -> list[list[int]]:
        reqs = [Request(SOURCES[0], 16), Request(SOURCES[1], 16, temperature=100.0, seed=3)]
        generate_seq2seq(engine, reqs)
        return [r.out for r in reqs]

    first = mixed()
    assert first[0] == want[0] and first == mixed() and first[1] != want[1]


def test_captured_work_never_syncs(engine) -> None:
    """What the graph records (the decoder forward over the static cache, its argmax, the next inputs) reads nothing
    back to the host with graph-safe experts (CPU stand-in for a capture)."""
    from test_committee_parts import no_host_sync
    from test_graph_safety import Zeros
    model, zeros = engine.model, Zeros()
    experts = {layer: zeros for layer in engine.experts}
    with torch.inference_mode():
        src, mask = encode_sources(engine, SOURCES)
        cross = model.cross_kv(model.encode(src, mask, experts))
        cache = KVCache(engine.args.decoder_cache(), len(SOURCES), 8, engine.device, engine.dtype)
        step = Seq2SeqStep(model, experts, cache, cross, mask, engine.args.decoder_start_token_id, False)
        with no_host_sync():
            logits = step._step()
    assert logits.shape == (len(SOURCES), engine.args.vocab_size) and torch.isfinite(logits).all()
    assert step.pos[:, 0].tolist() == [1, 1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_generate_equals_eager(ckpt: Path) -> None:
    """bf16: the plain experts run on grouped GEMMs, which are graph-safe (fp32 experts are not: eager step)."""
    graphed = moetandem.load(ckpt, device="cuda", dtype="bfloat16", progress=False)
    eager = moetandem.load(ckpt, device="cuda", dtype="bfloat16", progress=False, use_graphs=False)
    assert graphed.capture_seq2seq and graphed.graph_safe and not eager.capture_seq2seq
    for sources in (SOURCES, SOURCES[:1]):
        for _ in range(2):  # a second call captures anew over its own cache and cross K/V
            got = [g.token_ids for g in graphed.generate(sources, max_new_tokens=24)]
            assert got == [g.token_ids for g in eager.generate(sources, max_new_tokens=24)]
