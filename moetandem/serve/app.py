"""The FastAPI app: OpenAI-compatible endpoints, /health, /metrics, API-key check, OpenAI-shaped errors."""
from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moetandem.serve.errors import APIError, error_response, type_for_status
from moetandem.serve.chat import chat_prompt, plan_chat
from moetandem.serve.generation import completion_prompts, respond
from moetandem.serve.loop import EngineLoop
from moetandem.serve.metrics import ServerMetrics
from moetandem.serve.protocol import ChatCompletionRequest, CompletionRequest, ExpertBudgetRequest
from moetandem.serve.responses import ErrorResponse, ModelCard, ModelList

log = logging.getLogger("moetandem.serve")
KNOWN_PATHS = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}
BODY_PARSE_ERROR = "There was an error parsing the body"  # fastapi.routing's detail when the body will not decode
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 503)}


class ServerState:
    """What the routes share: the engine loop once loaded, its status, the served model id, the API key."""

    def __init__(self, model_id: str, api_key: str | None, metrics: ServerMetrics, loop_kwargs: dict[str, Any],
                 drain_timeout: float = 30.0):
        self.model_id, self.api_key, self.metrics, self.loop_kwargs = model_id, api_key, metrics, loop_kwargs
        self.drain_timeout = drain_timeout
        self.loop: EngineLoop | None = None
        self.load_error: str | None = None
        self.draining = False

    def attach(self, engine: Any) -> None:
        loop = EngineLoop(engine, metrics=self.metrics, **self.loop_kwargs)
        t = time.perf_counter()
        # before /health says ready: no request waits for a graph capture (seconds per batch size on a GPU); a
        # failure here (e.g. no memory for the largest batch's graph) is logged and serving starts anyway: the
        # batch sizes not prepared are captured at first use, as without the warm-up
        try:
            sizes = loop.batcher.warm_up(lambda a, s: log.info("decode step for batch size %d prepared in %.1f s",
                                                               a, s))
        except Exception as e:  # noqa: BLE001 - the server must still start
            log.warning("preparing the decode steps failed (%s: %s); they are prepared at first use instead",
                        type(e).__name__, e)
            sizes = []
        if sizes:
            log.info("decode steps prepared for batch sizes %s in %.1f s", sizes, time.perf_counter() - t)
        loop.start()
        self.loop = loop

    def load(self, loader: Callable[[], Any]) -> None:
        try:
            self.attach(loader())
        except BaseException as e:  # reported by /health
            log.exception("loading the model failed")
            self.load_error = f"{type(e).__name__}: {e}"

    async def drain(self, timeout: float | None = None) -> bool:
        """Graceful shutdown, first half: refuse new requests (503 `server_shutting_down`), let running ones
        finish for up to `timeout` s (default: drain_timeout), then end the rest (a stream gets an error event and
        [DONE]). True when everything finished in time. uvicorn closes the connections afterwards."""
        self.draining = True
        loop = self.loop
        if loop is None:
            return True
        return await asyncio.to_thread(loop.drain, self.drain_timeout if timeout is None else timeout)

    def health(self) -> tuple[int, dict[str, Any]]:
        if self.draining:
            return 503, {"status": "draining", "detail": "the server is shutting down"}
        if self.load_error is not None:
            return 503, {"status": "error", "detail": f"loading the model failed: {self.load_error}"}
        if self.loop is None:
            return 503, {"status": "loading"}
        problem = self.loop.status()
        if problem is not None:
            return 503, {"status": "error", "detail": problem}
        return 200, {"status": "ok", "model": self.model_id, "running": len(self.loop.running),
                     "waiting": len(self.loop.waiting)}

    def ready_loop(self) -> EngineLoop:
        status, info = self.health()
        if status != 200 or self.loop is None:
            code = {"loading": "model_loading", "draining": "server_shutting_down"}.get(info["status"],
                                                                                      "engine_unavailable")
            raise APIError(503, f"the server is not ready: {info.get('detail', info['status'])}",
                           type="server_error", code=code, headers={"Retry-After": "5"})
        return self.loop

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_id:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_id!r}",
                           param="model", code="model_not_found")


class GateMiddleware:
    """API-key check for everything but /health and a body-size limit (both before the body is read), and
    HTTP request counts."""

    def __init__(self, app: ASGIApp, state: ServerState, max_body_bytes: int) -> None:
        self.app, self.state, self.max_body = app, state, max_body_bytes
        self.expected = f"Bearer {state.api_key}".encode() if state.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        status = [500]

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.expected is not None and path != "/health" and not self._authorized(scope):
                await error_response(401, "missing or invalid API key: send the header 'Authorization: Bearer "
                                          "<key>'", code="invalid_api_key",
                                     headers={"WWW-Authenticate": "Bearer"})(scope, receive, counting_send)
                return
            length = next((v for k, v in scope["headers"] if k == b"content-length"), b"0")
            if length.isdigit() and int(length) > self.max_body:
                await error_response(413, f"the request body is {int(length)} bytes; the limit is {self.max_body}",
                                     code="request_too_large")(scope, receive, counting_send)
                return
            await self.app(scope, receive, counting_send)
        finally:
            label = path if path in KNOWN_PATHS else "other"
            self.state.metrics.http_requests.labels(label, str(status[0])).inc()

    def _authorized(self, scope: Scope) -> bool:
        got = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = got.partition(b" ")
        given = b"Bearer " + token.strip() if scheme.lower() == b"bearer" else b""
        return self.expected is not None and hmac.compare_digest(given, self.expected)


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    errors = list(exc.errors()) if isinstance(exc, RequestValidationError) else []
    bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if bad_json is not None:
        why = bad_json.get("ctx", {}).get("error", "")
        return error_response(400, f"the request body is not valid JSON{f' ({why})' if why else ''}",
                              code="invalid_json")
    if any(tuple(e.get("loc", ())) == ("body",) and e.get("type") in ("model_attributes_type", "dict_type",
                                                                      "missing") for e in errors):
        ctype = request.headers.get("content-type", "")
        hint = "" if "json" in ctype else " with the header 'Content-Type: application/json'"
        return error_response(400, f"the request body must be a JSON object{hint}", code="invalid_body")
    by_param: dict[str, list[dict[str, Any]]] = {}
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        by_param.setdefault(loc[0] if loc else "", []).append({**e, "where": ".".join(loc)})
    parts = []
    for param, errs in by_param.items():
        msg = str(errs[0].get("msg", "invalid value")).removeprefix("Value error, ")
        if len(errs) > 1 and param:  # a union type: every alternative failed
            msg = f"invalid type or value ({len(errs)} alternatives failed; first: {msg})"
            parts.append(f"{param}: {msg}")
        else:
            parts.append(f"{errs[0]['where']}: {msg}" if errs[0]["where"] else msg)
    first = next(iter(by_param), "")
    code = "invalid_unicode" if any(e.get("type") == "invalid_unicode" for e in errors) else None
    return error_response(400, "; ".join(parts[:3]) or "invalid request", param=first or None, code=code)


def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and exc.detail == BODY_PARSE_ERROR:  # FastAPI: json.loads raised, not on syntax
        return error_response(400, "the request body could not be read as JSON text: it must be UTF-8 (raw bytes "
                                   "that are not UTF-8 are refused)", code="invalid_encoding")
    return error_response(exc.status_code, str(exc.detail), type_for_status(exc.status_code),
                          headers=getattr(exc, "headers", None))


def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, f"internal server error: {type(exc).__name__}", "server_error")


def create_app(engine: Any | None = None, *, loader: Callable[[], Any] | None = None, model_id: str = "moetandem",
               api_key: str | None = None, max_batch: int = 8, max_waiting: int = 64,
               max_model_len: int | None = None, max_body_bytes: int = 8 << 20,
               drain_timeout: float = 30.0) -> FastAPI:
    """The server app. Pass a loaded `engine`, or a `loader` that builds one in a background thread (/health
    answers 503 "loading" meanwhile). The engine thread starts with the app (lifespan) and stops with it.
    Graceful shutdown: `await app.state.server.drain()` before the server closes connections (what
    `server_thread.DrainingServer` does on SIGTERM); in-flight requests get up to `drain_timeout` s."""
    if (engine is None) == (loader is None):
        raise ValueError("pass exactly one of engine, loader")
    state = ServerState(model_id, api_key or None, ServerMetrics(),
                        {"max_batch": max_batch, "max_waiting": max_waiting, "max_len": max_model_len},
                        drain_timeout)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if engine is not None:
            state.attach(engine)
        else:
            assert loader is not None
            threading.Thread(target=state.load, args=(loader,), name="moetandem-load", daemon=True).start()
        yield
        if state.loop is not None:  # uvicorn has closed every connection by now (drained or cut)
            await state.drain(0.0)  # no-op after a DrainingServer's drain; else ends what is left
            state.loop.stop()

    app = FastAPI(title="moetandem", summary="OpenAI-compatible MoE inference server", lifespan=lifespan)
    app.state.server = state
    app.add_middleware(GateMiddleware, state=state, max_body_bytes=max_body_bytes)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(Exception, _internal_error)

    @app.get("/health", summary="200 when ready; 503 while loading or when the engine thread is dead")
    def health() -> JSONResponse:
        status, info = state.health()
        return JSONResponse(info, status_code=status)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def card() -> ModelCard:
        return ModelCard(id=state.model_id, max_model_len=state.loop.max_len if state.loop else None)

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    def models() -> ModelList:
        return ModelList(data=[card()])

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=ERRORS)
    def model(model: str) -> ModelCard:
        state.check_model(model)
        return card()

    @app.post("/v1/chat/completions", responses=ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        state.check_model(body.model)
        loop = state.ready_loop()
        plan = plan_chat(loop, body)
        return await respond(request, loop, state.model_id, "chat", body, [chat_prompt(loop, body, plan)],
                             "messages", plan)

    @app.post("/v1/completions", responses=ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        state.check_model(body.model)
        loop = state.ready_loop()
        return await respond(request, loop, state.model_id, "completion", body, completion_prompts(loop, body),
                             "prompt")

    @app.post("/admin/expert-budget", responses=ERRORS,
              summary="change the expert budget live (between decode steps); protected by the API key")
    async def expert_budget(body: ExpertBudgetRequest) -> JSONResponse:
        import asyncio

        from moetandem.errors import MoetandemError
        loop = state.ready_loop()
        engine = loop.engine
        try:
            await asyncio.wrap_future(loop.call(lambda: engine.set_expert_budget(body.budget)))
        except MoetandemError as e:
            raise APIError(400, str(e), param="budget", code="invalid_expert_budget") from None
        except Exception as e:  # e.g. out of device memory for the new slots: the engine keeps serving
            raise APIError(500, f"the expert budget change failed ({type(e).__name__}: {e}); the committee holds "
                                f"{engine.provider.expert_bytes()} bytes of experts now", type="server_error",
                           param="budget", code="expert_budget_failed") from None
        return JSONResponse({"budget_bytes": engine.provider.budget_bytes,
                             "resident_expert_bytes": engine.provider.expert_bytes()})

    return app
