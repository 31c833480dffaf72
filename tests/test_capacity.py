"""bench/capacity.py on CPU: thin ends (no weights) against a `moetandem cloud` subprocess make the tokens of one
process, in ceil((new - 1) / k) decode exchanges each; the report has a row per ends count and the capacity line;
tokens that differ from the reference fail the run; a cloud that does not start, one without `decode` frames and a
directory that is no checkpoint end in one-line errors."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from conftest import build_checkpoint

import moetandem
from moetandem.split import cloud_session
from moetandem.split.cloud import CloudServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import capacity  # noqa: E402
from bench.thin_end import ThinEnd, model_info  # noqa: E402

NEW, K = 6, 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint("olmoe", tmp_path_factory.mktemp("capacity"))


def args(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(ckpt), "--device", "cpu", "--new", str(NEW), "--decode-tokens", str(K), "--out", str(out),
            "--distinct-prompts", "2", "--prompt-len", "5", *extra]


def test_thin_ends_make_the_tokens_of_one_process(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert capacity.main(args(ckpt, tmp_path, "--ends", "1,3", "--tpot-ms", "1000000")) == 0
    res = json.loads((tmp_path / "capacity.json").read_text())
    rows = res["rows"]
    assert [r["ends"] for r in rows] == [1, 3]
    # independent of the bench's own reference: one process, no cloud at all
    local = moetandem.load(ckpt, device="cpu", progress=False)
    prompts = capacity.prompts_for(2, 5, local.args.vocab_size)
    want = [g.token_ids for g in (local.generate([p], max_new_tokens=NEW, stop_on_eos=False)[0] for p in prompts)]
    for r in rows:
        assert r["tokens"] == [want[i % 2] for i in range(r["ends"])]
        assert r["tokens_equal"] and not r["differ"]
        # the prefill makes the first token, then ceil(5 / 4) decode exchanges of 4 and 1 tokens
        assert r["exchanges"] == [math.ceil((NEW - 1) / K)] * r["ends"]
        assert r["exchange_tokens"] == [[4, 1]] * r["ends"]
        assert len(r["tpot_ms"]) == r["ends"] and r["tpot_max_ms"] >= r["tpot_p95_ms"] >= r["tpot_p50_ms"] > 0
        assert r["tok_s"] > 0 and r["ttft_p50_ms"] > 0
    md = (tmp_path / "capacity.md").read_text()
    assert md.count("| cloud | 1 |") == 1 and md.count("| cloud | 3 |") == 1
    assert "capacity at TPOT p95 <= 1e+06 ms (cloud): 3 ends (a lower bound" in md
    assert res["capacity"] == {"cloud": {"ends": 3, "lower_bound": True}}
    assert "cloud (cloud) batching across ends, whole run: " in md and " exchanges on average" in md
    assert (tmp_path / "capacity.png").stat().st_size > 0
    assert md in capsys.readouterr().out


def test_tokens_unlike_the_reference_fail_with_and_without_batching(ckpt: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real = capacity.references

    def off_by_one(*a: object, **kw: object) -> list[list[int]]:
        refs = real(*a, **kw)
        refs[0][3] = (refs[0][3] + 1) % 256  # the first prompt's fourth token
        return refs
    monkeypatch.setattr(capacity, "references", off_by_one)
    assert capacity.main(args(ckpt, tmp_path, "--ends", "2", "--no-warmup", "--tpot-ms", "1e-6",
                              "--compare-batching")) == 1
    rows = json.loads((tmp_path / "capacity.json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["batching", "no batching"]  # one reference (the first cloud's) for both
    for row in rows:
        assert not row["tokens_equal"] and row["differ"] == {"0": 3}  # end 0 (prompt 0), not end 1 (prompt 1)
    md = (tmp_path / "capacity.md").read_text()
    assert md.count("| no |") == 2
    for config in ("batching", "no batching"):
        assert f"capacity at TPOT p95 <= 1e-06 ms ({config}): none of the measured counts" in md
    assert "cloud (batching) batching across ends" in md and "cloud (no batching) batching" not in md  # off: no runner


def test_one_line_errors(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit, match=r"capacity: the cloud \(cloud\) did not start: .*--gpu-memory needs a CUDA"):
        capacity.main(args(ckpt, tmp_path, "--ends", "1", "--cloud-args", "--gpu-memory 4"))
    with pytest.raises(SystemExit, match="capacity: .*config.json"):
        model_info(tmp_path)
    # an older cloud: no `decode` in its hello
    hello = cloud_session.CloudSession.on_hello

    def old_hello(self: cloud_session.CloudSession, f: object) -> object:
        reply = hello(self, f)
        reply.meta.pop("decode", None)
        return reply
    monkeypatch.setattr(cloud_session.CloudSession, "on_hello", old_hello)
    srv = CloudServer(moetandem.load(ckpt, device="cpu", progress=False), "t" * 32)
    port = srv.start("127.0.0.1:0")
    try:
        end = ThinEnd(f"127.0.0.1:{port}", "t" * 32, model_info(ckpt), 8, K, 128)
        with pytest.raises(SystemExit, match="does not serve `decode` frames"):
            end.connect()
        with pytest.raises(SystemExit, match="--cloud-head-topk 999"):
            ThinEnd(f"127.0.0.1:{port}", "t" * 32, model_info(ckpt), 999, K, 128)
    finally:
        srv.stop(0)
