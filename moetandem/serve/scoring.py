"""Token log-probabilities for `logprobs` / `top_logprobs` / `echo`: one full forward of prompt + completion.

The batcher keeps only each step's sampled token, so the server scores a finished sequence again: one padded
forward that returns logits at every position ([B, L, V], `last_only=None`) in a KV cache of its own, run on the
engine thread between decode steps (`EngineLoop.call`). The log-probabilities are the model's own distribution
(temperature 1, no top-p), as OpenAI and vLLM report them; with an expert committee they are what the committee
computes."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import torch

from moetandem.models import KVCache
from moetandem.serve.errors import APIError
from moetandem.serve.loop import EngineLoop
from moetandem.serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingParams
from moetandem.serve.scheduler import EngineDead
from moetandem.serve.sequence import Job

MAX_LOGPROBS = 20  # top alternatives per token


@dataclass
class Scores:
    """Of a sequence of L tokens: logprob[i] and top[i] belong to token i + 1 given tokens 0..i."""
    logprob: list[float]  # [L - 1]
    top: list[list[tuple[int, float]]]  # [L - 1][k], best first


@torch.inference_mode()
def score(engine: Any, seqs: list[list[int]], k: int, batch: int = 8) -> list[Scores]:
    """Log-probability of every token of each sequence but the first, and the k most likely alternatives."""
    out: list[Scores] = []
    for b0 in range(0, len(seqs), batch):
        out += _score_batch(engine, seqs[b0: b0 + batch], k)
    return out


def _score_batch(engine: Any, seqs: list[list[int]], k: int) -> list[Scores]:
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
    if k > 0:
        top_v, top_i = logp.topk(k, dim=-1)  # [n, L-1, k]
        tv, ti = top_v.tolist(), top_i.tolist()
    res = []
    for b, m in enumerate(lens):
        tops = [list(zip(ti[b][i], tv[b][i])) for i in range(m - 1)] if k > 0 else [[] for _ in range(m - 1)]
        res.append(Scores(chosen[b][: m - 1], tops))
    return res


def token_text(tokenizer: Any, tok: int) -> str:
    return str(tok) if tokenizer is None else tokenizer.decode([tok])


def completion_logprobs(tokenizer: Any, ids: list[int], sc: Scores, first: int, k: int) -> dict[str, Any]:
    """The legacy completions shape for tokens ids[first:] (first = 0 with echo: the first token has no
    logprob, None as in OpenAI's answers)."""
    tokens = [token_text(tokenizer, t) for t in ids[first:]]
    lps: list[float | None] = [None if i == 0 else sc.logprob[i - 1] for i in range(first, len(ids))]
    tops: list[dict[str, float] | None] = [None if i == 0 else _top_dict(tokenizer, sc.top[i - 1][:k])
                                           for i in range(first, len(ids))]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _top_dict(tokenizer: Any, top: list[tuple[int, float]]) -> dict[str, float]:
    """{text: logprob}, best first. Two ids may decode to the same text (e.g. partial UTF-8 bytes as U+FFFD):
    the better one is kept, so that max(values) is always the best alternative (lm-eval's greedy test)."""
    out: dict[str, float] = {}
    for t, lp in top:
        out.setdefault(token_text(tokenizer, t), lp)
    return out


def chat_logprobs(tokenizer: Any, ids: list[int], sc: Scores, first: int, k: int) -> dict[str, Any]:
    """The chat shape: {"content": [{token, logprob, bytes, top_logprobs}]} for tokens ids[first:] (first > 0)."""
    def entry(t: int, lp: float) -> dict[str, Any]:
        s = token_text(tokenizer, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8", "replace"))}

    return {"content": [{**entry(ids[i], sc.logprob[i - 1]),
                         "top_logprobs": [entry(t, lp) for t, lp in sc.top[i - 1][:k]]}
                        for i in range(first, len(ids))]}


async def request_logprobs(loop: EngineLoop, kind: str, body: SamplingParams, prompts: list[list[int]],
                    jobs: list[Job]) -> list[dict[str, Any] | None]:
    """Per choice: the `logprobs` object when the request asked for one (one scoring forward), else None."""
    count = len(prompts) * body.n
    if isinstance(body, ChatCompletionRequest):
        want, k = bool(body.logprobs), body.top_logprobs or 0
    else:
        assert isinstance(body, CompletionRequest)
        want, k = body.logprobs is not None, body.logprobs or 0
    if not want:
        return [None] * count
    engine = loop.engine
    if getattr(engine, "split", None) is not None:
        raise APIError(400, "logprobs are not available with split execution yet", param="logprobs")
    by_index = {j.index: j.req.out[: j.tokens] for j in jobs}
    seqs = [prompts[i // body.n] + by_index.get(i, []) for i in range(count)]
    try:
        scores = await asyncio.wrap_future(loop.call(lambda: score(engine, seqs, k)))
    except EngineDead as e:
        raise APIError(503, f"the engine is not running ({e})", type="server_error", code="engine_unavailable",
                       headers={"Retry-After": "5"}) from None
    except Exception as e:
        raise APIError(500, f"internal engine error while scoring: {type(e).__name__}: {e}", type="server_error",
                       code="engine_error") from None
    echo = isinstance(body, CompletionRequest) and body.echo
    shape = chat_logprobs if kind == "chat" else completion_logprobs
    with loop.tokenizer_lock:
        return [shape(engine.tokenizer, ids, sc, 0 if echo else len(prompts[i // body.n]), k)
                for i, (ids, sc) in enumerate(zip(seqs, scores))]
