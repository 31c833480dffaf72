"""moetandem.analysis: eval against transformers, reference agreement, routing traces and their locality maths."""
from __future__ import annotations

import moetandem
import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from moetandem import Engine
from moetandem.analysis import Trace, evaluate, evaluate_ids, recording, trace, trace_ids
from moetandem.analysis import locality
from moetandem.errors import ContextLengthError, InvalidRequestError
from moetandem.experts.provider import ExpertProvider

from conftest import build_checkpoint

TEXT = ("Mixture-of-experts models route every token to a few experts. A committee keeps the important ones on "
        "the device, and the rest wait in host memory until the router asks for them again. ") * 3


def byte_tokenizer():
    """Byte-level BPE with exactly the 256 byte tokens (the tiny model's vocab) and no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model is dispatch-bound: extra intra-op threads only contend on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = build_checkpoint("mixtral", tmp_path_factory.mktemp("analysis"))
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def engine(ckpt: Path) -> Engine:
    return moetandem.load(ckpt, device="cpu", dtype="float32", progress=False)


def test_perplexity_matches_transformers(ckpt, engine):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = engine.tokenizer(TEXT)["input_ids"][:300]
    nll, n = 0.0, 0
    with torch.no_grad():
        for a in range(0, len(ids), 64):
            w = torch.tensor([ids[a:a + 64]])
            if w.shape[1] < 2:
                continue
            logp = torch.log_softmax(hf(w).logits[0, :-1].float(), dim=-1)
            nll -= float(logp.gather(1, w[0, 1:, None]).sum())
            n += w.shape[1] - 1
    res = evaluate(engine, TEXT, context=64, max_tokens=300, progress=False)
    assert (res.tokens, res.windows) == (n, 5)
    assert res.perplexity == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert res.expert_stats == {} and res.top1_agreement is None


def test_step_one_equals_whole_window(engine):
    ids = engine.tokenizer(TEXT)["input_ids"][:130]
    whole = evaluate_ids(engine, ids, context=64, progress=False)
    for step in (1, 7):
        res = evaluate_ids(engine, ids, context=64, step=step, progress=False)
        assert res.tokens == whole.tokens == 63 + 63 + 1
        assert res.perplexity == pytest.approx(whole.perplexity, rel=1e-4)


def test_reference_itself_agrees(engine):
    res = evaluate(engine, TEXT, context=48, step=5, max_tokens=200, reference=engine, progress=False)
    assert res.top1_agreement == 1.0
    assert abs(res.mean_kl) < 1e-6
    assert res.reference_perplexity == pytest.approx(res.perplexity, rel=1e-6)


def test_budgeted_committee_can_disagree(ckpt, engine):
    cheap = moetandem.load(ckpt, device="cpu", dtype="float32", progress=False, expert_budget=0.25,
                                   policy="substitute")
    res = evaluate(cheap, TEXT, context=64, step=1, max_tokens=128, reference=engine, progress=False)
    assert res.top1_agreement < 1.0 and res.mean_kl > 1e-4
    assert res.perplexity != pytest.approx(res.reference_perplexity, rel=1e-3)
    s = res.expert_stats
    assert s["substitutions"] > 0 and 0 < s["hit_rate"] < 1
    assert s["hits"] + s["misses"] == (res.tokens + 2) * 3 * 2  # 3 layers × top-2; last tokens of 2 windows


def test_bad_requests(engine):
    with pytest.raises(InvalidRequestError):
        evaluate_ids(engine, [5], progress=False)
    with pytest.raises(ContextLengthError):
        evaluate_ids(engine, list(range(300)), context=512, progress=False)
    with pytest.raises(InvalidRequestError):
        evaluate_ids(engine, list(range(30)), step=0, progress=False)


def test_trace_files_and_curves(engine, tmp_path):
    tr = trace(engine, TEXT, context=64, max_tokens=200, progress=False)
    assert tr.ids.shape == tr.weights.shape == (200, 3, 2) and tr.layers == [0, 1, 2]
    summary = tr.save(tmp_path / "out")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"trace.safetensors", "summary.json", "summary.md", "expert_use_over_time.png",
            "hit_rate_vs_cache_size.png", "popularity.png", "coactivation.png"} <= names
    for p in (tmp_path / "out").glob("*.png"):
        assert p.read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["tokens"] == 200
    assert "| **all** |" in (tmp_path / "out" / "summary.md").read_text()
    back = Trace.load(tmp_path / "out" / "trace.safetensors")
    assert torch.equal(back.ids, tr.ids) and back.layers == tr.layers
    for s in list(summary["layers"].values()) + [summary["overall"]]:
        opt, lru = np.array(s["hit_rate_optimal"]), np.array(s["hit_rate_lru"])
        assert len(opt) == 8 and np.all(np.diff(opt) >= -1e-12) and opt[-1] == pytest.approx(1.0)
        assert np.all(opt >= lru - 1e-12)
    lay = summary["layers"]["0"]
    assert sum(lay["popularity"]["counts"]) == 400 and 0 <= lay["popularity"]["gini"] <= 1
    assert lay["low_weight"]["<0.05"] <= lay["low_weight"]["<0.1"] <= lay["low_weight"]["<0.2"]


def test_recording_leaves_the_engine_untouched(engine):
    class Boom(ExpertProvider):
        def compute(self, layer, x, expert_ids, weights):
            raise RuntimeError("boom")

    before = dict(engine.experts)
    broken = engine.view(lambda layer, provider: Boom())
    with pytest.raises(RuntimeError, match="boom"):
        trace_ids(broken, list(range(40)), context=32, progress=False)
    assert engine.experts == before  # the view's providers never reach the engine
    with recording(engine) as tap:
        assert tap.engine is not engine and all(p is tap for p in tap.engine.experts.values())
        assert tap.inner == before
    assert engine.experts == before
    trace_ids(engine, list(range(40)), context=32, progress=False)
    assert engine.experts == before


def test_optimal_curve_is_belady():
    rng = np.random.default_rng(0)
    for _ in range(40):
        E = int(rng.integers(2, 10))
        k = int(rng.integers(1, min(E, 3) + 1))
        p = rng.dirichlet(np.full(E, 0.5))
        ids = np.stack([rng.choice(E, k, replace=False, p=p) for _ in range(int(rng.integers(1, 50)))])
        seq = locality.requests(ids)
        opt = locality.hit_curve(locality.opt_stack_distances(seq), E)
        assert opt == pytest.approx([locality.belady_hits(seq, c) for c in range(1, E + 1)])
        assert np.all(np.array(opt) >= np.array(locality.hit_curve(locality.lru_stack_distances(seq), E)) - 1e-12)
    dist, cold = locality.reuse_distances(np.array([[0, 1], [0, 2], [1, 0]]), 3)
    assert sorted(dist.tolist()) == [1, 1, 2] and cold == 3


def test_cli_handlers(ckpt, tmp_path, capsys):
    from moetandem.cli import eval as eval_cli
    from moetandem.cli import trace as trace_cli
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    eval_cli.register(sub)
    trace_cli.register(sub)
    data = tmp_path / "data.txt"
    data.write_text(TEXT)
    args = parser.parse_args(["eval", "--model", str(ckpt), "--data", str(data), "--context", "64", "--max-tokens",
                              "128", "--expert-budget", "0.5", "--policy", "skip", "--reference", "--device", "cpu",
                              "--json", str(tmp_path / "r.json")])
    assert args.run(args) == 0
    assert "top-1 agreement" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["tokens"] == 126
    args = parser.parse_args(["trace", "--model", str(ckpt), "--data", str(data), "--out", str(tmp_path / "t"),
                              "--context", "64", "--max-tokens", "96", "--device", "cpu"])
    assert args.run(args) == 0 and (tmp_path / "t" / "hit_rate_vs_cache_size.png").is_file()
    args = parser.parse_args(["eval", "--model", str(ckpt), "--data", str(tmp_path / "missing.txt")])
    with pytest.raises(InvalidRequestError, match="not found"):
        args.run(args)


def test_routing_frequencies_for_the_split_scheduler(engine):
    """Trace.frequencies: each MoE layer's share of tokens per expert (rows sum to top_k), shrunk towards uniform by
    the prior; with no prior it is the exact count / tokens of the recorded routing."""
    tr = trace_ids(engine, list(range(60)), context=32, progress=False)
    N, L, k = tr.ids.shape
    E = tr.num_experts
    exact = tr.frequencies(engine.args.num_layers, prior_tokens=0.0)
    for i, layer in enumerate(tr.layers):
        want = torch.bincount(tr.ids[:, i].reshape(-1).long(), minlength=E).double() / N
        assert exact[layer] == pytest.approx(want.tolist())
        assert sum(exact[layer]) == pytest.approx(k)
    shrunk = tr.frequencies(engine.args.num_layers, prior_tokens=N)  # half the trace's weight on uniform
    layer = tr.layers[0]
    assert shrunk[layer] == pytest.approx([(f + k / E) / 2 for f in exact[layer]])
    assert max(exact[layer]) > max(shrunk[layer]) > k / E  # a hot expert stays hot, less so
