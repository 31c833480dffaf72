"""Every runnable family answers a chat request through the OpenAI-compatible server (issue 16's per-family target):
the registry's tiny checkpoint plus a word-level tokenizer with a chat template, served in-process."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

import moetandem  # noqa: E402
from moetandem.serve import create_app  # noqa: E402
from moetandem.serve.server_thread import ServerThread  # noqa: E402

WORDS = "hello world how are you the cat sat on a mat and dog ran far away".split()
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def with_tokenizer(src: Path, dst: Path) -> Path:
    """A copy of the checkpoint with a word-level tokenizer whose ids fit the tiny vocabulary (256)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    shutil.copytree(src, dst)
    specials = ["<unk>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                                   additional_special_tokens=specials[2:])
    fast.chat_template = TEMPLATE
    fast.save_pretrained(dst)
    return dst


def test_family_answers_a_chat_request(tiny_checkpoint: tuple[str, Path], tmp_path: Path) -> None:
    family, path = tiny_checkpoint
    model = with_tokenizer(path, tmp_path / family)
    engine = moetandem.load(model, device="cpu", dtype="float32", progress=False)
    with ServerThread(create_app(engine, model_id=family, max_batch=2)) as srv:
        r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=60, json={
            "model": family, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "hello how are you"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    assert 1 <= body["usage"]["completion_tokens"] <= 4 and body["usage"]["prompt_tokens"] >= 1
