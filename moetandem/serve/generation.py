"""From a validated request body to sequences in the engine loop, and from their events to an OpenAI response
(one JSON body, or server-sent events ending in ``data: [DONE]``)."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any, Literal

from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse

from moetandem.errors import ContextLengthError, InvalidRequestError
from moetandem.serve.errors import APIError
from moetandem.serve.loop import EngineLoop
from moetandem.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingParams,
    chat_chunk,
    completion_chunk,
)
from moetandem.serve.scoring import chat_logprobs, completion_logprobs, score
from moetandem.serve.scheduler import Draining, EngineDead, NeverFits, QueueFull
from moetandem.serve.sequence import ERROR_STATUS, Event, Job
from moetandem.streaming import TextStream

Kind = Literal["chat", "completion"]
DISCONNECTED = object()  # put on a request's event queue when its client goes away
MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy decoding
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def chat_prompt(loop: EngineLoop, body: ChatCompletionRequest) -> list[int]:
    tok = loop.engine.tokenizer
    if tok is None:
        raise APIError(400, "this model ships no tokenizer, so it cannot take chat messages; use /v1/completions "
                            "with token ids", param="messages")
    if not getattr(tok, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    with loop.tokenizer_lock:
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # a template may raise, e.g. on roles that do not alternate
            raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from None
        return list(tok(text, add_special_tokens=False)["input_ids"])  # the template holds BOS itself


def completion_prompts(loop: EngineLoop, body: CompletionRequest) -> list[list[int]]:
    tok = loop.engine.tokenizer
    out: list[list[int]] = []
    for p in body.prompts():
        if isinstance(p, str):
            if tok is None:
                raise APIError(400, "this model ships no tokenizer; send the prompt as token ids", param="prompt")
            if not p:
                raise APIError(400, "the prompt is empty", param="prompt")
            with loop.tokenizer_lock:
                out.append(list(tok(p)["input_ids"]))
        else:
            out.append(list(p))
    return out


def make_jobs(loop: EngineLoop, body: SamplingParams, prompts: list[list[int]], param: str) -> list[Job]:
    """Validate and build one Job per (prompt, choice); raises APIError (400) on a bad value."""
    engine = loop.engine
    temperature, top_p = body.temperature, body.top_p
    if top_p == 0.0 or temperature < MIN_TEMPERATURE:  # limits of sampling: only the most likely token (and
        temperature, top_p = 0.0, 1.0  # logits / 1e-300 would overflow to inf - inf = NaN in the sampler)
    queue: asyncio.Queue[Any] = asyncio.Queue()
    aloop = asyncio.get_running_loop()
    stops = body.stop_strings()
    jobs: list[Job] = []
    for p, ids in enumerate(prompts):
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        max_new = body.max_tokens if body.max_tokens is not None else loop.max_len - len(ids)
        try:
            if max_new == 0:  # echo only (scoring): nothing to generate, but the prompt must be valid
                engine.encode(ids)
                if len(ids) > loop.max_len:
                    raise ContextLengthError(f"this model's maximum context length is {loop.max_len} tokens; the "
                                             f"prompt has {len(ids)} tokens")
                continue
            if max_new < 1 or len(ids) + max_new > loop.max_len:
                raise ContextLengthError(
                    f"this model's maximum context length is {loop.max_len} tokens; the prompt has {len(ids)} "
                    f"tokens and {max_new if max_new >= 1 else 'at least 1'} completion tokens were requested")
            for k in range(body.n):
                seed = None if body.seed is None else (body.seed + k) % 2**64
                req = engine.make_sequence(ids, max_new, temperature, top_p, seed, stop_on_eos=not body.ignore_eos)
                stream = TextStream(engine.tokenizer, ids) if engine.tokenizer is not None else None
                jobs.append(Job(req, p * body.n + k, queue, aloop, stops, stream=stream))
        except ContextLengthError as e:
            raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
        except InvalidRequestError as e:
            raise APIError(400, str(e), param=param) from None
    return jobs


def submit(loop: EngineLoop, jobs: list[Job]) -> None:
    try:
        loop.submit(jobs)
    except NeverFits as e:
        raise APIError(400, str(e), param="n", code="too_many_sequences") from None
    except QueueFull as e:
        raise APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": "1"}) from None
    except Draining as e:
        raise APIError(503, f"{e}; retry on another replica or after the restart", type="server_error",
                       code="server_shutting_down", headers={"Retry-After": "5"}) from None
    except EngineDead as e:
        raise APIError(503, f"the engine is not running ({e})", type="server_error", code="engine_unavailable",
                       headers={"Retry-After": "5"}) from None


async def _watch_disconnect(request: HTTPRequest, queue: asyncio.Queue[Any]) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            queue.put_nowait(DISCONNECTED)
            return


async def _events(request: HTTPRequest, loop: EngineLoop, jobs: list[Job]) -> AsyncGenerator[Event, None]:
    """Events of all choices until each has finished; the sequences are cancelled if the client leaves or the
    consumer stops early (including task cancellation)."""
    queue = jobs[0].queue
    watcher = asyncio.create_task(_watch_disconnect(request, queue))
    remaining = len(jobs)
    try:
        while remaining:
            ev = await queue.get()
            if ev is DISCONNECTED:
                return
            if ev.finish is not None:
                remaining -= 1
            yield ev
    finally:
        watcher.cancel()
        if remaining:
            loop.cancel(jobs)


def usage(prompts: list[list[int]], jobs: list[Job]) -> dict[str, int]:
    p = sum(len(ids) for ids in prompts)
    c = sum(j.tokens for j in jobs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def respond(request: HTTPRequest, loop: EngineLoop, model: str, kind: Kind, body: SamplingParams,
                  prompts: list[list[int]], param: str) -> Response:
    echo = isinstance(body, CompletionRequest) and body.echo
    if body.max_tokens == 0 and not echo:
        raise APIError(400, "max_tokens 0 generates nothing; it is only allowed with echo (to score the prompt)",
                       param="max_tokens")
    jobs = make_jobs(loop, body, prompts, param)
    if jobs:
        submit(loop, jobs)
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        return StreamingResponse(_sse(request, loop, model, kind, body, prompts, jobs, rid, created),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    count = len(prompts) * body.n
    texts = [""] * count
    finishes: list[str | None] = [None if jobs else "length"] * count
    if jobs:
        async with aclosing(_events(request, loop, jobs)) as events:
            async for ev in events:
                texts[ev.choice] += ev.text
                if ev.error is not None:
                    raise APIError(ERROR_STATUS.get(ev.code, 500), ev.error, type="server_error", code=ev.code)
                finishes[ev.choice] = ev.finish
    if any(f is None for f in finishes):
        return Response(status_code=499)  # the client is gone; nobody reads this
    logprobs = await _logprobs(loop, kind, body, prompts, jobs)
    if kind == "chat":
        choices: list[dict[str, Any]] = [
            {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": lp, "finish_reason": f}
            for i, (t, f, lp) in enumerate(zip(texts, finishes, logprobs))]
    else:
        if echo:
            shown = _prompt_texts(loop, body)  # type: ignore[arg-type]
            texts = [shown[i // body.n] + t for i, t in enumerate(texts)]
        choices = [{"index": i, "text": t, "logprobs": lp, "finish_reason": f}
                   for i, (t, f, lp) in enumerate(zip(texts, finishes, logprobs))]
    return JSONResponse({"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                         "created": created, "model": model, "choices": choices, "usage": usage(prompts, jobs)})


async def _logprobs(loop: EngineLoop, kind: Kind, body: SamplingParams, prompts: list[list[int]],
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


def _prompt_texts(loop: EngineLoop, body: CompletionRequest) -> list[str]:
    """The prompts as `echo` shows them: text as sent, token ids decoded."""
    tok = loop.engine.tokenizer
    with loop.tokenizer_lock:
        return [p if isinstance(p, str) else tok.decode(p) if tok is not None else " ".join(map(str, p))
                for p in body.prompts()]


def _data(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _sse(request: HTTPRequest, loop: EngineLoop, model: str, kind: Kind, body: SamplingParams,
               prompts: list[list[int]], jobs: list[Job], rid: str, created: int) -> AsyncIterator[str]:
    with_usage = body.include_usage()

    def chunk(index: int, text: str, finish: str | None, first: bool = False) -> str:
        if kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else \
                ({"content": text} if finish is None else {})
            obj = chat_chunk(rid, created, model, index, delta, finish)
        else:
            obj = completion_chunk(rid, created, model, index, text, finish)
        if with_usage:
            obj["usage"] = None
        return _data(obj)

    if kind == "chat":
        for j in jobs:
            yield chunk(j.index, "", None, first=True)
    ended = 0
    async with aclosing(_events(request, loop, jobs)) as events:
        async for ev in events:
            ended += ev.finish is not None
            if ev.error is not None:
                yield _data({"error": {"message": ev.error, "type": "server_error", "param": None,
                                       "code": ev.code}})
                continue
            if ev.text:
                yield chunk(ev.choice, ev.text, None)
            if ev.finish is not None:
                yield chunk(ev.choice, "", ev.finish)
    if ended < len(jobs):
        return  # the client left
    if with_usage:
        yield _data({"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                     "created": created, "model": model, "choices": [], "usage": usage(prompts, jobs)})
    yield "data: [DONE]\n\n"
