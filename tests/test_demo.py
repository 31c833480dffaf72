"""The shipped demo MoE: loads offline, agrees with transformers, generates deterministically, evaluates and
traces on real routing."""
from __future__ import annotations

import moetandem
from pathlib import Path

import pytest
import torch

from moetandem import Engine
from moetandem.analysis import evaluate, trace
from moetandem.assets import demo_model_path
from moetandem.cli import main
from moetandem.models import KVCache

TEXT = ("The king said to his son that the people of the land must keep the law. "
        "And the Lord spake unto Moses, saying, Speak unto the children of Israel. "
        "We have come to this hour with a great purpose, and the nation shall endure.")


@pytest.fixture(scope="module")
def demo() -> Engine:
    return moetandem.load(demo_model_path(), device="cpu", progress=False)


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(demo_model_path(), dtype=torch.float32).eval()


def test_demo_is_a_small_hub_checkpoint():
    path = demo_model_path()
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 40 * 2**20
    assert all(f.stat().st_size <= 16 * 2**20 for f in path.glob("*.safetensors"))


def test_transformers_agrees_with_our_logits(demo, hf):
    ids = demo.encode(TEXT)
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = hf(x).logits[0]
        got = demo.forward(x, torch.arange(len(ids))[None], KVCache(demo.args, 1, len(ids), demo.device, demo.dtype),
                         len(ids))[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        want = hf.generate(x[:, :8], attention_mask=torch.ones_like(x[:, :8]), max_new_tokens=32, do_sample=False,
                           pad_token_id=0)[0, 8:].tolist()
    assert demo.generate([ids[:8]], max_new_tokens=32)[0].token_ids == want


def test_generates_english_deterministically(demo):
    a = demo.generate(["The king said"], max_new_tokens=24, temperature=0.8, top_p=0.95, seed=7)[0]
    b = demo.generate(["The king said"], max_new_tokens=24, temperature=0.8, top_p=0.95, seed=7)[0]
    assert a.token_ids == b.token_ids and a.text == b.text
    words = a.text.split()
    assert len(words) >= 5 and sum(w.strip(",.;:'!?").isalpha() for w in words) >= 0.7 * len(words)


def test_eval_matches_transformers(demo, hf):
    import torch.nn.functional as F
    res = evaluate(demo, TEXT, context=64, progress=False)
    ids = demo.encode(TEXT)
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), 64):
            w = torch.tensor([ids[i:i + 64]])
            if w.shape[1] < 2:
                continue
            logp = F.log_softmax(hf(w).logits[0, :-1], dim=-1)
            nll -= float(logp.gather(1, w[0, 1:, None]).sum())
            n += w.shape[1] - 1
    assert res.tokens == n
    assert res.perplexity == pytest.approx(torch.exp(torch.tensor(nll / n)).item(), rel=1e-4)


def test_trace_on_real_routing(demo, tmp_path: Path):
    tr = trace(demo, TEXT * 3, context=128, progress=False)
    tr.save(tmp_path)
    assert (tmp_path / "summary.md").is_file() and len(list(tmp_path.glob("*.png"))) >= 3
    assert tr.ids.shape[1] == demo.args.num_layers and tr.ids.shape[2] == 2


def test_cli_runs_the_demo_with_no_arguments(capsys):
    assert main(["generate", "--device", "cpu", "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    assert len(out.split()) >= 3 and "decode" in err


def test_demo_serves_chat_to_the_openai_client(demo):
    import openai

    from moetandem.serve.app import create_app
    from moetandem.serve.server_thread import ServerThread
    with ServerThread(create_app(demo, model_id="demo-moe")) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="demo-moe", messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=12, temperature=0)
        assert r.choices[0].message.content and r.usage.completion_tokens >= 1
