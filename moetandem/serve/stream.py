"""A response as server-sent events: `data: {chunk}` per piece of text (with its tokens' logprobs when asked), an
echoed prompt first (completions with `echo`), the finish chunk of each choice, the usage chunk when asked, and
`data: [DONE]`."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal

from moetandem.sampling import TokenLogprob
from moetandem.serve.chat import ChatDeltas, ChatPlan
from moetandem.serve.logprobs import chat_logprobs, completion_logprobs, text_length
from moetandem.serve.loop import EngineLoop
from moetandem.serve.protocol import SamplingParams
from moetandem.serve.responses import chat_chunk, completion_chunk
from moetandem.serve.sequence import Event, Job

Kind = Literal["chat", "completion"]


@dataclass
class Echo:
    """What `echo` puts before each prompt's completions: the prompt text and (with logprobs) its tokens'."""
    texts: list[str]
    logprobs: list[dict[str, Any]] | None  # per prompt, completions shape


def usage(prompts: list[list[int]], jobs: list[Job]) -> dict[str, int]:
    p = sum(len(ids) for ids in prompts)
    c = sum(j.tokens for j in jobs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def shape_logprobs(loop: EngineLoop, kind: Kind, entries: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """A choice's (or one chunk's) generated-token logprobs in the endpoint's shape; completions' text offsets
    count from `offset`."""
    with loop.tokenizer_lock:
        if kind == "chat":
            return chat_logprobs(loop.engine.tokenizer, entries)
        return completion_logprobs(loop.engine.tokenizer, entries, offset=offset)


def data(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class Stream:
    """The event stream of one request. A chunk carries the logprobs of the tokens that completed its text; those
    of tokens whose text is still held back (a possible stop string, a tool-call tag, an incomplete character)
    wait for the next chunk, so the chunks' logprobs joined are the non-streamed response's."""

    def __init__(self, loop: EngineLoop, model: str, kind: Kind, body: SamplingParams, prompts: list[list[int]],
                 jobs: list[Job], rid: str, created: int, plan: ChatPlan | None, echo: Echo | None) -> None:
        self.loop, self.model, self.kind, self.body = loop, model, kind, body
        self.prompts, self.jobs, self.rid, self.created, self.echo = prompts, jobs, rid, created, echo
        self.with_usage = body.include_usage()
        self.want = body.logprob_count() is not None
        self.deltas = {j.index: ChatDeltas(plan or ChatPlan()) for j in jobs} if kind == "chat" else {}
        self.pending: dict[int, list[TokenLogprob]] = {}
        self.offsets: dict[int, int] = {}  # completions: text offset of each choice's next token

    def emit(self, obj: dict[str, Any]) -> str:
        if self.with_usage:
            obj["usage"] = None
        return data(obj)

    def _logprobs(self, index: int) -> dict[str, Any] | None:
        """The pending logprobs of choice `index` (None when there are none or none were asked)."""
        entries = self.pending.pop(index, [])
        if not (self.want and entries):
            return None
        shaped = shape_logprobs(self.loop, self.kind, entries, self.offsets.get(index, 0))
        if self.kind != "chat":
            self.offsets[index] = self.offsets.get(index, 0) + text_length(shaped)
        return shaped

    def _completion(self, index: int, text: str, finish: str | None) -> str:
        return self.emit(completion_chunk(self.rid, self.created, self.model, index, text, finish,
                                          self._logprobs(index)))

    def chunks(self, index: int, text: str, finish: str | None) -> Iterator[str]:
        if self.kind != "chat":
            if text or finish is None:
                yield self._completion(index, text, None)
            if finish is not None:
                yield self._completion(index, "", finish)
            return
        d = self.deltas[index]
        for delta in d.feed(text, final=finish is not None):
            yield self.emit(chat_chunk(self.rid, self.created, self.model, index, delta, None,
                                       self._logprobs(index)))
        if finish is not None:
            yield self.emit(chat_chunk(self.rid, self.created, self.model, index, {}, d.finish_reason(finish),
                                       self._logprobs(index)))

    def _echoed(self) -> Iterator[str]:
        assert self.echo is not None
        for i in range(len(self.prompts) * self.body.n):
            lp = None if self.echo.logprobs is None else self.echo.logprobs[i // self.body.n]
            if lp is not None:
                self.offsets[i] = text_length(lp)
            yield self.emit(completion_chunk(self.rid, self.created, self.model, i, self.echo.texts[i // self.body.n],
                                             None, lp))
            if not self.jobs:  # max_tokens 0: the echo is all there is
                yield self.emit(completion_chunk(self.rid, self.created, self.model, i, "", "length", None))

    async def events(self, events: AsyncIterator[Event] | None) -> AsyncIterator[str]:
        """`events`: those of the request's sequences (None when it generates nothing)."""
        if self.kind == "chat":
            for j in self.jobs:
                yield self.emit(chat_chunk(self.rid, self.created, self.model, j.index,
                                           {"role": "assistant", "content": ""}, None))
        if self.echo is not None:
            for c in self._echoed():
                yield c
        ended = 0
        if events is not None:
            async with aclosing(events) as evs:  # type: ignore[type-var]
                async for ev in evs:
                    ended += ev.finish is not None
                    if ev.error is not None:
                        yield data({"error": {"message": ev.error, "type": "server_error", "param": None,
                                              "code": ev.code}})
                        continue
                    self.pending.setdefault(ev.choice, []).extend(ev.logprobs or [])
                    if ev.text or ev.finish is not None:
                        for c in self.chunks(ev.choice, ev.text, ev.finish):
                            yield c
        if ended < len(self.jobs):
            return  # the client left
        if self.with_usage:
            yield data({"id": self.rid, "object": "chat.completion.chunk" if self.kind == "chat" else
                        "text_completion", "created": self.created, "model": self.model, "choices": [],
                        "usage": usage(self.prompts, self.jobs)})
        yield "data: [DONE]\n\n"
