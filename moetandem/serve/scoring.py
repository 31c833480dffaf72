"""Prompt log-probabilities for `echo` with `logprobs` (lm-eval's loglikelihood requests): one full forward of the
prompts.

Generated tokens get theirs from the sampler's own logits (`Request.top_logprobs`, `moetandem/batcher.py`); a
prompt's tokens are never sampled, so the server scores them: one padded forward that returns logits at every
position ([B, L, V], `last_only=None`) in a KV cache of its own, run on the engine thread between decode steps
(`EngineLoop.call`). The values are the model's raw distribution (temperature 1, no top-p, no processors), the same
quantity the sampler reports for generated tokens; with an expert committee they are what the committee computes."""
from __future__ import annotations

import asyncio
from typing import Any

import torch

from moetandem.models import KVCache
from moetandem.sampling import TokenLogprob
from moetandem.serve.errors import APIError
from moetandem.serve.loop import EngineLoop
from moetandem.serve.scheduler import EngineDead

#: a prompt's entries: one per token but the first (nothing comes before it)
PromptLogprobs = list[TokenLogprob]


@torch.inference_mode()
def score(engine: Any, seqs: list[list[int]], k: int, batch: int = 8) -> list[PromptLogprobs]:
    """Log-probability of every token of each sequence but the first, with the k most likely alternatives."""
    out: list[PromptLogprobs] = []
    for b0 in range(0, len(seqs), batch):
        out += _score_batch(engine, seqs[b0: b0 + batch], k)
    return out


def _score_batch(engine: Any, seqs: list[list[int]], k: int) -> list[PromptLogprobs]:
    dev = engine.device
    lens = [len(s) for s in seqs]
    n, L = len(seqs), max(lens)
    ids = torch.zeros(n, L, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : lens[b]] = torch.tensor(s)
    ids = ids.to(dev)  # [n, L], right-padded
    pos = torch.arange(L, device=dev).expand(n, L)  # [n, L]
    valid = pos < torch.tensor(lens, device=dev)[:, None] if min(lens) != L else None  # [n, L]
    cache = KVCache(engine.args, n, L, dev, engine.dtype)  # its own: the batcher's slots stay untouched
    logits = engine.forward(ids, pos, cache, L, valid=valid)  # [n, L, V]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [n, L-1, V]: next-token distributions
    chosen = logp.gather(-1, ids[:, 1:, None]).squeeze(-1).tolist()  # [n, L-1]
    tv, ti = logp.topk(k, dim=-1) if k > 0 else (logp[..., :0], ids[:, 1:, None][..., :0])  # [n, L-1, k]
    tv, ti = tv.tolist(), ti.tolist()
    return [[TokenLogprob(s[i + 1], chosen[b][i], list(zip(ti[b][i], tv[b][i]))) for i in range(m - 1)]
            for b, (s, m) in enumerate(zip(seqs, lens))]


async def prompt_logprobs(loop: EngineLoop, prompts: list[list[int]], k: int) -> list[PromptLogprobs]:
    """Score `prompts` on the engine thread; errors as APIError."""
    engine = loop.engine
    if getattr(engine, "split", None) is not None:
        raise APIError(400, "prompt logprobs (echo with logprobs) are not available with split execution yet",
                       param="echo")
    try:
        return await asyncio.wrap_future(loop.call(lambda: score(engine, prompts, k)))
    except EngineDead as e:
        raise APIError(503, f"the engine is not running ({e})", type="server_error", code="engine_unavailable",
                       headers={"Retry-After": "5"}) from None
    except Exception as e:
        raise APIError(500, f"internal engine error while scoring: {type(e).__name__}: {e}", type="server_error",
                       code="engine_error") from None
