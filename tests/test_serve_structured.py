"""Structured output (`response_format` by llguidance constrained decoding) and tool calls (`tools`,
`tool_choice`, Hermes-style `<tool_call>` parsing, streamed deltas) over real HTTP with the demo MoE."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")

import moetandem
from moetandem.assets import demo_model_path
from scripted import Script
from moetandem.serve import create_app, generation
from moetandem.serve.server_thread import ServerThread

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
NESTED = {"type": "object", "properties": {
    "point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
              "required": ["x", "y"], "additionalProperties": False},
    "ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
    "required": ["point", "ok", "color"], "additionalProperties": False}
LIST = {"type": "array", "items": {"type": "integer", "minimum": 3}, "minItems": 2}
SCHEMAS = {"person": PERSON, "nested": NESTED, "list": LIST}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
# a Qwen-like template: tools go into the system turn, earlier calls and tool results are rendered
TOOL_TEMPLATE = (
    "{% if tools %}System: You may call these tools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "Answer with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.\n\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'tool' %}Tool: {{ m.content }}\n\n"
    "{% elif m.tool_calls %}Assistant: {% for c in m.tool_calls %}<tool_call>{{ {'name': c.function.name, "
    "'arguments': c.function.arguments} | tojson }}</tool_call>{% endfor %}\n\n"
    "{% else %}{{ m.role | capitalize }}: {{ m.content }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


def tool_model(tmp: Path) -> Path:
    """The demo checkpoint with a chat template that renders tools."""
    src = demo_model_path()
    for f in src.iterdir():
        (tmp / f.name).symlink_to(f) if f.name != "tokenizer_config.json" else None
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TOOL_TEMPLATE
    (tmp / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tmp


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    eng = moetandem.load(tool_model(tmp_path_factory.mktemp("tools")), device="cpu", dtype="float32",
                         progress=False)
    with ServerThread(create_app(eng, model_id="demo", max_batch=4)) as s:
        yield s


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """The demo model as shipped: its template has no tools."""
    eng = moetandem.load(demo_model_path(), device="cpu", dtype="float32", progress=False)
    with ServerThread(create_app(eng, model_id="demo", max_batch=4)) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv: ServerThread) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=60)


def post(s: ServerThread, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{s.url}/v1/chat/completions", json={"messages": USER, **body}, timeout=60)


def schema_format(schema: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": strict}}


def streamed(client: "openai.OpenAI", **kw: Any) -> tuple[str, list[Any], str | None]:
    text, calls, finish = "", [], None
    for chunk in client.chat.completions.create(model="demo", stream=True, **kw):
        for c in chunk.choices:
            text += c.delta.content or ""
            calls += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    return text, calls, finish


# ---------------------------------------------------------------- response_format
@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_always_validates(client: "openai.OpenAI", name: str, stream: bool) -> None:
    schema = SCHEMAS[name]
    for seed, temperature, max_tokens in [(0, 0.0, 48), (1, 1.0, 64), (2, 1.5, 60), (3, 1.0, 42)]:
        kw = dict(messages=USER, max_tokens=max_tokens, temperature=temperature, seed=seed,
                  response_format=schema_format(schema))
        if stream:
            text, _, finish = streamed(client, **kw)
        else:
            r = client.chat.completions.create(model="demo", **kw)
            text, finish = r.choices[0].message.content, r.choices[0].finish_reason
            assert r.usage.completion_tokens <= max_tokens
        jsonschema.validate(json.loads(text), schema)  # raises on invalid JSON or a schema violation
        assert finish == "stop", (text, finish)  # closed by the grammar, not cut by max_tokens


def test_json_object_with_n(client: "openai.OpenAI") -> None:
    r = client.chat.completions.create(model="demo", messages=USER, max_tokens=20, temperature=1.0, seed=5, n=3,
                                       response_format={"type": "json_object"})
    for c in r.choices:
        assert isinstance(json.loads(c.message.content), dict)


def test_unconstrained_neighbour_is_untouched(srv: ServerThread) -> None:
    """A greedy request gives the same text alone and beside constrained ones in the same batch."""
    import concurrent.futures
    plain = {"max_tokens": 24, "temperature": 0}
    alone = post(srv, plain).json()["choices"][0]["message"]["content"]
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        fs = [ex.submit(post, srv, {"max_tokens": 24, "response_format": schema_format(PERSON)}) for _ in range(2)]
        mixed = ex.submit(post, srv, plain)
        assert mixed.result().json()["choices"][0]["message"]["content"] == alone
        for f in fs:
            jsonschema.validate(json.loads(f.result().json()["choices"][0]["message"]["content"]), PERSON)


def test_bad_schema_and_tiny_budget_are_400(srv: ServerThread) -> None:
    r = post(srv, {"max_tokens": 20, "response_format": schema_format({"type": "strin"})})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    r = post(srv, {"max_tokens": 3, "response_format": schema_format(PERSON)})
    assert r.status_code == 400 and "max_tokens 3 is too small" in r.json()["error"]["message"]
    r = post(srv, {"response_format": {"type": "json_schema"}})
    assert r.status_code == 400
    r = post(srv, {"max_tokens": 20, "tools": [WEATHER], "response_format": {"type": "json_object"}})
    assert r.status_code == 400


# ---------------------------------------------------------------- tools
def test_tool_choice_required_and_named(client: "openai.OpenAI") -> None:
    for choice, names in [("required", {"get_weather", "get_time"}),
                          ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})]:
        for stream in (False, True):
            kw = dict(messages=USER, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=60, temperature=1.0,
                      seed=3)
            if stream:
                _, deltas, finish = streamed(client, **kw)
                assert all(d.id and d.type == "function" for d in deltas)
                assert [d.index for d in deltas] == list(range(len(deltas)))
                calls = [d.function for d in deltas]
            else:
                r = client.chat.completions.create(model="demo", **kw)
                calls, finish = [c.function for c in r.choices[0].message.tool_calls or []], r.choices[0].finish_reason
            assert calls and finish == "tool_calls", (choice, stream)
            for f in calls:
                assert f.name in names
                spec = (WEATHER if f.name == "get_weather" else TIME)["function"]["parameters"]
                jsonschema.validate(json.loads(f.arguments), spec)


def test_tool_choice_none_returns_text(srv: ServerThread) -> None:
    with_tools = post(srv, {"max_tokens": 8, "tools": [WEATHER], "tool_choice": "none", "temperature": 0}).json()
    without = post(srv, {"max_tokens": 8, "temperature": 0}).json()
    msg = with_tools["choices"][0]["message"]
    assert "tool_calls" not in msg and isinstance(msg["content"], str)
    assert with_tools["usage"]["prompt_tokens"] == without["usage"]["prompt_tokens"]  # tools not in the prompt
    auto = post(srv, {"max_tokens": 1, "tools": [WEATHER]}).json()
    assert auto["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"]  # auto: tools in the prompt


SCRIPT = 'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch, srv: ServerThread) -> str:
    """Every sequence of the server is forced to write SCRIPT then end (a stub of the model's generation)."""
    tok = srv.app.state.server.loop.engine.tokenizer
    ids = tok(SCRIPT, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    real = generation.processors
    monkeypatch.setattr(generation, "processors", lambda *a: [*real(*a), Script(ids)])
    return SCRIPT


def test_auto_parses_a_tool_call(client: "openai.OpenAI", scripted: str) -> None:
    r = client.chat.completions.create(model="demo", messages=USER, tools=[WEATHER], max_tokens=60)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content == "Let me check."
    (call,) = c.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")
    text, calls, finish = streamed(client, messages=USER, tools=[WEATHER], max_tokens=60)
    assert text == "Let me check. " and finish == "tool_calls"
    (delta,) = calls
    assert delta.index == 0 and delta.id and delta.function.name == "get_weather"
    assert json.loads(delta.function.arguments) == {"city": "Paris"}
    # tool_choice none: the same output is plain text
    r = client.chat.completions.create(model="demo", messages=USER, tools=[WEATHER], tool_choice="none",
                                       max_tokens=60)
    assert r.choices[0].message.content == SCRIPT and not r.choices[0].message.tool_calls


def test_tool_round_trip_and_refusals(srv: ServerThread, plain: ServerThread) -> None:
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": history, "tools": [WEATHER],
                                                           "max_tokens": 4}, timeout=60)
    assert r.status_code == 200, r.text
    r = post(plain, {"tools": [WEATHER], "max_tokens": 4})  # template without tools: not silently dropped
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    assert post(plain, {"tools": [WEATHER], "tool_choice": "none", "max_tokens": 4}).status_code == 200
    for body in [{"tool_choice": "required"}, {"tools": [WEATHER], "tool_choice": {"type": "function",
                                                                                     "function": {"name": "nope"}}},
                 {"functions": [WEATHER["function"]]}, {"reasoning_effort": "high"},
                 {"tools": [WEATHER, WEATHER]}, {"modalities": ["audio"]}]:
        assert post(srv, {"max_tokens": 4, **body}).status_code == 400, body


def test_logit_bias_and_penalties(srv: ServerThread) -> None:
    base = post(srv, {"max_tokens": 6, "temperature": 0}).json()
    tok = srv.app.state.server.loop.engine.tokenizer
    first = tok(base["choices"][0]["message"]["content"], add_special_tokens=False)["input_ids"][0]
    banned = post(srv, {"max_tokens": 6, "temperature": 0, "logit_bias": {str(first): -100}}).json()
    assert tok(banned["choices"][0]["message"]["content"], add_special_tokens=False)["input_ids"][0] != first
    forced = post(srv, {"max_tokens": 4, "temperature": 0, "logit_bias": {"300": 100}}).json()
    assert forced["choices"][0]["message"]["content"] == tok.decode([300] * 4)
    rep = post(srv, {"max_tokens": 4, "temperature": 0, "logit_bias": {"300": 100},
                     "presence_penalty": 2.0, "frequency_penalty": 2.0}).json()
    assert rep["choices"][0]["message"]["content"] == tok.decode([300] * 4)  # +100 beats the penalties
    assert post(srv, {"max_tokens": 4, "logit_bias": {"99999999": 1}}).status_code == 400
    assert post(srv, {"max_tokens": 4, "logit_bias": {"a": 1}}).status_code == 400


def test_a_truncated_row_still_follows_the_grammar() -> None:
    """With the LM head in the cloud the end sees only the top-K logits (-inf elsewhere); where the grammar forbids
    all K, the step picks among the allowed tokens instead of a forbidden one (argmax of an all -inf row)."""
    from moetandem.serve.structured import Constraint, grammar_tokenizer, json_grammar
    eng = moetandem.load(demo_model_path(), device="cpu", dtype="float32", progress=False)
    c = Constraint(grammar_tokenizer(eng), json_grammar(PERSON), max_new=64)
    V = eng.args.vocab_size
    full = c.process(torch.zeros(V))
    allowed = torch.isfinite(full)
    assert 0 < int(allowed.sum()) < V
    forbidden = (~allowed).nonzero().flatten()[:4]
    row = torch.full((V,), float("-inf"))
    row[forbidden] = torch.tensor([9.0, 8.0, 7.0, 6.0])  # the K = 4 best are all forbidden
    out = c.process(row)
    assert torch.equal(torch.isfinite(out), allowed)
    assert bool(allowed[int(out.argmax())])
    kept = row.clone()
    kept[allowed.nonzero().flatten()[0]] = 1.0  # one allowed token among the K: it alone stays
    assert torch.isfinite(c.process(kept)).sum() == 1
