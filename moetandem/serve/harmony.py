"""gpt-oss's output in OpenAI's harmony format, split into content, reasoning and tool calls.

After the prompt's `<|start|>assistant` the model writes one or more messages:

    <|channel|>analysis<|message|>I should look the weather up.<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>
        {"city": "Paris"}<|call|>     (one line in the output)
    ...<|start|>assistant<|channel|>final<|message|>It is sunny.<|return|>

A header (up to `<|message|>`) names the channel and, for a tool call, the recipient (` to=functions.NAME`, before
or after the channel); the body runs to `<|end|>`, `<|call|>` or `<|return|>`. The `final` channel (and
`commentary` without a recipient, the preamble the user sees) is content, `analysis` is reasoning, a body addressed
to `functions.NAME` with a name in the request's tools is a tool call. A call whose arguments are not a JSON object,
or to a function not in the tools, stays content (its body, as written). Output that starts without a header (a
model that ignores the format, or JSON forced by a grammar) is one content message up to its end marker. Same interface as `tools.ToolCallParser`, incremental for streams:
a possible start of a marker is held back until decided, a call is handed out whole once its body ends."""
from __future__ import annotations

import json
import re
from typing import Any

from moetandem.serve.tools import held_prefix, new_call_id

MESSAGE, START, CHANNEL = "<|message|>", "<|start|>", "<|channel|>"
ENDS = ("<|end|>", "<|call|>", "<|return|>", "<|endoftext|>", START)  # a body ends at the first of these
HEADER_STARTS = (CHANNEL, START, " to=", "to=")  # how a header may begin, right after the prompt or a body
RECIPIENT = re.compile(r"\bto=(\S+?)(?=\s|<\||$)")
CHANNEL_NAME = re.compile(re.escape(CHANNEL) + r"\s*(\w+)")


def is_harmony(template: str) -> bool:
    """A chat template that writes harmony (gpt-oss's)."""
    return CHANNEL in template and START in template


def parse_arguments(body: str) -> str | None:
    """A call's body as OpenAI's `arguments` (JSON text of an object), or None when it is not one."""
    try:
        args = json.loads(body)
    except json.JSONDecodeError:
        return None
    return json.dumps(args, ensure_ascii=False) if isinstance(args, dict) else None


class HarmonyParser:
    """Feed a choice's text piece by piece; get ("content", str), ("reasoning", str) and ("call", dict) items back
    in order. `names`: the request's function names (None: no tools, every message is text)."""

    def __init__(self, names: set[str] | None, parallel: bool = True) -> None:
        self.names, self.parallel = names or set(), parallel
        self.buf = ""
        self.header: str | None = None  # the open message's header; None while reading one
        self.seen = False  # at least one message header was read
        self.calls: list[dict[str, Any]] = []

    def feed(self, text: str, final: bool = False) -> list[tuple[str, Any]]:
        self.buf += text
        items: list[tuple[str, Any]] = []
        while True:
            if self.header is None:
                at = self.buf.find(MESSAGE)
                if at < 0:
                    lead = self.buf.lstrip()
                    if not self.seen and lead and not any(s.startswith(lead[: len(s)]) for s in HEADER_STARTS):
                        self.header, self.seen = "", True  # no header: a content message (up to an end marker)
                        continue
                    if final:  # a header that never got its body: nothing to show
                        self.buf = ""
                    return items
                self.header, self.buf, self.seen = self.buf[:at], self.buf[at + len(MESSAGE):], True
            ends = [(i, e) for e in ENDS if (i := self.buf.find(e)) >= 0]
            if not ends and not final:
                self._partial(items)
                return items
            at, end = min(ends) if ends else (len(self.buf), "")
            self._whole(items, self.buf[:at])
            self.buf = self.buf[at + (0 if end == START else len(end)):]
            self.header = None
            if not ends:
                return items

    def _route(self) -> tuple[str, str | None]:
        """(kind of the open message: content, reasoning or call, the function named when a call)."""
        header = self.header or ""
        to = RECIPIENT.search(header)
        if to is not None:
            name = to.group(1).removeprefix("functions.")
            return ("call", name) if to.group(1).startswith("functions.") and name in self.names else ("content",
                                                                                                          None)
        channel = CHANNEL_NAME.search(header)
        return ("reasoning" if channel is not None and channel.group(1) == "analysis" else "content"), None

    def _partial(self, items: list[tuple[str, Any]]) -> None:
        """Hand out what is certainly body text of the open message (not a call: calls go out whole)."""
        kind, _ = self._route()
        if kind == "call":
            return
        keep = max(held_prefix(self.buf, e) for e in ENDS)
        if len(self.buf) > keep:
            items.append((kind, self.buf[: len(self.buf) - keep]))
            self.buf = self.buf[len(self.buf) - keep:]

    def _whole(self, items: list[tuple[str, Any]], body: str) -> None:
        """The rest of the open message's body, which has ended."""
        kind, name = self._route()
        if kind == "call":
            args = parse_arguments(body.strip())
            if args is None:
                kind = "content"
            elif self.parallel or not self.calls:
                call = {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": args}}
                self.calls.append(call)
                items.append(("call", call))
                return
            else:
                return  # one call only: later ones are dropped
        if body:
            items.append((kind, body))


def parse_all(text: str, names: set[str] | None, parallel: bool = True) -> tuple[str | None, str | None,
                                                                                  list[dict[str, Any]]]:
    """Whole output -> (content, or None when there is none beside calls; reasoning or None; tool calls)."""
    p = HarmonyParser(names, parallel)
    items = p.feed(text, final=True)
    content = "".join(x for kind, x in items if kind == "content")
    reasoning = "".join(x for kind, x in items if kind == "reasoning")
    return (content or None) if p.calls else content, reasoning or None, p.calls
