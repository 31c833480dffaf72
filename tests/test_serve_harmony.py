"""gpt-oss's harmony output: the parser (content from the final channel, reasoning from analysis, tool calls to
functions.NAME), whole and streamed at every split, and through the app with a tiny gpt-oss checkpoint, a
harmony tokenizer and template, and a scripted generation."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

import moetandem
from conftest import build_checkpoint
from scripted import Script
from moetandem.serve import create_app, generation
from moetandem.serve.harmony import HarmonyParser, parse_all
from moetandem.serve.server_thread import ServerThread

NAMES = {"get_weather", "get_time"}
ANALYSIS = "<|channel|>analysis<|message|>The user wants the weather.<|end|>"
CALL = ("<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
        '{"city": "Paris"}<|call|>')
FINAL = "<|start|>assistant<|channel|>final<|message|>It is sunny in Paris.<|return|>"
SPECIALS = ["<|endoftext|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>",
            "<|call|>"]
RETURN, CALL_ID = SPECIALS.index("<|return|>"), SPECIALS.index("<|call|>")  # special tokens take the first ids
# a small harmony template in gpt-oss's shape: tools as a TypeScript namespace in the developer message
TEMPLATE = (
    "{% if tools %}<|start|>developer<|message|># Tools\nnamespace functions {\n{% for t in tools %}"
    "type {{ t.function.name }} = (_: {{ t.function.parameters | tojson }}) => any;\n{% endfor %}}<|end|>"
    "{% endif %}{% for m in messages %}{% if m.role == 'tool' %}<|start|>functions.x to=assistant<|channel|>"
    "commentary<|message|>{{ m.content }}<|end|>{% elif m.tool_calls %}<|start|>assistant to=functions."
    "{{ m.tool_calls[0].function.name }}<|channel|>commentary json<|message|>"
    "{{ m.tool_calls[0].function.arguments | tojson }}<|call|>{% else %}<|start|>{{ m.role }}<|message|>"
    "{{ m.content }}<|end|>{% endif %}{% endfor %}{% if add_generation_prompt %}<|start|>assistant{% endif %}")
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


def pieces(text: str, size: int, names: set[str] | None = NAMES, parallel: bool = True) -> list[tuple[str, Any]]:
    """Feed `text` in pieces of `size` characters; items with consecutive text of one kind merged."""
    p = HarmonyParser(names, parallel)
    items = [x for i in range(0, len(text), size) for x in p.feed(text[i: i + size])] + p.feed("", final=True)
    out: list[tuple[str, Any]] = []
    for kind, x in items:
        if out and kind != "call" and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + x)
        else:
            out.append((kind, x if kind != "call" else x["function"]))
    return out


# ---------------------------------------------------------------- the parser
def test_parse_reasoning_call_and_final() -> None:
    content, reasoning, calls = parse_all(ANALYSIS + CALL, NAMES)
    assert content is None and reasoning == "The user wants the weather."
    (call,) = calls
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert parse_all(ANALYSIS + FINAL, NAMES) == ("It is sunny in Paris.", "The user wants the weather.", [])
    # the recipient in the role part, no <|constrain|>, and generation cut at the stop token (no <|call|>)
    _, _, calls = parse_all(' to=functions.get_time<|channel|>commentary json<|message|>{"zone": "UTC"}', NAMES)
    assert [c["function"]["name"] for c in calls] == ["get_time"]


def test_streamed_pieces_equal_whole() -> None:
    text = ANALYSIS + CALL + CALL.replace("Paris", "Rome") + FINAL
    want = [("reasoning", "The user wants the weather."),
            ("call", {"name": "get_weather", "arguments": '{"city": "Paris"}'}),
            ("call", {"name": "get_weather", "arguments": '{"city": "Rome"}'}), ("content", "It is sunny in Paris.")]
    for size in (1, 2, 3, 5, 8, 13, len(text)):
        assert pieces(text, size) == want, size
    assert pieces(text, 4, parallel=False) == [want[0], want[1], want[3]]  # one call only


def test_what_is_not_a_call_stays_text() -> None:
    assert parse_all("Just plain text <|channel|> here.", NAMES) == ("Just plain text <|channel|> here.", None, [])
    unknown = CALL.replace("get_weather", "launch_rockets")
    assert parse_all(unknown, NAMES) == ('{"city": "Paris"}', None, [])
    assert parse_all(CALL.replace('{"city": "Paris"}', "not json"), NAMES) == ("not json", None, [])
    assert parse_all(CALL, None) == ('{"city": "Paris"}', None, [])  # no tools in the request
    assert parse_all('{"a": 1}<|return|>', NAMES) == ('{"a": 1}', None, [])  # no header: content to its end
    # a preamble on commentary without recipient is content; a header that never got its body is dropped
    assert parse_all("<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant<|channel|>final",
                     NAMES) == ("Checking.", None, [])


# ---------------------------------------------------------------- through the app
def harmony_model(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    build_checkpoint("gpt_oss", path, vocab_size=320, eos_token_id=[RETURN, CALL_ID],
                     max_position_embeddings=512)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["analysis commentary final functions get_weather json city Paris sunny"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|return|>",
                                   additional_special_tokens=SPECIALS[1:])
    fast.chat_template = TEMPLATE
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    path = harmony_model(tmp_path_factory.mktemp("harmony"))
    engine = moetandem.load(path, device="cpu", dtype="float32", progress=False)
    with ServerThread(create_app(engine, model_id="oss", max_batch=2)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerThread) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture
def script(server: ServerThread, monkeypatch: pytest.MonkeyPatch) -> Any:
    """script(text): every choice generates exactly `text`'s tokens (a processor that allows only the next one)."""
    tok = server.app.state.server.loop.engine.tokenizer

    def use(text: str) -> None:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        monkeypatch.setattr(generation, "processors", lambda *a: [*real(*a), Script(ids)])

    real = generation.processors
    return use


def test_app_returns_harmony_tool_calls(client: "openai.OpenAI", script: Any) -> None:
    script(ANALYSIS + CALL)
    r = client.chat.completions.create(model="oss", messages=USER, tools=[WEATHER], max_tokens=80)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    assert c.message.model_extra["reasoning_content"] == "The user wants the weather."
    (call,) = c.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    chunks = list(client.chat.completions.create(model="oss", messages=USER, tools=[WEATHER], max_tokens=80,
                                                 stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    calls = [t for d in deltas for t in d.tool_calls or []]
    assert [(t.index, t.function.name, json.loads(t.function.arguments)) for t in calls] == [
        (0, "get_weather", {"city": "Paris"})]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == "The user wants the weather."
    assert not "".join(d.content or "" for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_app_returns_the_final_channel(client: "openai.OpenAI", script: Any) -> None:
    script(ANALYSIS + FINAL)
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
               "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    for messages, tools in ((USER, None), (history, [WEATHER])):
        kw: dict[str, Any] = {"tools": tools} if tools else {}
        r = client.chat.completions.create(model="oss", messages=messages, max_tokens=80, **kw)
        c = r.choices[0]
        assert c.finish_reason == "stop" and c.message.content == "It is sunny in Paris." and not c.message.tool_calls
        streamed = client.chat.completions.create(model="oss", messages=messages, max_tokens=80, stream=True, **kw)
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == "It is sunny in Paris."


def test_required_and_named_tool_choice_force_a_harmony_call(client: "openai.OpenAI") -> None:
    """No script: the random model writes what the grammar allows, one harmony call with schema-valid arguments."""
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    time = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, time)}
    named = {"type": "function", "function": {"name": "get_time"}}
    for choice, seed in (("required", 1), ("required", 2), (named, 3)):
        kw: dict[str, Any] = {"messages": USER, "tools": [WEATHER, time], "tool_choice": choice, "max_tokens": 60,
                              "temperature": 1.0, "seed": seed}
        c = client.chat.completions.create(model="oss", **kw).choices[0]
        assert c.finish_reason == "tool_calls", c.message
        (call,) = c.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        assert choice == "required" or call.function.name == "get_time"
        deltas = [ch.choices[0].delta for ch in client.chat.completions.create(model="oss", stream=True, **kw)
                  if ch.choices]
        (streamed,) = [t for d in deltas for t in d.tool_calls or []]
        assert (streamed.function.name, streamed.function.arguments) == (call.function.name,
                                                                         call.function.arguments)


def test_response_format_with_harmony_is_plain_json(client: "openai.OpenAI") -> None:
    """The JSON grammar starts the output at the JSON itself (no channel header): the parser passes it on."""
    pytest.importorskip("llguidance")
    for stream in (False, True):
        r = client.chat.completions.create(model="oss", messages=USER, response_format={"type": "json_object"},
                                           max_tokens=40, seed=5, stream=stream)
        text = ("".join(ch.choices[0].delta.content or "" for ch in r if ch.choices) if stream
                else r.choices[0].message.content)
        assert isinstance(json.loads(text), dict)
