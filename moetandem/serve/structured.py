"""Constrained decoding with llguidance: `response_format` (json_object, json_schema) and the tool-call grammar of
`tool_choice: required` / a named function.

Each constrained sequence carries a `Constraint` on the batcher's per-sequence hook (`Request.logits_processor`,
`Request.accept`): before sampling, its logits row is masked to the tokens the grammar allows next (computed by
llguidance's Rust matcher on the CPU); after, the chosen token advances the matcher. Other sequences of the batch
are untouched.

Termination: a small or random model may never close its JSON on its own (a string or a number can grow without
end). A constraint therefore knows its token budget and, when the budget left is about what it takes to finish,
switches to a *closing plan*: the shortest completion a greedy search finds (forced tokens, then `}` `]` `"` `0`
... as the grammar allows), followed by end-of-sequence. So every response ends inside its max_tokens with text the
grammar accepts; a max_tokens too small for even the shortest completion is refused up front."""
from __future__ import annotations

import json
import threading
import weakref
from typing import Any

import numpy as np
import torch

#: tokens kept in hand beyond the closing plan's length before the plan takes over
MARGIN = 4
#: recompute the closing plan when the budget left is within this of the last plan's length (or every WINDOW)
WINDOW = 16
#: no closing plan is searched beyond this many tokens (the grammar is then left to the model)
PLAN_LIMIT = 512
#: closing pieces in order of preference: end a container or string, then separate (a number that must grow, as
#: under "minimum", is ended as soon as it may be), then the shortest values
CLOSERS = ["}", "]", '"', ",", "0", "1", "true", "false", "null", "a", ":", "{", "[", " "]
#: a letter is allowed only inside a JSON string (outside, values start with t/f/n at most): then '"' comes first
PROBE = "a"
JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: a random model cannot pad it with spaces forever


class GrammarError(ValueError):
    """The schema or grammar cannot be compiled, or cannot be satisfied within max_tokens (a 400)."""


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.hf
    except ImportError:  # pragma: no cover - a core dependency; only a broken install lands here
        raise GrammarError("structured output needs the llguidance package (pip install llguidance)") from None
    return llguidance


class GrammarTokenizer:
    """The model's tokenizer as llguidance sees it (built once per engine: ~1 s for a 150k vocabulary), its
    end-of-sequence token, and the token ids of the closing search's preferred pieces."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_id: int) -> None:
        llg = _llguidance()
        self.llg = llg
        self.vocab_size, self.eos_id = vocab_size, eos_id
        self.tok = llg.hf.from_tokenizer(tokenizer, n_vocab=max(vocab_size, len(tokenizer)), eos_token=eos_id)
        ids: dict[str, int] = {}
        for piece in CLOSERS:
            enc = tokenizer.encode(piece, add_special_tokens=False)
            if len(enc) == 1 and enc[0] < vocab_size and enc[0] not in ids.values():
                ids[piece] = int(enc[0])
        self.prefs = list(ids.values())
        self.probe, self.quote = ids.get(PROBE), ids.get('"')

    def closer(self, allowed: np.ndarray) -> int | None:
        """The token the closing search takes next: '"' inside a string, else the first allowed of CLOSERS,
        else the lowest allowed id."""
        if self.probe is not None and self.quote is not None and allowed[self.probe] and allowed[self.quote]:
            return self.quote
        pick = next((t for t in self.prefs if allowed[t]), None)
        if pick is None:
            nz = np.flatnonzero(allowed)
            pick = int(nz[0]) if nz.size else None
        return pick

    def matcher(self, grammar: str) -> Any:
        m = self.llg.LLMatcher(self.tok, grammar, log_level=0)
        if m.is_error():
            raise GrammarError(m.get_error())
        return m

    def allowed(self, matcher: Any) -> np.ndarray:
        """Bool [vocab_size]: the tokens the grammar allows next."""
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        out = np.zeros(self.vocab_size, dtype=bool)
        n = min(self.vocab_size, bits.size)
        out[:n] = bits[:n].astype(bool)
        return out


_tokenizers: "weakref.WeakKeyDictionary[Any, GrammarTokenizer]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def grammar_tokenizer(engine: Any) -> GrammarTokenizer:
    """The engine's GrammarTokenizer, built on first use."""
    if engine.tokenizer is None:
        raise GrammarError("this model ships no tokenizer, so its output cannot be constrained")
    with _lock:
        gt = _tokenizers.get(engine)
        if gt is None:
            tok = engine.tokenizer
            eos = int(tok.eos_token_id) if tok.eos_token_id is not None else min(engine.eos_ids)
            gt = _tokenizers[engine] = GrammarTokenizer(tok, int(engine.args.vocab_size), eos)
        return gt


def json_grammar(schema: dict[str, Any] | None, strict: bool = True) -> str:
    """json_object (schema None: any JSON object) or json_schema. Not strict: keywords llguidance does not
    implement are ignored instead of refused."""
    llg = _llguidance()
    options = {**JSON_OPTIONS, "lenient": not strict}
    try:
        return str(llg.LLMatcher.grammar_from_json_schema(schema if schema is not None else {"type": "object"},
                                                          overrides=options))
    except ValueError as e:
        raise GrammarError(f"invalid JSON schema: {e}") from None


def tool_call_schema(name: str, parameters: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON inside one Hermes-style <tool_call>: {"name": ..., "arguments": {...}}."""
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": parameters or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False}


def tool_grammar(functions: list[tuple[str, dict[str, Any] | None]], parallel: bool = True) -> str:
    """Output that is only tool calls (`tool_choice: required` or a named function), as Qwen writes them:
    `<tool_call>\\n{json}\\n</tool_call>`, one or (parallel) several separated by newlines."""
    llg = _llguidance()
    options = [tool_call_schema(n, p) for n, p in functions]
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    schema = {**schema, "x-guidance": {**JSON_OPTIONS, "lenient": True}}
    repeat = ' ("\\n" call)*' if parallel else ""
    lark = (f"start: call{repeat}\n"
            'call: "<tool_call>\\n" body "\\n</tool_call>"\n'
            f"body: %json {json.dumps(schema)}\n")
    return str(llg.LLMatcher.grammar_from_lark(lark))


def harmony_tool_grammar(functions: list[tuple[str, dict[str, Any] | None]]) -> str:
    """The same for gpt-oss's harmony format: right after the prompt's `<|start|>assistant`, one message
    `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{arguments}<|call|>` (harmony ends the
    turn at a call, so there is one per response). The markers are the tokenizer's special tokens."""
    llg = _llguidance()
    rules = []
    for i, (name, params) in enumerate(functions):
        schema = {**(params or {"type": "object"}), "x-guidance": {**JSON_OPTIONS, "lenient": True}}
        rules.append(f'call{i}: "{name}" " " <|constrain|> "json" <|message|> args{i} <|call|>\n'
                     f"args{i}: %json {json.dumps(schema)}\n")
    calls = " | ".join(f"call{i}" for i in range(len(functions)))
    lark = f'start: <|channel|> "commentary to=functions." ({calls})\n' + "".join(rules)
    return str(llg.LLMatcher.grammar_from_lark(lark))


class Constraint:
    """One sequence's grammar state, for the batcher hook: `constraint.process` masks a logits row,
    `constraint.accept` advances the matcher. Raises GrammarError when the grammar is invalid or cannot be
    completed within `max_new` tokens."""

    def __init__(self, gt: GrammarTokenizer, grammar: str, max_new: int) -> None:
        self.gt, self.max_new = gt, max_new
        self.m = gt.matcher(grammar)
        self.produced = 0
        self.closing: list[int] | None = None  # the plan being followed, once the budget is tight
        plan = self._plan(PLAN_LIMIT)  # None: the greedy search found no end; the model is left to find one
        if plan is not None and len(plan) + 1 > max_new:  # +1: room for end-of-sequence
            raise GrammarError(f"max_tokens {max_new} is too small for the required format: the shortest "
                               f"complete output takes {len(plan) + 1} tokens")
        self.plan_len, self.checked_at = len(plan or []), 0

    def _plan(self, limit: int) -> list[int] | None:
        """Shortest completion found greedily from the current state (up to an accepting state), or None."""
        m, plan = self.m.deep_copy(), []
        while len(plan) <= limit:
            if m.is_accepting():
                return plan
            forced = m.compute_ff_tokens()
            if forced:
                step = forced
            else:
                pick = self.gt.closer(self.gt.allowed(m))
                if pick is None:
                    return None
                step = [pick]
            if not m.consume_tokens(step):
                return None
            plan.extend(step)
        return None

    def _only(self, row: torch.Tensor, token: int) -> torch.Tensor:
        out = torch.full_like(row, float("-inf"))
        out[token] = 0.0
        return out

    def process(self, row: torch.Tensor) -> torch.Tensor:
        """logits row [V] -> the same row with every token the grammar forbids at -inf."""
        if self.m.is_stopped() or self.m.is_error():
            return self._only(row, self.gt.eos_id)
        left = self.max_new - self.produced  # tokens still allowed, this one included
        if self.closing is None and (left <= self.plan_len + MARGIN + WINDOW
                                     or self.produced - self.checked_at >= WINDOW):
            plan = self._plan(min(left, PLAN_LIMIT))
            self.checked_at = self.produced
            if plan is not None:
                self.plan_len = len(plan)
                if len(plan) + MARGIN >= left:
                    self.closing = plan
        if self.closing is not None:
            return self._only(row, self.closing[0] if self.closing else self.gt.eos_id)
        allowed = torch.from_numpy(self.gt.allowed(self.m))  # [vocab]
        if row.shape[-1] > allowed.shape[0]:
            allowed = torch.cat([allowed, allowed.new_zeros(row.shape[-1] - allowed.shape[0])])
        ok = allowed[: row.shape[-1]].to(row.device)
        out = row.masked_fill(~ok, float("-inf"))
        # a truncated row (the LM head in the cloud sends only its top-K logits, split/logits.py) where the grammar
        # forbids all K: the allowed tokens, alike, so the output still follows the grammar (no host sync: where)
        none_left = ~torch.isfinite(out).any()
        return torch.where(ok & none_left, torch.zeros((), dtype=out.dtype, device=out.device), out)

    def accept(self, token: int) -> None:
        self.produced += 1
        if self.closing:
            self.closing = self.closing[1:] if token == self.closing[0] else []
        if not self.m.is_stopped():
            self.m.consume_token(token)
