"""Request and response bodies of the OpenAI-compatible API (pydantic models).

Requests are strict about types (``"max_tokens": "10"`` is a 400, not a silent coercion) and lenient about
unknown fields, which are ignored so that newer clients keep working."""
from __future__ import annotations

import math
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_N = 16
MAX_LOGPROBS = 20  # alternatives per token (as vLLM)
MAX_STOPS = 4


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    @field_validator("*", mode="before")
    @classmethod
    def _valid_unicode(cls, v: Any) -> Any:
        """JSON may escape a lone surrogate ("\\ud800"); it is no Unicode text and no tokenizer takes it."""
        if _lone_surrogate(v):
            raise PydanticCustomError("invalid_unicode", "the text holds a lone UTF-16 surrogate (such as \\ud800), "
                                      "which is not valid Unicode")
        return v


def _lone_surrogate(v: Any) -> bool:
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(v, list):
        return any(_lone_surrogate(x) for x in v)
    if isinstance(v, dict):
        return any(_lone_surrogate(x) for x in v.values())
    return False


def integral(v: Any) -> Any:
    """1.0 -> 1: JSON Schema's "integer" is any number with a zero fractional part (2.5, "2" stay errors)."""
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    return v


class StreamOptions(StrictModel):
    include_usage: bool = False


class SamplingParams(StrictModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    model: str | None = Field(None, description="served model id (see /v1/models); may be omitted")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate; default: up to the context end "
                                                           "(chat) or 16 (completions)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False, description="0 = greedy")
    top_p: float = Field(1.0, ge=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="reproducible sampling; choice i uses "
                                                                           "seed + i")
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOPS} strings; the text stops before "
                                                           "the first one produced")
    n: int = Field(1, ge=1, le=MAX_N, description="choices per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="extension: keep generating past end-of-sequence (benchmarks)")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False,
                                           description="accepted and ignored")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False,
                                            description="accepted and ignored")
    user: str | None = None

    _integral = field_validator("max_tokens", "seed", "n", mode="before")(integral)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences are allowed")
        return v

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _has_content(self) -> "ChatMessage":
        if self.content is None and self.role != "assistant":  # assistant: null content (tool calls) is allowed
            raise ValueError(f"a {self.role} message needs content (a string or a list of text parts)")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingParams):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="alias of max_tokens")
    logprobs: bool | None = Field(None, description="return each generated token's log-probability")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="with logprobs: the most likely "
                                                                             "alternatives per token")

    _integral_chat = field_validator("max_completion_tokens", "top_logprobs", mode="before")(integral)

    @model_validator(mode="after")
    def _unsupported(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.logprobs and self.stream:
            raise ValueError("logprobs with stream is not supported by this server; use stream: false")
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingParams):
    prompt: Prompt = Field(..., description="text, token ids, or a list of either (one choice group per prompt)")
    max_tokens: int | None = Field(16, ge=0, description="tokens to generate; 0 only with echo (scoring)")
    echo: bool = Field(False, description="return the prompt before the completion (with its logprobs)")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="return token log-probabilities and "
                                                                         "this many alternatives per token")
    best_of: int | None = None
    suffix: str | None = None

    _integral_completion = field_validator("logprobs", "best_of", mode="before")(integral)

    @model_validator(mode="after")
    def _unsupported(self) -> "CompletionRequest":
        if self.stream and (self.echo or self.logprobs is not None):
            raise ValueError("echo and logprobs with stream are not supported by this server; use stream: false")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported by this server")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            return [[]]  # an empty list is an empty prompt: the engine rejects it with a clear message
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


# ---------------------------------------------------------------- responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "moetandem"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict[str, Any],
               finish_reason: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def completion_chunk(rid: str, created: int, model: str, index: int, text: str,
                     finish_reason: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


class ExpertBudgetRequest(StrictModel):
    """POST /admin/expert-budget: bytes ("6GiB", 123456) or a fraction of all expert bytes (0.5)."""

    budget: str | float | int
