"""From a validated request body to sequences in the engine loop, and from their events to an OpenAI response
(one JSON body here, or server-sent events by `serve/stream.py`)."""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse

from moetandem.errors import ContextLengthError, InvalidRequestError
from moetandem.sampling import TokenLogprob
from moetandem.serve.chat import ChatPlan, constraint, message
from moetandem.serve.errors import APIError
from moetandem.serve.logprobs import completion_logprobs, text_length
from moetandem.serve.loop import EngineLoop
from moetandem.serve.processors import Penalties, Processor, attach
from moetandem.serve.protocol import CompletionRequest, SamplingParams
from moetandem.serve.scheduler import Draining, EngineDead, NeverFits, QueueFull
from moetandem.serve.scoring import prompt_logprobs
from moetandem.serve.sequence import ERROR_STATUS, Event, Job
from moetandem.serve.stream import Echo, Kind, Stream, shape_logprobs, usage
from moetandem.streaming import TextStream

DISCONNECTED = object()  # put on a request's event queue when its client goes away
MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy decoding
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


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


def processors(loop: EngineLoop, body: SamplingParams, plan: ChatPlan | None, max_new: int) -> list[Processor]:
    """The logits processors of one choice: penalties and logit_bias, then the grammar (if any)."""
    out: list[Processor] = []
    bias = {int(k): float(v) for k, v in (body.logit_bias or {}).items()}
    vocab = int(loop.engine.args.vocab_size)
    if any(t >= vocab for t in bias):
        raise APIError(400, f"logit_bias: token id {max(bias)} is outside the vocabulary (size {vocab})",
                       param="logit_bias")
    if body.presence_penalty or body.frequency_penalty or bias:
        out.append(Penalties(body.presence_penalty or 0.0, body.frequency_penalty or 0.0, bias))
    c = constraint(loop, plan, max_new) if plan is not None else None
    if c is not None:
        out.append(c)
    return out


def make_jobs(loop: EngineLoop, body: SamplingParams, prompts: list[list[int]], param: str,
              plan: ChatPlan | None = None) -> list[Job]:
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
                req.top_logprobs = body.logprob_count()
                attach(req, processors(loop, body, plan, max_new))
                stream = (TextStream(engine.tokenizer, ids, skip_special=not (plan is not None and plan.harmony))
                          if engine.tokenizer is not None else None)
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


async def echo_of(loop: EngineLoop, body: CompletionRequest, prompts: list[list[int]]) -> Echo:
    """The prompts as `echo` shows them (text as sent, token ids decoded) and, with logprobs, their scores."""
    tok = loop.engine.tokenizer
    k = body.logprob_count()
    scored = await prompt_logprobs(loop, prompts, k) if k is not None else None
    with loop.tokenizer_lock:
        texts = [p if isinstance(p, str) else tok.decode(p) if tok is not None else " ".join(map(str, p))
                 for p in body.prompts()]
        shaped = None if scored is None else [completion_logprobs(tok, e, first=ids[0])
                                              for ids, e in zip(prompts, scored)]
    return Echo(texts, shaped)


async def respond(request: HTTPRequest, loop: EngineLoop, model: str, kind: Kind, body: SamplingParams,
                  prompts: list[list[int]], param: str, plan: ChatPlan | None = None) -> Response:
    echo = isinstance(body, CompletionRequest) and body.echo
    if body.max_tokens == 0 and not echo:
        raise APIError(400, "max_tokens 0 generates nothing; it is only allowed with echo (to score the prompt)",
                       param="max_tokens")
    jobs = make_jobs(loop, body, prompts, param, plan)
    echoed = await echo_of(loop, body, prompts) if echo else None  # type: ignore[arg-type]
    if jobs:
        submit(loop, jobs)
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        sse = Stream(loop, model, kind, body, prompts, jobs, rid, created, plan, echoed)
        return StreamingResponse(sse.events(_events(request, loop, jobs) if jobs else None),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    count = len(prompts) * body.n
    texts = [""] * count
    finishes: list[str | None] = [None if jobs else "length"] * count
    generated: list[list[TokenLogprob]] = [[] for _ in range(count)]
    if jobs:
        async with aclosing(_events(request, loop, jobs)) as events:
            async for ev in events:
                texts[ev.choice] += ev.text
                generated[ev.choice] += ev.logprobs or []
                if ev.error is not None:
                    raise APIError(ERROR_STATUS.get(ev.code, 500), ev.error, type="server_error", code=ev.code)
                finishes[ev.choice] = ev.finish
    if any(f is None for f in finishes):
        return Response(status_code=499)  # the client is gone; nobody reads this
    want = body.logprob_count() is not None
    if kind == "chat":
        shaped = [message(plan or ChatPlan(), t, f) for t, f in zip(texts, finishes)]
        choices: list[dict[str, Any]] = [
            {"index": i, "message": msg, "logprobs": shape_logprobs(loop, kind, lp) if want else None,
             "finish_reason": f} for i, ((msg, f), lp) in enumerate(zip(shaped, generated))]
    else:
        choices = []
        for i, (t, f, lp) in enumerate(zip(texts, finishes, generated)):
            head = echoed.logprobs[i // body.n] if echoed is not None and echoed.logprobs is not None else None
            obj = shape_logprobs(loop, kind, lp, text_length(head) if head else 0) if want else None
            if head is not None and obj is not None:
                obj = {key: head[key] + obj[key] for key in obj}
            choices.append({"index": i, "text": (echoed.texts[i // body.n] if echoed else "") + t, "logprobs": obj,
                            "finish_reason": f})
    return JSONResponse({"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                         "created": created, "model": model, "choices": choices, "usage": usage(prompts, jobs)})
