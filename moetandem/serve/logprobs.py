"""Token log-probabilities in OpenAI's two shapes, for a whole choice or one stream chunk's tokens.

Completions (legacy): `{tokens, token_logprobs, top_logprobs, text_offset}`, where an echoed prompt's first token
has `null` logprob and alternatives. Chat: `{"content": [{token, logprob, bytes, top_logprobs}]}`. Entries come
from the sampler (`TokenLogprob`, generated tokens) or the scoring forward (an echoed prompt)."""
from __future__ import annotations

from typing import Any

from moetandem.sampling import TokenLogprob


def token_text(tokenizer: Any, tok: int) -> str:
    return str(tok) if tokenizer is None else tokenizer.decode([tok])


def _top_dict(tokenizer: Any, top: list[tuple[int, float]]) -> dict[str, float]:
    """{text: logprob}, best first. Two ids may decode to the same text (e.g. partial UTF-8 bytes as U+FFFD):
    the better one is kept, so that max(values) is always the best alternative (lm-eval's greedy test)."""
    out: dict[str, float] = {}
    for t, lp in top:
        out.setdefault(token_text(tokenizer, t), lp)
    return out


def completion_logprobs(tokenizer: Any, entries: list[TokenLogprob], first: int | None = None,
                        offset: int = 0) -> dict[str, Any]:
    """The legacy shape. `first`: an echoed prompt's first token, shown before `entries` with null logprob and
    alternatives; text offsets count from `offset` (the length of the choice's text before these tokens)."""
    ids = ([] if first is None else [first]) + [e.token for e in entries]
    tokens = [token_text(tokenizer, t) for t in ids]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    lead: list[Any] = [] if first is None else [None]
    return {"tokens": tokens, "token_logprobs": lead + [e.logprob for e in entries],
            "top_logprobs": lead + [_top_dict(tokenizer, e.top) for e in entries], "text_offset": offsets}


def text_length(shaped: dict[str, Any]) -> int:
    """How far a completions logprobs object moves the text offset."""
    return sum(len(t) for t in shaped["tokens"])


def chat_logprobs(tokenizer: Any, entries: list[TokenLogprob]) -> dict[str, Any]:
    """The chat shape."""
    def entry(t: int, lp: float) -> dict[str, Any]:
        s = token_text(tokenizer, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8", "replace"))}

    return {"content": [{**entry(e.token, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top]}
                        for e in entries]}
