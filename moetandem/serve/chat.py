"""Chat requests beyond plain text: the prompt through the model's own chat template (with `tools` and earlier
tool calls / results), the grammar a choice is held to (`response_format`, `tool_choice: required` or a named
function), and the assistant message or stream deltas made from the generated text (content and `tool_calls`)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from moetandem.serve.errors import APIError
from moetandem.serve.harmony import HarmonyParser, is_harmony
from moetandem.serve.harmony import parse_all as parse_harmony
from moetandem.serve.loop import EngineLoop
from moetandem.serve.protocol import ChatCompletionRequest, ChatMessage, NamedToolChoice
from moetandem.serve.structured import (Constraint, GrammarError, grammar_tokenizer, harmony_tool_grammar,
                                        json_grammar, tool_grammar)
from moetandem.serve.tools import ToolCallParser, parse_all

@dataclass
class ChatPlan:
    """What a chat request asks beyond text: the tool names whose calls are parsed (None: no parsing), whether
    several calls may come, the grammar every choice is held to (None: free text), and whether the model writes
    harmony (gpt-oss: its output is parsed into content, reasoning and calls, special tokens kept in the text)."""
    tool_names: set[str] | None = None
    parallel: bool = True
    grammar: str | None = None
    grammar_param: str = "response_format"
    tools: list[dict[str, Any]] = field(default_factory=list)
    harmony: bool = False


def plan_chat(loop: EngineLoop, body: ChatCompletionRequest) -> ChatPlan:
    tok = loop.engine.tokenizer
    plan = ChatPlan(parallel=body.parallel_tool_calls,
                    harmony=is_harmony(str(getattr(tok, "chat_template", None) or "")))
    choice = body.tool_choice
    if body.tools and choice != "none":
        plan.tools = [t.function.model_dump(exclude_none=True, exclude={"strict"}) for t in body.tools]
        plan.tools = [{"type": "function", "function": f} for f in plan.tools]
        plan.tool_names = {t.function.name for t in body.tools}
        if choice == "required" or isinstance(choice, NamedToolChoice):
            picked = [t.function for t in body.tools
                      if not isinstance(choice, NamedToolChoice) or t.function.name == choice.function.name]
            plan.parallel = plan.parallel and not isinstance(choice, NamedToolChoice)
            functions = [(f.name, f.parameters) for f in picked]
            plan.grammar = _grammar(lambda: harmony_tool_grammar(functions) if plan.harmony
                                    else tool_grammar(functions, plan.parallel), "tool_choice")
            plan.grammar_param = "tool_choice"
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        plan.grammar = _grammar(lambda: json_grammar(None), "response_format")
    elif fmt is not None and fmt.type == "json_schema":
        js = fmt.json_schema
        assert js is not None
        plan.grammar = _grammar(lambda: json_grammar(js.schema_ if js.schema_ is not None else {},
                                                     strict=bool(js.strict)), "response_format")
    return plan


def _grammar(build: Any, param: str) -> str:
    try:
        return str(build())
    except GrammarError as e:
        raise APIError(400, str(e), param=param) from None


def _template_message(m: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        calls = []
        for c in m.tool_calls:
            try:  # templates (Qwen's) write arguments with `| tojson`: give them the object
                args: Any = json.loads(c.function.arguments)
            except json.JSONDecodeError:
                args = c.function.arguments
            calls.append({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}})
        out["tool_calls"] = calls
    return out


def chat_prompt(loop: EngineLoop, body: ChatCompletionRequest, plan: ChatPlan) -> list[int]:
    tok = loop.engine.tokenizer
    if tok is None:
        raise APIError(400, "this model ships no tokenizer, so it cannot take chat messages; use /v1/completions "
                            "with token ids", param="messages")
    template = getattr(tok, "chat_template", None)
    if not template:
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
    if plan.tools and "tools" not in str(template):
        raise APIError(400, "this model's chat template does not render tools, so the model cannot be told about "
                            "them; send the request without tools", param="tools")
    messages = [_template_message(m) for m in body.messages]
    extra = {"tools": plan.tools} if plan.tools else {}
    with loop.tokenizer_lock:
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
        except Exception as e:  # a template may raise, e.g. on roles that do not alternate
            raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from None
        return list(tok(text, add_special_tokens=False)["input_ids"])  # the template holds BOS itself


def constraint(loop: EngineLoop, plan: ChatPlan, max_new: int) -> Constraint | None:
    """A fresh grammar state for one choice, or None when the output is free."""
    if plan.grammar is None:
        return None
    try:
        with loop.tokenizer_lock:
            gt = grammar_tokenizer(loop.engine)
        return Constraint(gt, plan.grammar, max_new)
    except GrammarError as e:
        raise APIError(400, str(e), param=plan.grammar_param) from None


def message(plan: ChatPlan, text: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
    """A choice's whole text -> (assistant message, finish_reason)."""
    if plan.harmony:
        content, reasoning, calls = parse_harmony(text, plan.tool_names, plan.parallel)
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if reasoning is not None:
            msg["reasoning_content"] = reasoning
        if calls:
            msg["tool_calls"] = calls
        return msg, "tool_calls" if calls else finish
    if plan.tool_names is None:
        return {"role": "assistant", "content": text}, finish
    content, calls = parse_all(text, plan.tool_names, plan.parallel)
    msg = {"role": "assistant", "content": content}
    if calls:
        msg["tool_calls"] = calls
    return msg, "tool_calls" if calls else finish


class ChatDeltas:
    """A streamed choice's text pieces -> OpenAI delta objects (content, reasoning_content, or one tool call
    each)."""

    def __init__(self, plan: ChatPlan) -> None:
        self.parser: ToolCallParser | HarmonyParser | None = None
        if plan.harmony:
            self.parser = HarmonyParser(plan.tool_names, plan.parallel)
        elif plan.tool_names is not None:
            self.parser = ToolCallParser(plan.tool_names, plan.parallel)
        self.ncalls = 0

    def feed(self, text: str, final: bool = False) -> list[dict[str, Any]]:
        if self.parser is None:
            return [{"content": text}] if text else []
        out: list[dict[str, Any]] = []
        for kind, x in self.parser.feed(text, final):
            if kind == "content":
                out.append({"content": x})
            elif kind == "reasoning":
                out.append({"reasoning_content": x})
            else:
                out.append({"tool_calls": [{"index": self.ncalls, **x}]})
                self.ncalls += 1
        return out

    def finish_reason(self, finish: str | None) -> str | None:
        return "tool_calls" if self.ncalls else finish
