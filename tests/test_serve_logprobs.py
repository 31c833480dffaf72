"""Log-probabilities of generated tokens from the sampler's own logits (`Request.top_logprobs`): equal to
transformers' log_softmax at every step, the same streamed and not, batched with requests that ask for none,
free when nobody asks, and parsed by the official `openai` client."""
from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import moetandem.batcher
from moetandem.batcher import Batcher
from moetandem.serve import create_app
from moetandem.serve.server_thread import ServerThread
from test_serve import USER, build_tiny_model, load

PROMPT = [9, 8, 7, 40, 41]
K = 5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("serve_logprobs"))


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ServerThread]:
    with ServerThread(create_app(load(model_dir), model_id="tiny", max_batch=4, max_waiting=64)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerThread) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def next_logprobs(hf: Any, ids: list[int]) -> torch.Tensor:
    """transformers' log-probabilities [V] of the token after `ids`."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1].float(), -1)


def post(server: ServerThread, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def sse(server: ServerThread, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The data chunks of a stream (without [DONE])."""
    with httpx.stream("POST", f"{server.url}{path}", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def joined(chunks: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, list[Any]]:
    """The completions logprobs of a stream's chunks, concatenated per key (one choice)."""
    out: dict[str, list[Any]] = {k: [] for k in keys}
    for c in chunks:
        lp = c["choices"][0]["logprobs"] if c["choices"] else None
        for k in keys:
            out[k] += lp[k] if lp else []
    return out


# ---------------------------------------------------------------- the values
def test_greedy_logprobs_are_transformers_log_softmax(server: ServerThread, hf: Any) -> None:
    n = 8
    lp = post(server, "/v1/completions", {"prompt": [PROMPT], "max_tokens": n, "logprobs": K, "temperature": 0,
                                          "ignore_eos": True})["choices"][0]["logprobs"]
    tok = server.app.state.server.loop.engine.tokenizer
    ids = list(PROMPT)
    for i in range(n):
        ref = next_logprobs(hf, ids)  # [V]
        best = int(ref.argmax())
        assert lp["tokens"][i] == tok.decode([best])
        assert lp["token_logprobs"][i] == pytest.approx(float(ref[best]), abs=1e-4)
        top = list(lp["top_logprobs"][i].values())
        assert top == sorted(top, reverse=True) and len(top) <= K  # best first
        assert max(top) == lp["token_logprobs"][i]  # greedy: the chosen token heads the alternatives
        want = ref.topk(K).values
        assert all(any(abs(v - float(w)) < 1e-4 for w in want) for v in top)
        ids.append(best)


def test_logprobs_are_the_raw_distribution(server: ServerThread, hf: Any) -> None:
    """logit_bias picks the token, but its reported logprob is the model's own (as vLLM's default)."""
    forced = 200
    body = {"prompt": [PROMPT], "max_tokens": 3, "logprobs": 2, "temperature": 0, "ignore_eos": True,
            "logit_bias": {str(forced): 100}}
    lp = post(server, "/v1/completions", body)["choices"][0]["logprobs"]
    for i, v in enumerate(lp["token_logprobs"]):
        assert v == pytest.approx(float(next_logprobs(hf, PROMPT + [forced] * i)[forced]), abs=1e-4)
        assert v < -1e-3  # not the biased distribution, where it would be ~0
    sampled = post(server, "/v1/completions", {**body, "temperature": 0.7, "seed": 3, "logit_bias": None})
    assert all(v <= 0 for v in sampled["choices"][0]["logprobs"]["token_logprobs"])


# ---------------------------------------------------------------- streamed = not streamed
def test_streamed_completion_logprobs_equal_non_streamed(server: ServerThread) -> None:
    body = {"prompt": [PROMPT], "max_tokens": 10, "logprobs": 3, "temperature": 0, "ignore_eos": True}
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    whole = post(server, "/v1/completions", body)["choices"][0]
    chunks = sse(server, "/v1/completions", body)
    assert joined(chunks, keys) == {k: whole["logprobs"][k] for k in keys}
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    text = whole["text"]
    if len(text) > 4:  # a stop string holds text (and so its tokens' logprobs) back: still the same in the end
        stop = {**body, "stop": [text[3:5]]}
        whole = post(server, "/v1/completions", stop)["choices"][0]
        assert joined(sse(server, "/v1/completions", stop), keys) == {k: whole["logprobs"][k] for k in keys}


def test_streamed_echo_equals_non_streamed(server: ServerThread) -> None:
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    for max_tokens in (0, 3):
        body = {"prompt": [PROMPT], "max_tokens": max_tokens, "echo": True, "logprobs": 2, "temperature": 0}
        whole = post(server, "/v1/completions", body)["choices"][0]
        chunks = sse(server, "/v1/completions", body)
        assert joined(chunks, keys) == {k: whole["logprobs"][k] for k in keys}
        assert len(whole["logprobs"]["tokens"]) == len(PROMPT) + max_tokens
        assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
        assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]


def test_streamed_chat_logprobs_equal_non_streamed(server: ServerThread, client: "openai.OpenAI") -> None:
    body: dict[str, Any] = {"messages": USER, "max_tokens": 8, "logprobs": True, "top_logprobs": 2,
                            "temperature": 0, "ignore_eos": True}
    whole = post(server, "/v1/chat/completions", body)["choices"][0]["logprobs"]["content"]
    streamed = [e for c in sse(server, "/v1/chat/completions", body) if c["choices"]
                for e in (c["choices"][0]["logprobs"] or {}).get("content", [])]
    assert streamed == whole and len(whole) == 8
    # the openai client parses both shapes
    kw = {**{k: v for k, v in body.items() if k != "ignore_eos"}, "extra_body": {"ignore_eos": True}}
    r = client.chat.completions.create(model="tiny", **kw)
    assert [e.logprob for e in r.choices[0].logprobs.content] == [e["logprob"] for e in whole]
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
               for e in r.choices[0].logprobs.content)
    got = [e.logprob for ch in client.chat.completions.create(model="tiny", stream=True, **kw)
           if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content or []]
    assert got == [e["logprob"] for e in whole]
    c = client.completions.create(model="tiny", prompt=[PROMPT], max_tokens=4, logprobs=2, temperature=0,
                                  stream=True, extra_body={"ignore_eos": True})
    assert len([t for ch in c if ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens or []]) == 4


# ---------------------------------------------------------------- batching
def test_mixed_batch_gives_each_request_its_solo_tokens(server: ServerThread) -> None:
    bodies = [{"prompt": [[5 + i, 17, 42, 99][: 2 + i % 3]], "max_tokens": 6 + i, "ignore_eos": True,
               "temperature": 0 if i % 2 else 0.9, "seed": i, **({"logprobs": i % 4} if i % 3 else {})}
              for i in range(8)]
    alone = [post(server, "/v1/completions", b)["choices"][0] for b in bodies]
    together: list[Any] = [None] * len(bodies)

    def run(i: int) -> None:
        together[i] = post(server, "/v1/completions", bodies[i])["choices"][0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [c["text"] for c in together] == [c["text"] for c in alone]
    for b, a, t in zip(bodies, alone, together):
        if "logprobs" not in b:
            assert t["logprobs"] is None
            continue
        assert t["logprobs"]["tokens"] == a["logprobs"]["tokens"]
        torch.testing.assert_close(torch.tensor(t["logprobs"]["token_logprobs"]),
                                   torch.tensor(a["logprobs"]["token_logprobs"]), atol=1e-4, rtol=0)
        assert all(len(top) <= b["logprobs"] for top in t["logprobs"]["top_logprobs"])


def test_no_logprob_work_when_nobody_asks(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a request asking, the batcher never computes (nor reads back) a log-probability; with one asking,
    only its row is scored and the others' tokens are unchanged."""
    engine = load(model_dir)
    calls: list[int] = []
    real = moetandem.batcher.token_logprobs

    def spy(rows: torch.Tensor, tokens: list[int], k: int) -> Any:
        calls.append(rows.shape[0])
        return real(rows, tokens, k)

    monkeypatch.setattr(moetandem.batcher, "token_logprobs", spy)

    def run(ask: bool) -> list[list[int]]:
        b = Batcher(engine, max_batch=3, max_len=64)
        seqs = [engine.make_sequence(p, 5, stop_on_eos=False) for p in ([1, 2, 3], [4, 5], [6, 7, 8, 9])]
        if ask:
            seqs[1].top_logprobs = 2
        b.add(seqs)
        while b.active:
            b.step()
        if ask:
            assert len(seqs[1].logprobs) == 5 and all(len(e.top) == 2 for e in seqs[1].logprobs)
            assert [e.token for e in seqs[1].logprobs] == seqs[1].out
        assert not seqs[0].logprobs and not seqs[2].logprobs
        return [s.out for s in seqs]

    plain = run(False)
    assert calls == []
    assert run(True) == plain and calls == [1] * 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_step_logprobs_equal_a_full_forward(model_dir: Path) -> None:
    """On CUDA the decode step is a graph replay whose logits buffer is reused: the logprobs read from it equal
    a full forward's (scoring.score), and asking for them changes no token."""
    import moetandem
    from moetandem.serve.scoring import score
    engine = moetandem.load(model_dir, device="cuda", dtype="float32", progress=False)
    assert engine.graphs is not None

    def run(ask: bool) -> list[Any]:
        b = Batcher(engine, max_batch=3, max_len=64)
        seqs = [engine.make_sequence(p, 12, stop_on_eos=False) for p in ([1, 2, 3], [4, 5], [6, 7, 8, 9])]
        if ask:
            seqs[0].top_logprobs, seqs[2].top_logprobs = 3, 0
        b.add(seqs)
        while b.active:
            b.step()
        return seqs

    plain, asked = run(False), run(True)
    assert [s.out for s in plain] == [s.out for s in asked]
    for s in (asked[0], asked[2]):
        (full,) = score(engine, [s.prompt + s.out], 3)
        want = full[len(s.prompt) - 1:]  # the generated tokens' entries
        assert [e.token for e in s.logprobs] == [e.token for e in want] == s.out
        torch.testing.assert_close(torch.tensor([e.logprob for e in s.logprobs]),
                                   torch.tensor([e.logprob for e in want]), atol=1e-3, rtol=0)


def test_token_bytes_are_the_tokens_own(model_dir: Path) -> None:
    """Tokens holding part of a UTF-8 character decode to U+FFFD; their `bytes` are still their own, so the
    bytes of a text's tokens joined are the text's."""
    from transformers import AutoTokenizer
    from moetandem.serve.logprobs import chat_logprobs
    from moetandem.sampling import TokenLogprob
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = "é€ hello"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    content = chat_logprobs(tok, [TokenLogprob(t, -1.0, [(t, -1.0)]) for t in ids])["content"]
    assert any(c["token"] == "\ufffd" for c in content)  # the test means something: split characters
    assert bytes(b for c in content for b in c["bytes"]).decode() == text
    assert all(c["top_logprobs"][0]["bytes"] == c["bytes"] for c in content)


def test_streamed_logprobs_per_choice_with_n(server: ServerThread) -> None:
    body = {"prompt": [PROMPT], "max_tokens": 6, "logprobs": 1, "n": 3, "temperature": 0.8, "seed": 7,
            "ignore_eos": True}
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    whole = post(server, "/v1/completions", body)["choices"]
    chunks = sse(server, "/v1/completions", body)
    for c in whole:
        mine = [ch for ch in chunks if ch["choices"] and ch["choices"][0]["index"] == c["index"]]
        assert joined(mine, keys) == {k: c["logprobs"][k] for k in keys}
        assert len(c["logprobs"]["tokens"]) == 6
