"""The OpenAI-compatible server, end to end over real HTTP (uvicorn in a thread) with the official `openai` client:
chat and completions, streaming, usage, errors in OpenAI's shape, cancellation, queue overflow, API key,
/health, /metrics, and a property-based run that must never see a 5xx."""
from __future__ import annotations

import moetandem
import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
from conftest import build_checkpoint
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from moetandem import Engine
from moetandem.serve import create_app
from moetandem.serve.server_thread import ServerThread

KEY = "sk-test-key"
MODEL = "tiny-moe"
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
USER = [{"role": "user", "content": "hello world"}]


def build_tiny_model(path: Path, family: str = "mixtral") -> Path:
    """Random tiny checkpoint (Mixtral) + a byte-level BPE tokenizer trained on two sentences, with a chat
    template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    build_checkpoint(family, path, vocab_size=320)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world", "the quick brown fox jumps over the lazy dog"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return path


def load(path: Path) -> Engine:
    return moetandem.load(path, device="cpu", dtype="float32", progress=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ServerThread]:
    app = create_app(load(model_dir), model_id=MODEL, api_key=KEY, max_batch=4, max_waiting=128)
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerThread) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def http(server: ServerThread) -> Iterator["httpx.Client"]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        yield c


def engine_loop(server: ServerThread) -> Any:
    return server.app.state.server.loop


def wait_idle(server: ServerThread, timeout: float = 10.0) -> None:
    loop, deadline = engine_loop(server), time.monotonic() + timeout
    while not loop.idle():
        assert time.monotonic() < deadline, "sequences leaked: the engine loop never became idle"
        time.sleep(0.02)


def metrics(http: "httpx.Client") -> dict[str, float]:
    """Every sample of /metrics, parsed by prometheus' own parser, keyed 'name{label=value,...}'."""
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def assert_error(r: "httpx.Response", status: int, param: str | None = None, code: str | None = None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code, body


# ---------------------------------------------------------------- happy paths
def test_health_and_models(server: ServerThread, client: "openai.OpenAI") -> None:
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # no key needed
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_completion(client: "openai.OpenAI") -> None:
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL and len(r.choices) == 1
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_matches_non_stream(client: "openai.OpenAI") -> None:
    kw: dict[str, Any] = dict(model=MODEL, messages=USER, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_stream_and_not(client: "openai.OpenAI") -> None:
    whole = client.completions.create(model=MODEL, prompt="the quick brown", max_tokens=10, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 10
    chunks = list(client.completions.create(model=MODEL, prompt="the quick brown", max_tokens=10, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_sse_wire_format_ends_with_done(http: "httpx.Client") -> None:
    with http.stream("POST", "/v1/completions", json={"prompt": "hello", "max_tokens": 4, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert all("choices" in json.loads(e[6:]) for e in events[:-1])


def test_n_seed_and_prompt_lists(client: "openai.OpenAI") -> None:
    kw: dict[str, Any] = dict(model=MODEL, prompt=["hello", "the lazy dog"], max_tokens=8, temperature=1.0,
                              top_p=0.9, seed=1234, n=2)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2, 3]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    ids = client.completions.create(model=MODEL, prompt=[[5, 17, 42]], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3


def test_tiny_temperature_is_greedy(client: "openai.OpenAI") -> None:  # found by the property test
    kw: dict[str, Any] = dict(model=MODEL, prompt="hello", max_tokens=8, extra_body={"ignore_eos": True})
    greedy = client.completions.create(temperature=0, **kw).choices[0].text
    assert client.completions.create(temperature=1e-300, **kw).choices[0].text == greedy


def test_stop_strings_trim_and_stop_early(client: "openai.OpenAI") -> None:
    kw: dict[str, Any] = dict(model=MODEL, prompt="hello world", temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(max_tokens=40, **kw).choices[0].text
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if "\ufffd" not in full[i:i + 2])
    want = full[: full.index(stop)]
    r = client.completions.create(max_tokens=40, stop=[stop, "never-produced"], **kw)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 40  # the sequence left the batch at the stop, not at max_tokens
    streamed = list(client.completions.create(max_tokens=40, stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == want
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_concurrent_requests_share_decode_steps(server: ServerThread, http: "httpx.Client",
                                                client: "openai.OpenAI") -> None:
    prompts = ["hello", "the quick brown fox", "lazy dog", "jumps over"]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=30, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
    before = metrics(http)
    results: list[str] = [""] * len(prompts)

    def run(i: int) -> None:
        time.sleep(0.05 * i)  # staggered: later requests join a batch already decoding
        results[i] = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=30, temperature=0,
                                               extra_body={"ignore_eos": True}).choices[0].text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone
    after = metrics(http)
    solo = "moetandem_decode_batch_size_bucket{le=1.0}"
    multi = (after["moetandem_decode_batch_size_count"] - before["moetandem_decode_batch_size_count"]) - \
        (after[solo] - before[solo])
    assert multi > 0, "no decode step ran more than one sequence"


# ---------------------------------------------------------------- errors
BAD_INPUTS = [  # (path, raw body, status, param, code)
    ("/v1/chat/completions", "{not json", 400, None, "invalid_json"),
    ("/v1/completions", "[1, 2]", 400, None, "invalid_body"),
    ("/v1/completions", "", 400, None, None),
    ("/v1/chat/completions", '{"model": "tiny-moe"}', 400, "messages", None),
    ("/v1/chat/completions", '{"messages": []}', 400, "messages", None),
    ("/v1/chat/completions", '{"messages": "hi"}', 400, "messages", None),
    ("/v1/chat/completions", '{"messages": [{"role": "robot", "content": "x"}]}', 400, "messages", None),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"}', 404, "model",
     "model_not_found"),
    ("/v1/completions", '{"prompt": "x", "max_tokens": "5"}', 400, "max_tokens", None),
    ("/v1/completions", '{"prompt": "x", "max_tokens": 0}', 400, "max_tokens", None),
    ("/v1/completions", '{"prompt": "x", "max_tokens": 100000}', 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", '{"prompt": "' + "hello world " * 200 + '"}', 400, "prompt", "context_length_exceeded"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "max_tokens": 300}', 400,
     "messages", "context_length_exceeded"),
    ("/v1/completions", '{"prompt": ""}', 400, "prompt", None),
    ("/v1/completions", '{"prompt": []}', 400, "prompt", None),
    ("/v1/completions", '{"prompt": [99999]}', 400, "prompt", None),
    ("/v1/completions", '{"prompt": 5}', 400, "prompt", None),
    ("/v1/completions", '{"prompt": "x", "temperature": -1}', 400, "temperature", None),
    ("/v1/completions", '{"prompt": "x", "temperature": 2.5}', 400, "temperature", None),
    ("/v1/completions", '{"prompt": "x", "temperature": NaN}', 400, "temperature", None),
    ("/v1/completions", '{"prompt": "x", "top_p": 1.5}', 400, "top_p", None),
    ("/v1/completions", '{"prompt": "x", "n": 0}', 400, "n", None),
    ("/v1/completions", '{"prompt": "x", "n": 1000}', 400, "n", None),
    ("/v1/completions", '{"prompt": "x", "seed": 1e100}', 400, "seed", None),
    ("/v1/completions", '{"prompt": "x", "seed": 100000000000000000000000}', 400, "seed", None),
    ("/v1/completions", '{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop", None),
    ("/v1/completions", '{"prompt": "x", "stream": "yes"}', 400, "stream", None),
    ("/v1/completions", '{"prompt": "x", "n": 1.5}', 400, "n", None),
    ("/v1/completions", '{"prompt": "x", "n": "1"}', 400, "n", None),
    ("/v1/chat/completions", '{"messages": [{"role": "tool"}]}', 400, "messages", None),
    ("/v1/chat/completions", '{"messages": [{"role": "tool", "content": null}]}', 400, "messages", None),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": null}]}', 400, "messages", None),
    ("/v1/completions", '{"prompt": "x", "n": 200}', 400, "n", None),
    ("/v1/completions", '{"prompt": "x", "logprobs": 21}', 400, "logprobs", None),
    ("/v1/completions", '{"prompt": "x", "max_tokens": 0, "logprobs": 2}', 400, "max_tokens", None),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}', 400, None,
     None),
    ("/v1/completions", '{"prompt": "\\ud800"}', 400, "prompt", "invalid_unicode"),
    ("/v1/completions", '{"prompt": ["ok", "a\\udfffb"]}', 400, "prompt", "invalid_unicode"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "messages",
     "invalid_unicode"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
     400, "messages", "invalid_unicode"),
]


@pytest.mark.parametrize("path,raw,status,param,code", BAD_INPUTS)
def test_bad_input_fails_only_itself(server: ServerThread, http: "httpx.Client", path: str, raw: str, status: int,
                                     param: str | None, code: str | None) -> None:
    r = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert_error(r, status, param, code)
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_integral_floats_are_integers(http: "httpx.Client") -> None:  # JSON Schema: 1.0 is an integer
    r = http.post("/v1/completions", json={"prompt": "hello", "n": 2.0, "max_tokens": 3.0, "seed": 7.0,
                                           "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 2 and r.json()["usage"]["completion_tokens"] == 6
    r = http.post("/v1/chat/completions", json={"messages": USER, "max_completion_tokens": 2.0, "n": 1.0})
    assert r.status_code == 200, r.text
    assert "needs content" in http.post("/v1/chat/completions",
                                        json={"messages": [{"role": "tool"}]}).json()["error"]["message"]


@pytest.mark.parametrize("raw", [b'{"prompt": "caf\xe9"}', b'\x80{}', b'{"prompt": "\xff\xfe"}'])
def test_raw_non_utf8_body_is_400(http: "httpx.Client", raw: bytes) -> None:
    assert_error(http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"}), 400,
                 code="invalid_encoding")


# ---------------------------------------------------------------- logprobs, echo (lm-eval loglikelihood)
@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Any:
    """transformers' own forward of the same checkpoint: log-probabilities [L-1, V] of each next token."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1].float(), -1)
    return logprobs


def test_echo_scores_prompt_tokens_like_transformers(http: "httpx.Client", reference: Any) -> None:
    prompts = [[5, 17, 42, 99, 7, 250, 3], [60, 61]]  # different lengths: the padded-batch path
    r = http.post("/v1/completions", json={"prompt": prompts, "echo": True, "max_tokens": 0, "logprobs": 3})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["usage"]["completion_tokens"] == 0 and out["usage"]["prompt_tokens"] == 9
    for ids, choice in zip(prompts, out["choices"]):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        ref = reference(ids)  # [L-1, V]
        want = ref.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]), want, atol=1e-4, rtol=1e-4)
        for top, row in zip(lp["top_logprobs"][1:], ref):
            best = row.topk(3).values
            assert 1 <= len(top) <= 3 and abs(max(top.values()) - float(best[0])) < 1e-4
            assert all(any(abs(v - float(b)) < 1e-4 for b in best) for v in top.values())


def test_lm_eval_loglikelihood_request(http: "httpx.Client", reference: Any) -> None:
    """What lm-eval's local-completions sends for loglikelihood: echo, max_tokens=1, logprobs=1, greedy; it sums
    token_logprobs[ctxlen:-1] and calls the continuation greedy when each equals max(top_logprobs)."""
    ids = [40, 41, 42, 43, 44, 45]
    ctxlen = 3
    r = http.post("/v1/completions", json={"prompt": [ids], "echo": True, "max_tokens": 1, "logprobs": 1,
                                           "temperature": 0, "seed": 1234})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt and the one generated token
    ref = reference(ids)
    want = ref.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)[ctxlen - 1:]
    assert abs(sum(lp["token_logprobs"][ctxlen:-1]) - float(want.sum())) < 1e-3
    greedy_next = int(reference(ids + [0])[len(ids) - 1].argmax())  # the generated token is the argmax
    assert lp["token_logprobs"][-1] == pytest.approx(max(lp["top_logprobs"][-1].values()), abs=1e-5)
    assert abs(lp["token_logprobs"][-1] - float(reference(ids + [greedy_next])[-1, greedy_next])) < 1e-4
    assert r.json()["choices"][0]["text"].startswith(http.post("/v1/completions", json={
        "prompt": [ids], "echo": True, "max_tokens": 0}).json()["choices"][0]["text"])


def test_generated_token_logprobs(http: "httpx.Client", reference: Any) -> None:
    r = http.post("/v1/completions", json={"prompt": [[9, 8, 7]], "max_tokens": 6, "logprobs": 2,
                                           "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == 6 == r.json()["usage"]["completion_tokens"]
    for v, top in zip(lp["token_logprobs"], lp["top_logprobs"]):  # greedy: each token is the most likely one
        assert v == pytest.approx(max(top.values()), abs=1e-5)
    chat = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4, "logprobs": True,
                                                   "top_logprobs": 3, "temperature": 0, "ignore_eos": True}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == chat["usage"]["completion_tokens"] == 4
    assert all(len(c["top_logprobs"]) == 3 and c["logprob"] <= 0 and isinstance(c["bytes"], list) for c in content)


def test_body_size_limit(http: "httpx.Client") -> None:
    big = json.dumps({"prompt": "x" * (9 << 20), "max_tokens": 1})
    assert_error(http.post("/v1/completions", content=big, headers={"Content-Type": "application/json"}), 413,
                 code="request_too_large")


def test_unknown_route_and_method(http: "httpx.Client") -> None:
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get("/v1/completions"), 405)


def test_openai_client_raises_typed_errors(client: "openai.OpenAI") -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=10**6)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=USER)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=USER, temperature=9)


def test_api_key_enforced(server: ServerThread) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic x"}):
        assert_error(httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"}, headers=headers), 401,
                     code="invalid_api_key")
        assert httpx.get(f"{server.url}/metrics", headers=headers).status_code == 401
        assert httpx.post(f"{server.url}/v1/completions", content="{bad", headers=headers).status_code == 401
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(f"{server.url}/health").status_code == 200


# ---------------------------------------------------------------- cancellation, overflow
def test_cancellation_storm_leaks_nothing(server: ServerThread, client: "openai.OpenAI",
                                          http: "httpx.Client") -> None:
    before = metrics(http)
    # 0.5 s to wait for the answer; connecting gets longer because client and server share this process's GIL
    # on two cores, and 100 simultaneous connects through anyio's resolver threads alone can take over 0.5 s
    impatient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0,
                                   timeout=httpx.Timeout(0.5, connect=30.0, pool=30.0))

    async def one(i: int) -> str:
        kw: dict[str, Any] = dict(model=MODEL, max_tokens=200, extra_body={"ignore_eos": True})
        try:
            if i % 4 == 0:  # streams the client walks away from after a few chunks
                stream = await impatient.chat.completions.create(messages=USER, stream=True, **kw)
                async for n, _ in aenumerate(stream):
                    if n == 3:
                        break
                await stream.close()
                return "closed"
            if i % 4 == 1:
                await impatient.chat.completions.create(messages=USER, **kw)
            else:
                await impatient.completions.create(prompt="hello world", **kw)
            return "done"
        except openai.APITimeoutError:
            return "timeout"

    async def storm() -> list[str]:
        try:  # warm up the client's async stack (first-use imports, TLS context) so only the server is timed
            await impatient.models.list(timeout=30)
            return list(await asyncio.gather(*(one(i) for i in range(100))))
        finally:
            await impatient.close()

    outcomes = asyncio.run(storm())
    assert outcomes.count("timeout") >= 50, outcomes
    t = time.monotonic()
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=8)
    assert time.monotonic() - t < 5.0 and r.choices[0].text is not None
    wait_idle(server)
    loop = engine_loop(server)
    assert loop.batcher.active == [] and loop.batcher.free_slots() == loop.max_batch and not loop.waiting
    after = metrics(http)
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    finished = sum(delta(f"moetandem_sequences_finished_total{{finish_reason={r}}}")
                   for r in ("stop", "length", "cancelled", "error"))
    assert delta("moetandem_sequences_submitted_total") == finished  # every accepted sequence left the engine
    assert delta("moetandem_sequences_finished_total{finish_reason=cancelled}") >= outcomes.count("timeout") / 2
    assert after["moetandem_requests_running"] == 0 and after["moetandem_requests_waiting"] == 0


async def aenumerate(it: Any) -> Any:
    n = 0
    async for x in it:
        yield n, x
        n += 1


def test_queue_overflow_is_429_with_retry_after(model_dir: Path) -> None:
    app = create_app(load(model_dir), model_id=MODEL, max_batch=1, max_waiting=1)
    long = {"prompt": "hello", "max_tokens": 240, "ignore_eos": True, "stream": True}
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        batcher = app.state.server.loop.batcher
        real_step = batcher.step

        def slow_step() -> Any:  # >= 2.4 s per long request however fast the machine: the queue stays full
            time.sleep(0.01)
            return real_step()
        batcher.step = slow_step
        with c.stream("POST", "/v1/completions", json=long) as a, c.stream("POST", "/v1/completions", json=long) as b:
            assert a.status_code == b.status_code == 200  # one decoding, one waiting: both accepted
            r = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2})
            assert_error(r, 429, code="rate_limit_exceeded")
            assert int(r.headers["Retry-After"]) >= 1
            # 3 sequences can never fit 1 slot + 1 queue place, busy or not: 400, not "retry"
            r = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2, "n": 3})
            assert_error(r, 400, param="n", code="too_many_sequences")
            assert "Retry-After" not in r.headers
            with pytest.raises(openai.RateLimitError):
                openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0).completions.create(
                    model=MODEL, prompt="hello", max_tokens=2)
        m = c.get("/metrics").text
        assert "moetandem_requests_rejected_total 2.0" in m
        wait_idle(srv, 10)  # both streams were closed mid-way: their slot and queue entry are freed
        assert c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2}).status_code == 200
        assert c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2, "n": 2}).status_code == 200
        assert_error(c.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2, "n": 2}), 400,
                     code="too_many_sequences")


# ---------------------------------------------------------------- graceful drain
def sse_lines(c: "httpx.Client", body: dict[str, Any], into: list[str], started: threading.Event) -> None:
    with c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line:
                into.append(line)
                started.set()


def test_drain_finishes_streams_and_ends_the_rest_with_done(model_dir: Path) -> None:
    """Shutdown (what SIGTERM does): new requests get 503 at once, a stream that can finish within the drain
    timeout finishes normally, one that cannot gets an error event and [DONE] - never a cut body."""
    app = create_app(load(model_dir), model_id=MODEL, max_batch=2)
    srv = ServerThread(app, drain_timeout=1.5).start()
    batcher = app.state.server.loop.batcher
    real_step = batcher.step

    def slow_step() -> Any:  # 240 tokens take >= 4.8 s: the long stream cannot finish in the 1.5 s drain
        time.sleep(0.02)
        return real_step()
    batcher.step = slow_step
    lines: dict[str, list[str]] = {"short": [], "long": []}
    base = {"prompt": "hello", "ignore_eos": True, "stream": True, "temperature": 0}
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        readers = []
        for name, max_tokens in (("short", 20), ("long", 240)):
            started = threading.Event()
            t = threading.Thread(target=sse_lines, args=(c, {**base, "max_tokens": max_tokens}, lines[name],
                                                         started))
            t.start()
            assert started.wait(10)
            readers.append(t)
        t0 = time.monotonic()
        srv.shutdown()
        while c.get("/health").json()["status"] != "draining":  # uvicorn notices should_exit within ~0.1 s
            assert time.monotonic() - t0 < 5.0
            time.sleep(0.01)
        r = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 1})  # the socket accepts, but ...
        assert_error(r, 503, code="server_shutting_down")  # ... the server takes no new work
        for t in readers:
            t.join(15)
    srv.stop()
    short, long = lines["short"], lines["long"]
    assert short[-1] == "data: [DONE]" and long[-1] == "data: [DONE]"
    short_events = [json.loads(e[6:]) for e in short[:-1]]
    assert all("error" not in e for e in short_events)
    assert short_events[-1]["choices"][0]["finish_reason"] == "length"
    long_events = [json.loads(e[6:]) for e in long[:-1]]
    assert "error" in long_events[-1] and long_events[-1]["error"]["code"] == "server_shutting_down"
    assert "drain" in long_events[-1]["error"]["message"]
    assert 1 < len(long_events) < 240  # it streamed, then was ended early
    assert not srv.thread.is_alive()


def test_drain_of_an_idle_server_is_immediate(model_dir: Path) -> None:
    app = create_app(load(model_dir), model_id=MODEL)
    srv = ServerThread(app, drain_timeout=30).start()
    assert httpx.post(f"{srv.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 5 and not srv.thread.is_alive()


# ---------------------------------------------------------------- health, engine failures
def test_health_while_loading_then_ready(model_dir: Path) -> None:
    release = threading.Event()

    def slow_loader() -> Engine:
        release.wait(30)
        return load(model_dir)

    app = create_app(loader=slow_loader, model_id=MODEL)
    with ServerThread(app) as srv:
        r = httpx.get(f"{srv.url}/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert_error(httpx.post(f"{srv.url}/v1/completions", json={"prompt": "x"}), 503, code="model_loading")
        release.set()
        deadline = time.monotonic() + 30
        while httpx.get(f"{srv.url}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.post(f"{srv.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_engine_error_fails_its_batch_then_dead_engine_is_503(model_dir: Path) -> None:
    app = create_app(load(model_dir), model_id=MODEL)
    body = {"prompt": "x", "max_tokens": 5, "ignore_eos": True}  # ignore_eos: it must reach a decode step
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        batcher = app.state.server.loop.batcher
        real_step = batcher.step
        batcher.step = lambda: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore[method-assign]
        assert_error(c.post("/v1/completions", json=body), 500, code="engine_error")
        batcher.step = real_step  # type: ignore[method-assign]
        assert c.post("/v1/completions", json=body).status_code == 200
        assert c.get("/health").status_code == 200

        batcher.step = lambda: (_ for _ in ()).throw(RuntimeError("broken for good"))  # type: ignore[method-assign]
        for _ in range(app.state.server.loop.MAX_CONSECUTIVE_ERRORS):
            assert c.post("/v1/completions", json=body).status_code == 500
        health = c.get("/health")
        assert health.status_code == 503 and "broken for good" in health.json()["detail"]
        app.state.server.loop.consecutive_errors = 0  # (an operator would restart the server)

        def die() -> None:
            raise SystemExit("engine thread killed")
        batcher.step = die  # type: ignore[method-assign]
        r = c.post("/v1/completions", json=body)
        assert r.status_code in (500, 503)
        health = c.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert_error(c.post("/v1/completions", json=body), 503)


# ---------------------------------------------------------------- metrics
def test_metrics_parse_and_count(server: ServerThread, client: "openai.OpenAI", http: "httpx.Client") -> None:
    wait_idle(server)
    before = metrics(http)
    r = client.completions.create(model=MODEL, prompt="the quick brown fox", max_tokens=7, temperature=0,
                                  extra_body={"ignore_eos": True})
    http.post("/v1/completions", json={"prompt": ""})
    after = metrics(http)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("moetandem_prompt_tokens_total") == r.usage.prompt_tokens
    assert delta("moetandem_generation_tokens_total") == r.usage.completion_tokens == 7
    assert delta("moetandem_time_to_first_token_seconds_count") == 1
    assert delta("moetandem_time_per_output_token_seconds_count") == 6
    assert delta("moetandem_e2e_request_latency_seconds_count") == 1
    assert delta('moetandem_sequences_finished_total{finish_reason=length}') == 1
    assert delta("moetandem_http_requests_total{path=/v1/completions,status=200}") == 1
    assert delta("moetandem_http_requests_total{path=/v1/completions,status=400}") == 1
    for name in ("moetandem_requests_running", "moetandem_requests_waiting", "moetandem_batch_slots"):
        assert name in after


# ---------------------------------------------------------------- property-based: never a 5xx
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(), st.text(max_size=8),
                 st.lists(st.integers(-2, 400), max_size=4), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                              max_size=2))
TEXT = st.text(max_size=30)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]), "content": TEXT})
SAMPLING = {  # valid values
    "temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=4), "n": st.integers(1, 3),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(), "presence_penalty": st.floats(-2, 2), "user": TEXT,
}
EDGES = {  # invalid or boundary values per field (JUNK covers wrong types)
    "model": st.text(max_size=6), "max_tokens": st.integers(-2, 0) | st.integers(300, 10**30),
    "temperature": st.floats(2, 1e308, exclude_min=True) | st.floats(max_value=0, exclude_max=True),
    "top_p": st.floats(1, 10, exclude_min=True) | st.floats(-10, 0, exclude_max=True),
    "seed": st.integers(2**63, 2**80) | st.integers(-(2**80), -(2**63) - 1), "n": st.integers(-2, 0) |
    st.integers(17, 1000), "stop": st.lists(st.text(max_size=3), min_size=5, max_size=8),
    "messages": st.lists(st.fixed_dictionaries({"role": TEXT, "content": TEXT | JUNK}), max_size=2),
    "prompt": st.just("") | st.lists(st.integers(-5, 10**6), max_size=4) | st.lists(st.lists(st.integers(0, 300))),
    "stream_options": st.fixed_dictionaries({"include_usage": JUNK}),
}
CHAT_BODY = st.fixed_dictionaries({"model": st.just(MODEL), "messages": st.lists(MESSAGE, min_size=1, max_size=3),
                                   "max_tokens": st.integers(1, 6)}, optional=SAMPLING)
COMPLETION_BODY = st.fixed_dictionaries({"model": st.just(MODEL), "max_tokens": st.integers(1, 6),
                                         "prompt": TEXT.filter(bool) | st.lists(TEXT.filter(bool), min_size=1,
                                                                                 max_size=3)
                                         | st.lists(st.integers(0, 300), min_size=1, max_size=5)},
                                        optional=SAMPLING)


@st.composite
def corrupted(draw: Any, valid: Any) -> dict[str, Any]:
    """A valid body with 0-2 fields replaced by a wrong type, an out-of-range value, or removed."""
    body = dict(draw(valid))
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(sorted(set(EDGES) | set(SAMPLING))))
        if key == "max_tokens" and draw(st.booleans()):
            continue  # never drop max_tokens: the default (up to the context end) only makes examples slow
        body[key] = draw(EDGES.get(key, JUNK) | JUNK.filter(lambda v: v is not None or key != "max_tokens"))
    return body


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.one_of(st.tuples(st.just("/v1/chat/completions"), corrupted(CHAT_BODY)),
                 st.tuples(st.just("/v1/completions"), corrupted(COMPLETION_BODY)),
                 st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions"]), st.binary(max_size=40))))
def test_property_no_5xx(http: "httpx.Client", case: tuple[str, dict[str, Any] | bytes]) -> None:
    path, body = case
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()  # NaN / Infinity included
    r = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    event(f"HTTP {r.status_code}")
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    elif r.headers["content-type"].startswith("text/event-stream"):
        lines = [line for line in r.text.splitlines() if line]
        assert lines[-1] == "data: [DONE]"
        assert all("error" not in json.loads(line[6:]) for line in lines[:-1])
    else:
        out = r.json()
        assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]


# ---------------------------------------------------------------- admin: live expert budget
def test_admin_expert_budget_live(model_dir: Path) -> None:
    eng = moetandem.load(model_dir, device="cpu", dtype="float32", progress=False, expert_budget=0.5,
                                 policy="auto")
    full = eng.store.expert_bytes(torch.float32) * eng.store.num_experts * len(eng.store.layers)
    app = create_app(eng, model_id=MODEL, api_key=KEY)
    auth = {"Authorization": f"Bearer {KEY}"}
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.post("/admin/expert-budget", json={"budget": 0.25}).status_code == 401  # the key is required
        before = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 8, "temperature": 0}, headers=auth).json()
        r = c.post("/admin/expert-budget", json={"budget": 0.25}, headers=auth)
        assert r.status_code == 200 and r.json()["resident_expert_bytes"] <= full // 4
        assert eng.provider.expert_bytes() <= full // 4
        r = c.post("/admin/expert-budget", json={"budget": "1KiB"}, headers=auth)  # below one token's experts
        assert_error(r, 400, param="budget", code="invalid_expert_budget")
        after = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 8, "temperature": 0}, headers=auth).json()
        assert after["choices"][0]["text"] == before["choices"][0]["text"]  # exact policy: same tokens
        assert c.get("/health").status_code == 200


def test_sigterm_drains_and_exits_zero(tmp_path):
    """`moetandem serve` on SIGTERM: drains, then exits 0 (not killed by the signal it caught)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx
    port_file = tmp_path / "log"
    proc = subprocess.Popen([sys.executable, "-m", "moetandem", "serve", "--port", "0", "--device", "cpu",
                             "--drain-timeout", "2"], stdout=subprocess.PIPE, stderr=open(port_file, "w"),
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            text = port_file.read_text()
            if "on http://" in text:
                url = text.split("on http://", 1)[1].split()[0]
            time.sleep(0.2)
        assert url, port_file.read_text()
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, port_file.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_server_prepares_every_batch_size_and_starts_when_that_fails(model_dir: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """At load the server runs the decode step of every batch size it can hold (on a GPU: compiled and captured
    before the first request); if that fails, it logs it and serves anyway."""
    from moetandem.batcher import Batcher
    eng = load(model_dir)
    app = create_app(eng, model_id=MODEL, max_batch=4)
    with ServerThread(app) as srv:
        assert {a for a, _ in eng.graphs.entries} == {1, 2, 4}
        assert httpx.get(f"{srv.url}/health").status_code == 200

    def broken(self: Batcher, on_size: Any = None) -> list[int]:
        raise torch.OutOfMemoryError("CUDA out of memory (test)")
    monkeypatch.setattr(Batcher, "warm_up", broken)
    with ServerThread(create_app(load(model_dir), model_id=MODEL, max_batch=4)) as srv:
        assert httpx.get(f"{srv.url}/health").status_code == 200
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 3},
                       timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
