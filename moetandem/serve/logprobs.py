"""Token log-probabilities in OpenAI's two shapes, for a whole choice or one stream chunk's tokens.

Completions (legacy): `{tokens, token_logprobs, top_logprobs, text_offset}`, where an echoed prompt's first token
has `null` logprob and alternatives. Chat: `{"content": [{token, logprob, bytes, top_logprobs}]}`. Entries come
from the sampler (`TokenLogprob`, generated tokens) or the scoring forward (an echoed prompt)."""
from __future__ import annotations

import functools
import re
from typing import Any

from moetandem.sampling import TokenLogprob


def token_text(tokenizer: Any, tok: int) -> str:
    return str(tok) if tokenizer is None else tokenizer.decode([tok])


@functools.cache
def _byte_level() -> dict[str, int]:
    """GPT-2's byte-level alphabet (a printable character per byte) -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {chr(b): b for b in printable}, 0
    for b in range(256):
        if b not in printable:
            out[chr(256 + extra)] = b
            extra += 1
    return out


def token_bytes(tokenizer: Any, tok: int, text: str) -> list[int]:
    """The token's own bytes. A token holding part of a UTF-8 character decodes to U+FFFD; then its bytes come
    from the vocabulary entry: byte-level BPE ("Ġ" = space, ...) or SentencePiece byte fallback ("<0xE2>")."""
    if "\ufffd" in text and tokenizer is not None:
        piece = tokenizer.convert_ids_to_tokens(tok)
        if isinstance(piece, str):
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
                return [int(piece[3:5], 16)]
            table = _byte_level()
            if piece and all(c in table for c in piece):
                return [table[c] for c in piece]
    return list(text.encode("utf-8", "replace"))


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
        return {"token": s, "logprob": lp, "bytes": token_bytes(tokenizer, t, s)}

    return {"content": [{**entry(e.token, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top]}
                        for e in entries]}
