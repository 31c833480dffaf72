"""`moetandem generate` in-process (capsys) and once as `python -m moetandem` in a subprocess."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import moetandem
from moetandem import Engine, assets
from moetandem.cli import main
from moetandem.streaming import TextStream

REPO = Path(__file__).resolve().parents[1]
STATS = re.compile(r"(?:^|\r)\[moetandem\] prompt (\d+) tok \| generated (\d+) tok \| prefill [\d.]+ s \| "
                   r"decode [\d.]+ tok/s \| peak mem [\d.]+ (MiB|GiB)$", re.M)
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def byte_tokenizer(chat_template: str | None = None):
    """Byte-level BPE with exactly the 256 byte tokens (the tiny models' vocab) and no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)
    fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import build_checkpoint
    return build_checkpoint("mixtral", tmp_path_factory.mktemp("cli") / "plain")


@pytest.fixture(scope="module")
def chat_ckpt(ckpt: Path) -> Path:
    d = ckpt.parent / "chat"
    shutil.copytree(ckpt, d)
    byte_tokenizer(CHAT_TEMPLATE).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def text_ckpt(ckpt: Path) -> Path:
    d = ckpt.parent / "text"
    shutil.copytree(ckpt, d)
    byte_tokenizer().save_pretrained(d)
    return d


def generate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(["generate", "--device", "cpu", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "moetandem: error:" in line]
    assert len(lines) == 1 and lines[0].startswith("moetandem: error: "), err
    return lines[0]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"moetandem {moetandem.__version__}"


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["generate", "--max-new-tokens", "x"]) == 2
    assert main(["generate", "--prompt", "1", "--temperature", "nan"]) == 2
    assert main(["generate", "--prompt", "1", "--device", "tpu"]) == 2
    assert "not a finite number" in capsys.readouterr().err


def test_generate_token_ids(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = generate(capsys, "--model", str(ckpt), "--prompt", "5 17 42", "--max-new-tokens", "6")
    assert rc == 0, err
    want = moetandem.load(ckpt, device="cpu", dtype="float32", progress=False).generate(
        [[5, 17, 42]], max_new_tokens=6)[0].token_ids
    assert out == " ".join(map(str, want)) + "\n"
    assert STATS.search(err).groups()[:2] == ("3", "6"), err


def test_generate_text_streams_what_the_engine_decodes(text_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--prompt", "héllo wörld", "--max-new-tokens", "12", "--temperature", "0.9", "--top-p", "0.95",
            "--seed", "7"]
    rc, out, err = generate(capsys, "--model", str(text_ckpt), *args)
    assert rc == 0, err
    engine = moetandem.load(text_ckpt, device="cpu", dtype="float32", progress=False)
    want = engine.generate("héllo wörld", max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7)[0].text
    assert out == want + "\n"
    assert STATS.search(err).groups()[:2] == (str(len("héllo wörld".encode())), "12")


def test_text_stream_holds_back_partial_characters() -> None:
    tok = byte_tokenizer()
    text = "naïve café → 🙂 done"
    ids = tok(text)["input_ids"]
    assert len(ids) > len(text)  # multi-byte characters span several tokens
    stream = TextStream(tok, tok("prompt: ")["input_ids"])
    pieces = [stream.push(t) for t in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[-1] == "" and sum(1 for p in pieces if p) > 5  # streamed as it went, nothing left at the end


def test_text_stream_flushes_an_unfinished_character() -> None:
    tok = byte_tokenizer()
    ids = tok("ok 🙂")["input_ids"][:-1]  # generation stopped inside the emoji
    stream = TextStream(tok)
    streamed = "".join(stream.push(t) for t in ids)
    assert streamed == "ok " and stream.flush() == "\ufffd"


def test_chat_wraps_prompt_in_template(chat_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = generate(capsys, "--model", str(chat_ckpt), "--prompt", "hi", "--max-new-tokens", "3", "--chat")
    assert rc == 0, err
    assert STATS.search(err).group(1) == str(len("<user>hi\n<assistant>"))


@pytest.mark.parametrize("which, why", [("text_ckpt", "has no chat template"), ("ckpt", "ships no tokenizer")])
def test_chat_needs_a_template(which: str, why: str, request: pytest.FixtureRequest,
                               capsys: pytest.CaptureFixture[str]) -> None:
    path = request.getfixturevalue(which)
    rc, _, err = generate(capsys, "--model", str(path), "--prompt", "hi", "--chat")
    assert rc == 2 and why in one_error_line(err)


def test_default_model_is_the_demo(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(assets, "DEMO_DIR", tmp_path / "absent")
    rc, _, err = generate(capsys, "--prompt", "1 2")
    assert rc == 2 and "demo model is not shipped" in one_error_line(err)
    monkeypatch.setattr(assets, "DEMO_DIR", ckpt)
    rc, out, err = generate(capsys, "--prompt", "1 2", "--max-new-tokens", "2")
    assert rc == 0 and len(out.split()) == 2, err


def broken_shard(ckpt: Path) -> Path:
    d = ckpt.parent / "truncated"
    if not d.exists():
        shutil.copytree(ckpt, d)
        shard = sorted(d.glob("model-*.safetensors"))[0]
        shard.write_bytes(shard.read_bytes()[:1000])
    return d


def llama(ckpt: Path) -> Path:
    d = ckpt.parent / "llama"
    if not d.exists():
        shutil.copytree(ckpt, d)
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    return d


@pytest.mark.parametrize("model, args, why", [
    (lambda c: c.parent / "nope", ["--prompt", "1"], "model directory not found"),
    (broken_shard, ["--prompt", "1"], "is truncated"),
    (llama, ["--prompt", "1"], "unsupported model_type 'llama'"),
    (lambda c: c, ["--prompt", " ".join(["1"] * 300)], "exceeds the model's context of 256 tokens"),
    (lambda c: c, ["--prompt", ""], "the prompt is empty"),
    (lambda c: c, ["--prompt", "hello"], "must be token ids"),
    (lambda c: c, ["--prompt", "1 999"], "outside the vocabulary"),
    (lambda c: c, ["--prompt", "1", "--temperature", "-1"], "need temperature >= 0"),
    (lambda c: c, ["--prompt", "1", "--top-p", "0"], "0 < top_p <= 1"),
    (lambda c: c, ["--prompt", "1", "--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
])
def test_errors_are_one_line(ckpt: Path, model, args: list[str], why: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = generate(capsys, "--model", str(model(ckpt)), *args)
    assert rc == 2 and why in one_error_line(err)


def test_ctrl_c_exits_130_quietly(ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(*_: object, **__: object) -> None:
        raise KeyboardInterrupt
    monkeypatch.setattr(Engine, "generate", interrupted)
    rc, _, err = generate(capsys, "--model", str(ckpt), "--prompt", "1 2")
    assert rc == 130 and "Traceback" not in err and "error" not in err


def test_python_dash_m_reports_one_line_and_exit_code(ckpt: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "moetandem", "generate", "--model", str(broken_shard(ckpt)),
                           "--prompt", "1 2"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    line = one_error_line(proc.stderr)
    assert proc.stderr.strip().splitlines()[-1] == line and "truncated" in line


def test_generate_with_an_expert_budget(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = generate(capsys, "--model", str(ckpt), "--prompt", "5 17 42", "--max-new-tokens", "4",
                            "--expert-budget", "0.5", "--policy", "host")
    assert rc == 0 and len(out.split()) == 4, err
    assert re.search(r"\[moetandem\] experts: hit rate [\d.]+ \| misses \d+", err), err
