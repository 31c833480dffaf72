"""Tool calls in generated text, Hermes style as Qwen (2.5, 3) and many others write them:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

`ToolCallParser` splits one choice's text into content and OpenAI `tool_calls`, incrementally for streams:
text that might be the start of `<tool_call>` is held back until decided, and a call is handed out whole once
its closing tag (or the end of the output) arrives. A block whose JSON does not parse, or that names a function
not in the request's tools, stays content."""
from __future__ import annotations

import json
import uuid
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_call(body: str, names: set[str]) -> dict[str, Any] | None:
    """The JSON inside one <tool_call> block as an OpenAI tool call, or None."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": new_call_id(), "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def held_prefix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ToolCallParser:
    """Feed a choice's text piece by piece; get ("content", str) and ("call", dict) items back in order."""

    def __init__(self, names: set[str], parallel: bool = True) -> None:
        self.names, self.parallel = names, parallel
        self.buf = ""
        self.in_call = False
        self.calls: list[dict[str, Any]] = []

    def feed(self, text: str, final: bool = False) -> list[tuple[str, Any]]:
        self.buf += text
        items: list[tuple[str, Any]] = []
        while True:
            if not self.in_call:
                at = self.buf.find(OPEN)
                if at < 0:
                    keep = 0 if final else held_prefix(self.buf, OPEN)
                    self._content(items, self.buf[: len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep:]
                    return items
                self._content(items, self.buf[:at])
                self.buf, self.in_call = self.buf[at + len(OPEN):], True
            end = self.buf.find(CLOSE)
            if end < 0 and not final:
                return items
            body = self.buf if end < 0 else self.buf[:end]
            call = parse_call(body.strip(), self.names)
            if call is not None and (self.parallel or not self.calls):
                self.calls.append(call)
                items.append(("call", call))
            elif call is None:  # not a call after all: the block is content, as written
                self._content(items, OPEN + body + ("" if end < 0 else CLOSE))
            self.in_call = False
            self.buf = "" if end < 0 else self.buf[end + len(CLOSE):]
            if end < 0:
                return items

    def _content(self, items: list[tuple[str, Any]], text: str) -> None:
        if self.calls:  # after a call, only whitespace separates calls; other text is kept as content
            text = text if text.strip() else ""
        if text:
            items.append(("content", text))


def parse_all(text: str, names: set[str], parallel: bool = True) -> tuple[str | None, list[dict[str, Any]]]:
    """Whole output -> (content or None when it is empty beside the calls, tool calls)."""
    p = ToolCallParser(names, parallel)
    items = p.feed(text, final=True)
    content = "".join(x for kind, x in items if kind == "content")
    if p.calls:
        content = content.strip()
    return (content or None) if p.calls else content, p.calls
