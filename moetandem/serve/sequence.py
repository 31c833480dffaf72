"""One sequence of the server (one choice of one HTTP request): its batcher request, its decoded text, and the
events its HTTP handler receives. Pure bookkeeping; the scheduler decides when a sequence ends."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from moetandem.batcher import Request
from moetandem.sampling import TokenLogprob
from moetandem.streaming import TextStream

#: error codes an Event can carry, and the HTTP status a non-streaming request answers with
ERROR_STATUS = {"engine_error": 500, "server_shutting_down": 503}


class Event(NamedTuple):
    """What a handler receives: new text of choice `choice`; `finish` is set on the last event of that choice.
    With `error` set, `code` is a key of ERROR_STATUS. `logprobs` (None unless the sequence asks for them): those of
    the tokens that completed `text` (they may span several events' worth of held-back text)."""
    choice: int
    text: str
    finish: str | None = None
    error: str | None = None
    code: str = "engine_error"
    logprobs: list[TokenLogprob] | None = None


@dataclass(eq=False)
class Job:
    """One sequence (one choice of one HTTP request) and where its output goes."""
    req: Request
    index: int
    queue: "asyncio.Queue[Any]"
    aloop: asyncio.AbstractEventLoop
    stops: list[str] = field(default_factory=list)
    arrival: float = field(default_factory=time.perf_counter)
    stream: TextStream | None = None
    text: str = ""  # decoded so far
    sent: int = 0  # characters of `text` already handed out
    tokens: int = 0  # tokens counted as generated (up to the one that completed a stop string)
    finish: str | None = None
    last: float = 0.0
    lp_sent: int = 0  # tokens whose logprobs were handed out

    def new_logprobs(self) -> list[TokenLogprob] | None:
        """Logprobs of the counted tokens not handed out yet; None when the sequence does not ask for them."""
        if self.req.top_logprobs is None:
            return None
        out = self.req.logprobs[self.lp_sent: self.tokens]
        self.lp_sent = max(self.lp_sent, self.tokens)
        return out

    def emit(self, event: Event) -> None:
        try:
            self.aloop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the handler's event loop is gone (server shutting down)
            pass

    def add_text(self, tok: int, final: bool) -> None:
        """Decode one more generated token into `text` (callers hold the tokenizer lock)."""
        if self.stream is not None:
            self.text += self.stream.push(tok)
            if final:
                self.text += self.stream.flush()
        else:  # no tokenizer: the text is the token ids, space separated
            self.text += f"{' ' if self.tokens > 1 else ''}{tok}"

    def take(self, final: bool) -> tuple[str, bool]:
        """The text that may be handed out now, and whether it ends at a stop string. Text that might be the
        start of a stop string is held back while the sequence goes on."""
        end, hit = len(self.text), False
        if self.stops:
            at = find_stop(self.text, self.stops, max(0, self.sent - max(map(len, self.stops)) + 1))
            if at is not None:
                end, hit = at, True
            elif not final:
                end -= held_back(self.text, self.stops)
        piece = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece, hit


def find_stop(text: str, stops: list[str], start: int) -> int | None:
    """Index where the earliest stop string begins in text[start:], or None."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string (not sent yet)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
