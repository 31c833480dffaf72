"""Switch Transformers (encoder-decoder, top-1 routing with expert capacity, plain ReLU experts) against
transformers' SwitchTransformersForConditionalGeneration on a tiny random checkpoint: greedy generation, logits
(fp32 tight, bf16 within bf16's own error), capacity drops, a committee over encoder and decoder experts, the CLI,
teacher-forced eval and the refusals. Kept out of the registry-driven parity tests, which build decoder-only models."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import moetandem
from moetandem import InvalidRequestError, UnsupportedModelError
from moetandem.cli import main
from moetandem.models import FAMILIES
from moetandem.text2text import target_logits

SOURCES = [[5, 17, 42, 99, 3, 100, 7, 8, 9, 10, 11, 12, 13, 200], [61, 62, 3, 3, 3]]
#: 4 blocks per stack, MoE every 2nd (blocks 1 and 3); capacity 3 so 14 source tokens over 4 experts overflow;
#: initializer_factor 8 (seed 1): at the default scale a random model repeats one token, which would hide a mismatch
CONFIG = dict(vocab_size=256, d_model=32, d_kv=8, d_ff=24, num_layers=4, num_decoder_layers=4, num_heads=4,
              num_experts=4, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, expert_capacity=3,
              relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0,
              eos_token_id=None, initializer_factor=8.0)


def build(path: Path, **changes: object) -> Path:
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration
    from test_cli import byte_tokenizer
    torch.manual_seed(1)
    model = SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(**{**CONFIG, **changes}))
    model.save_pretrained(path, max_shard_size="200KB")  # safetensors, several shards
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("switch") / "switch")


def logit_tol(path: Path, src: list[int], tgt: list[int]) -> float:
    """Tolerance for fp32 logits against transformers' fp32: 1e-3 plus twice transformers' own fp32 error (against
    its fp64 run) on this source and target. T5 attention has no 1/sqrt(d) scale, so on random weights its scores
    are large (logits up to ~300) and any other summation order (our grouped experts, the CPU's GEMM kernels)
    shows: transformers' fp32 itself is 1e-4..4e-3 off its fp64 here. A capacity mistake moves logits by > 1e-2."""
    kw = dict(input_ids=torch.tensor([src]), decoder_input_ids=torch.tensor([[0, *tgt[:-1]]]))
    with torch.no_grad():
        a, b = (reference(path, dt)(**kw).logits[0].double() for dt in (torch.float32, torch.float64))
    return 1e-3 + 2 * float((a - b).abs().max())


def reference(path: Path, dtype: torch.dtype = torch.float32):
    from transformers import SwitchTransformersForConditionalGeneration
    return SwitchTransformersForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()


def hf_generate(ref, src: list[int], n: int = 16) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens (without the start token) and the raw logits of each step [n, V]."""
    with torch.no_grad():
        out = ref.generate(torch.tensor([src]), max_new_tokens=n, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
    return out.sequences[0, 1:].tolist(), torch.cat(out.logits).float()


@pytest.fixture(scope="module")
def engine(ckpt: Path):
    return moetandem.load(ckpt, device="cpu", dtype="float32", progress=False)


def test_registered_as_seq2seq_with_disjoint_moe_layers(engine) -> None:
    assert FAMILIES["switch_transformers"].seq2seq and engine.seq2seq
    # encoder blocks 1, 3 and decoder blocks 1, 3 (4 + j): one index space, no collision
    assert engine.store.layers == [1, 3, 5, 7]
    assert engine.args.expert_activation.kind == "relu" and not engine.args.expert_activation.gated
    assert engine.store.expert_numel() == 2 * 24 * 32  # wi and wo only: the budget counts plain experts' bytes


def test_greedy_tokens_and_logits_match_transformers(ckpt: Path, engine) -> None:
    ref = reference(ckpt)
    for src in SOURCES:
        want, want_logits = hf_generate(ref, src)
        assert len(set(want)) > 3, "a degenerate random model would hide mismatches"
        got = engine.generate([src], max_new_tokens=16)[0].token_ids
        assert got == want
        # step by step over the decoder cache: the logits generation saw
        steps = torch.cat([lg for _, lg in target_logits(engine, src, want, step=1)])
        tol = logit_tol(ckpt, src, want)
        torch.testing.assert_close(steps, want_logits, rtol=0, atol=tol)
        # all target tokens at once (capacity then applies in the decoder too, as in transformers' forward)
        with torch.no_grad():
            full = ref(input_ids=torch.tensor([src]), decoder_input_ids=torch.tensor([[0, *want[:-1]]])).logits[0]
        torch.testing.assert_close(torch.cat([lg for _, lg in target_logits(engine, src, want)]), full,
                                   rtol=0, atol=tol)
    # a batch of different source lengths (right padding) gives each source its own tokens
    both = engine.generate(SOURCES, max_new_tokens=16)
    assert [g.token_ids for g in both] == [engine.generate([s], max_new_tokens=16)[0].token_ids for s in SOURCES]


def test_capacity_drops_match_transformers(ckpt: Path, engine, tmp_path: Path) -> None:
    """Over-capacity tokens skip the experts at inference in transformers too: with a capacity of 64 the same
    weights give other logits, and both capacities match transformers."""
    roomy = tmp_path / "roomy"
    shutil.copytree(ckpt, roomy)
    cfg = json.loads((roomy / "config.json").read_text())
    (roomy / "config.json").write_text(json.dumps({**cfg, "expert_capacity": 64}))
    src, tgt = SOURCES[0], list(range(20, 36))
    big = moetandem.load(roomy, device="cpu", dtype="float32", progress=False)
    ours = {n: torch.cat([lg for _, lg in target_logits(e, src, tgt)]) for n, e in (("tight", engine), ("roomy", big))}
    assert (ours["tight"] - ours["roomy"]).abs().max() > 1e-2
    for name, path in (("tight", ckpt), ("roomy", roomy)):
        with torch.no_grad():
            want = reference(path)(input_ids=torch.tensor([src]), decoder_input_ids=torch.tensor([[0, *tgt[:-1]]]))
        torch.testing.assert_close(ours[name], want.logits[0], rtol=0, atol=logit_tol(path, src, tgt))


def test_bf16_logits_within_bf16_error(ckpt: Path) -> None:
    """bf16 against fp32 transformers: no further off than transformers' own bf16 run (plus a margin)."""
    src, tgt = SOURCES[0], list(range(40, 56))
    dec = torch.tensor([[0, *tgt[:-1]]])
    with torch.no_grad():
        exact = reference(ckpt)(input_ids=torch.tensor([src]), decoder_input_ids=dec).logits[0]
        theirs = reference(ckpt, torch.bfloat16)(input_ids=torch.tensor([src]), decoder_input_ids=dec).logits[0]
    eng = moetandem.load(ckpt, device="cpu", dtype="bfloat16", progress=False)
    ours = torch.cat([lg for _, lg in target_logits(eng, src, tgt)])
    their_err = (theirs.float() - exact).abs().max()
    our_err = (ours - exact).abs().max()
    assert our_err <= 2 * their_err + 0.02 * exact.abs().max(), (our_err, their_err)


def test_committee_over_encoder_and_decoder_experts(ckpt: Path, engine) -> None:
    cheap = moetandem.load(ckpt, device="cpu", dtype="float32", progress=False, expert_budget=0.5, fidelity="exact")
    assert type(cheap.provider).__name__ == "CommitteeProvider"
    assert cheap.provider.expert_bytes() <= engine.provider.expert_bytes() // 2
    want = [g.token_ids for g in engine.generate(SOURCES, max_new_tokens=16)]
    assert [g.token_ids for g in cheap.generate(SOURCES, max_new_tokens=16)] == want
    stats = cheap.expert_stats()
    assert stats["misses"] > 0 and stats["hits"] > 0  # the committee held only part of the experts


def test_plain_experts_on_the_device_path() -> None:
    """The executor's grouped path (CUDA) runs plain experts as its loop does (forced on the CPU)."""
    from moetandem.experts.executor import _grouped_mm, run_experts
    from moetandem.models.expert_activation import ExpertActivation
    if _grouped_mm is None:
        pytest.skip("no grouped_mm in this torch")
    torch.manual_seed(0)
    E, I, H, T = 4, 16, 8, 10
    w1, w2, x = torch.randn(E, I, H), torch.randn(E, H, I), torch.randn(T, H)
    ids, w = torch.randint(0, E, (T, 1)), torch.rand(T, 1)
    w[3] = 0  # a dropped token
    relu = ExpertActivation("relu")
    try:
        grouped = run_experts(x, ids, w, w1, w2, True, act=relu)
    except RuntimeError as e:  # grouped_mm without a CPU kernel in this build
        pytest.skip(str(e))
    want = torch.stack([w[t, 0] * (w2[ids[t, 0]] @ torch.relu(w1[ids[t, 0]] @ x[t])) for t in range(T)])
    torch.testing.assert_close(grouped, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(run_experts(x, ids, w, w1, w2, False, act=relu), want, rtol=1e-4, atol=1e-4)


def test_cli_generate_prints_text(ckpt: Path, engine, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["generate", "--device", "cpu", "--dtype", "float32", "--model", str(ckpt), "--prompt", "hello world",
               "--max-new-tokens", "8"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    want = engine.generate("hello world", max_new_tokens=8)[0]
    assert len(want.token_ids) == 8 and out == want.text + "\n"
    assert "[moetandem] prompt 11 tok | generated 8 tok" in err


def test_eval_is_target_given_source(ckpt: Path, engine) -> None:
    """Each window: first half the source, second half the target; nll = transformers' label loss."""
    from moetandem.analysis import evaluate_ids
    ids = list(range(30, 70))
    res = evaluate_ids(engine, ids, context=20, progress=False)
    ref = reference(ckpt)
    losses = []
    with torch.no_grad():
        for a in range(0, len(ids), 20):
            w = ids[a:a + 20]
            losses.append(ref(input_ids=torch.tensor([w[:10]]), labels=torch.tensor([w[10:]])).loss)
    assert res.tokens == 20 and res.windows == 2
    assert res.nll == pytest.approx(float(torch.stack(losses).mean()), rel=1e-4)
    stepped = evaluate_ids(engine, ids, context=20, step=1, progress=False)  # decode-time feeding: runs, differs
    assert stepped.tokens == 20 and stepped.nll > 0


def test_bad_inputs_are_actionable(ckpt: Path, engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.generate([[]], max_new_tokens=4)
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        engine.generate([[5, 999]], max_new_tokens=4)
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        moetandem.load(ckpt, device="cpu", gate="group")
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        engine.forward(torch.tensor([[5]]), torch.tensor([[0]]), None, 1)  # a decoder-only step (trace, ...)
    assert main(["serve", str(ckpt), "--device", "cpu", "--port", "0"]) != 0
    assert "encoder-decoder" in capsys.readouterr().err
    gated = tmp_path / "gated"
    shutil.copytree(ckpt, gated)
    cfg = json.loads((gated / "config.json").read_text())
    (gated / "config.json").write_text(json.dumps({**cfg, "dense_act_fn": "gated-gelu"}))
    with pytest.raises(UnsupportedModelError, match="dense_act_fn"):
        moetandem.load(gated, device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_grouped_path_and_committee(ckpt: Path) -> None:
    """On CUDA: fp32 tokens as our CPU engine's (which the CPU tests hold to transformers'; the GPU host's
    transformers 5.17 gives other tokens for this checkpoint, 236, 104, ..., than 5.24, 177, 226, ..., on the CPU
    alike, and ours follow 5.24); bf16 runs the plain experts on grouped GEMMs (the fused kernel is gated-only)
    within bf16 error as the CPU test measures it (this checkpoint is chaotic in bf16: on the GPU host ours was
    214.7 off at a max of 284.5, our CPU bf16 run 214.7 too, transformers' bf16 240.6), and an exact fp32
    committee at half the budget gives the resident engine's tokens."""
    fp32 = moetandem.load(ckpt, device="cuda", dtype="float32", progress=False)
    src = SOURCES[0]
    cpu = moetandem.load(ckpt, device="cpu", dtype="float32", progress=False)
    want = cpu.generate([src], max_new_tokens=16)[0].token_ids
    assert fp32.generate([src], max_new_tokens=16)[0].token_ids == want
    bf16 = moetandem.load(ckpt, device="cuda", dtype="bfloat16", progress=False)
    assert bf16.provider.grouped
    exact = torch.cat([lg for _, lg in target_logits(fp32, src, want)]).cpu()
    got = torch.cat([lg for _, lg in target_logits(bf16, src, want)]).cpu()
    with torch.no_grad():
        theirs = reference(ckpt, torch.bfloat16)(input_ids=torch.tensor([src]),
                                                 decoder_input_ids=torch.tensor([[0, *want[:-1]]])).logits[0]
    their_err = (theirs.float() - exact).abs().max()
    assert (got - exact).abs().max() <= 2 * their_err + 0.02 * exact.abs().max()
    # fp32: the committee's host-computed misses and the device loop agree to the bit, so tokens must too
    cheap = moetandem.load(ckpt, device="cuda", dtype="float32", progress=False, expert_budget=0.5, fidelity="exact")
    assert [g.token_ids for g in cheap.generate(SOURCES, max_new_tokens=16)] == \
        [g.token_ids for g in fp32.generate(SOURCES, max_new_tokens=16)]
    assert cheap.expert_stats()["misses"] > 0
