"""Text-to-text models (encoder-decoder, models/seq2seq.py): generation and teacher-forced scoring.

Generation encodes the batch's sources once (right-padded, a mask keeps padding out of attention and of the
experts), computes each decoder layer's cross-attention K/V once, then decodes all sequences together from the
decoder start token over a static self-attention cache, one token per step (graphs.Seq2SeqStep: a CUDA graph
captured per call on a GPU with graph-safe experts, the same static-buffer step run eagerly otherwise). A sequence
that has finished rides along until the last one does (its tokens are discarded). Continuous batching (the serve
path) is decoder-only."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch

from moetandem.batcher import Request
from moetandem.graphs import Seq2SeqStep
from moetandem.models import KVCache
from moetandem.sampling import sample

if TYPE_CHECKING:
    from moetandem.engine import Engine


def encode_sources(engine: "Engine", sources: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded source ids [B, S] and their mask [B, S] (True = real token)."""
    S = max(len(s) for s in sources)
    ids = torch.full((len(sources), S), engine.args.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(sources), S, dtype=torch.bool)
    for b, s in enumerate(sources):
        ids[b, :len(s)] = torch.tensor(list(s))
        mask[b, :len(s)] = True
    return ids.to(engine.device), mask.to(engine.device)


def _pick(logits: torch.Tensor, r: Request) -> int:
    """One sequence's next token from its logits row [1, V]."""
    if r.temperature > 0:
        try:
            return int(sample(logits, r.temperature, r.top_p, r.generator)[0])
        except RuntimeError:  # non-finite probabilities: greedy, as the batcher does
            pass
    return int(logits.argmax(dim=-1)[0])


def generate_seq2seq(engine: "Engine", requests: list[Request],
                     on_token: Callable[[int, int], None] | None = None) -> tuple[float, float]:
    """Fill each request's `out` / `finish_reason`; returns (encoder seconds, decoder seconds)."""
    model, dev = engine.model, engine.device
    for r in requests:
        if r.seed is not None and r.temperature > 0:
            r.generator = torch.Generator(device=dev).manual_seed(r.seed)
    steps = max(r.max_new_tokens for r in requests)
    with torch.inference_mode():
        t0 = time.perf_counter()
        src, mask = encode_sources(engine, [r.prompt for r in requests])
        enc = model.encode(src, mask, engine.experts)  # [B, S, H]
        engine.after_step()
        cross = model.cross_kv(enc)
        enc_s = engine._sync_time(t0)
        t1 = time.perf_counter()
        cache = KVCache(engine.args.decoder_cache(), len(requests), steps, dev, engine.dtype)
        capture = engine.capture_seq2seq and engine.graph_safe
        step = Seq2SeqStep(model, engine.experts, cache, cross, mask, engine.args.decoder_start_token_id, capture)
        nxt: list[int] | None = None  # None: the start tokens
        for _ in range(steps):
            logits, greedy = step.step(nxt)  # [B, V]: a CUDA-graph output buffer, valid until the next step
            engine.after_step()
            nxt = []
            for b, r in enumerate(requests):
                if r.done:
                    nxt.append(engine.args.pad_token_id)
                    continue
                nxt.append(_pick(logits[b:b + 1].float(), r) if r.temperature > 0 else greedy[b])
                r.out.append(nxt[-1])
                if on_token is not None:
                    on_token(b, nxt[-1])
                if nxt[-1] in r.stop_ids:
                    r.finish_reason = "stop"
                elif len(r.out) >= r.max_new_tokens:
                    r.finish_reason = "length"
            if all(r.done for r in requests):
                break
    return enc_s, engine._sync_time(t1)


def target_logits(engine: "Engine", source: Sequence[int], target: Sequence[int],
                  step: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Teacher forcing: yield (a, logits [b-a, V] float32) for pieces [a, b) of the target, where row i predicts
    target[a + i] given the source and target[:a + i]. The decoder reads [start] + target[:-1]; `step` feeds it in
    pieces of that many tokens over one cache (step=1: what generation sees), else all at once."""
    model, dev = engine.model, engine.device
    src, mask = encode_sources(engine, [source])
    enc = model.encode(src, mask, engine.experts)  # [1, S, H]
    engine.after_step()
    cross = model.cross_kv(enc)
    n = len(target)
    ids = torch.tensor([[engine.args.decoder_start_token_id, *target[:-1]]], device=dev)  # [1, n]
    pos = torch.arange(n, device=dev)[None]  # [1, n]
    cache = KVCache(engine.args.decoder_cache(), 1, n, dev, engine.dtype)
    piece = step or n
    for a in range(0, n, piece):
        b = min(n, a + piece)
        logits = model.decode(ids[:, a:b], pos[:, a:b], cache, b, cross, mask, engine.experts)
        engine.after_step()
        yield a, logits[0].float()
