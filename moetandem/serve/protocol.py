"""Request and response bodies of the OpenAI-compatible API (pydantic models).

Requests are strict about types (``"max_tokens": "10"`` is a 400, not a silent coercion) and lenient about
unknown fields, which are ignored so that newer clients keep working."""
from __future__ import annotations

import math
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
                                           description="subtracted from the logit of every token generated so far")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False,
                                            description="subtracted once per earlier occurrence of a token")
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> bias in [-100, 100] "
                                                                   "added to its logit")
    user: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for k, b in (v or {}).items():
            if not k.isdigit():
                raise ValueError(f"logit_bias keys are token ids as strings, got {k!r}")
            if not (math.isfinite(b) and -100 <= b <= 100):
                raise ValueError(f"logit_bias values must be in [-100, 100], got {b}")
        return v

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

    def logprob_count(self) -> int | None:
        """Alternatives per token when logprobs are asked, else None (the endpoints say how they are asked)."""
        return None


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class FunctionCall(StrictModel):
    name: str
    arguments: str = Field(..., description="JSON text")


class ToolCall(StrictModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="assistant: the calls it made")
    tool_call_id: str | None = Field(None, description="tool: the call this message answers")

    @model_validator(mode="after")
    def _has_content(self) -> "ChatMessage":
        if self.content is None and self.role != "assistant":  # assistant: null content (tool calls) is allowed
            raise ValueError(f"a {self.role} message needs content (a string or a list of text parts)")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class FunctionDef(StrictModel):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON schema of the arguments")
    strict: bool | None = None


class ToolDef(StrictModel):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: FunctionName


class JSONSchemaFormat(StrictModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        return self


#: chat fields of OpenAI's API this server refuses (400) rather than silently ignore
REFUSED_CHAT = {"functions": "use tools", "function_call": "use tool_choice", "audio": None,
                "reasoning_effort": None, "web_search_options": None, "prediction": None}


class ChatCompletionRequest(SamplingParams):
    messages: list[ChatMessage] = Field(..., min_length=1)
    tools: list[ToolDef] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    modalities: list[Literal["text"]] | None = Field(None, description="only text")
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    prediction: Any = None
    max_completion_tokens: int | None = Field(None, ge=1, description="alias of max_tokens")
    logprobs: bool | None = Field(None, description="return each generated token's log-probability")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="with logprobs: the most likely "
                                                                             "alternatives per token")

    _integral_chat = field_validator("max_completion_tokens", "top_logprobs", mode="before")(integral)

    @model_validator(mode="after")
    def _unsupported(self) -> "ChatCompletionRequest":
        for name, hint in REFUSED_CHAT.items():
            if getattr(self, name) is not None:
                raise ValueError(f"{name} is not supported by this server{f'; {hint}' if hint else ''}")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise ValueError("tools: function names must be unique")
        choice = self.tool_choice
        if choice not in (None, "none") and not names:
            raise ValueError("tool_choice needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names the function {choice.function.name!r}, which is not in tools")
        fmt = self.response_format
        if fmt is not None and fmt.type != "text" and names and choice != "none":
            raise ValueError("response_format json_object/json_schema together with tools is not supported; "
                             "use one or the other (or tool_choice: none)")
        if fmt is not None and fmt.type != "text" and self.ignore_eos:
            raise ValueError("response_format with ignore_eos is not supported")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self

    def logprob_count(self) -> int | None:
        """Alternatives per generated token; None: no logprobs asked."""
        return (self.top_logprobs or 0) if self.logprobs else None


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
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported by this server")
        return self

    def logprob_count(self) -> int | None:
        """Alternatives per token; None: no logprobs asked."""
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            return [[]]  # an empty list is an empty prompt: the engine rejects it with a clear message
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ExpertBudgetRequest(StrictModel):
    """POST /admin/expert-budget: bytes ("6GiB", 123456) or a fraction of all expert bytes (0.5)."""

    budget: str | float | int
