"""Expert formats on the CPU: the byte-row layout, quantize-on-load quality against bf16, committees that hold
packed experts within their byte budget, and pre-quantized checkpoints (block FP8, compressed-tensors W4A16) read
natively: same weights as their dequantization and as transformers' own dequantizing path."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import moetandem
from conftest import build_checkpoint
from moetandem import InvalidRequestError
from moetandem.checkpoint import Checkpoint
from moetandem.experts.formats import ExpertFormat
from moetandem.experts.store import ExpertStore
from moetandem.kernels.quant import dequantize, quantize
from moetandem.models import FAMILIES, KVCache

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [1, 2, 3, 4, 5, 6], [200, 100, 50, 25, 12, 6, 3, 1, 0, 9, 18, 36]]
PACKED = ("int8", "fp8", "int4", "mxfp4")


def logits(engine, p: list[int]) -> torch.Tensor:
    ids = torch.tensor([p])
    cache = KVCache(engine.args, 1, len(p), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        return engine.forward(ids, torch.arange(len(p))[None], cache, len(p))[0]  # [L, V]


def read_all(path) -> dict[str, torch.Tensor]:
    """Every tensor of a (sharded) checkpoint."""
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def write_single(src, dst, tensors: dict[str, torch.Tensor], quantization_config: dict) -> None:
    """src's config with `quantization_config`, and `tensors` as one model.safetensors in dst."""
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(cfg))


def store_of(path) -> ExpertStore:
    ckpt = Checkpoint(path)
    fam = FAMILIES[ckpt.config["model_type"]]
    return ExpertStore(ckpt, fam, fam.args(ckpt.config, ckpt.path))


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return build_checkpoint("mixtral", tmp_path_factory.mktemp("mixtral"))


@pytest.fixture(scope="module")
def bf16(mixtral):
    return moetandem.load(mixtral, device="cpu", dtype="float32", progress=False, expert_format="bf16")


# ------------------------------------------------------------------------ the byte row
@pytest.mark.parametrize("name", PACKED)
def test_row_layout_aligned_and_round_trips(name):
    f = ExpertFormat(name, 32, 64, torch.float32, bias=True)
    assert all(p.offset % 16 == 0 for p in f.pieces) and f.nbytes % 16 == 0
    w13, w2, b = torch.randn(64, 64), torch.randn(64, 32), (torch.randn(64), torch.randn(64))
    buf = f.empty(3)  # [3, bytes] raw
    buf[2] = f.pack(w13, w2, b)
    a, c, b13, b2 = f.unpack(buf[2])
    d13, s13 = quantize(w13, name, f.group13)
    assert torch.equal(a, dequantize(d13, s13, name))  # exactly quant.py's layout
    assert torch.equal(b13, b[0]) and torch.equal(b2, b[1])  # biases kept in the compute dtype
    v = f.views(buf)  # the kernel's views of the slot buffer
    assert v.w13.shape == (3, 64, f.pieces[0].shape[1]) and v.scales[1].shape == (3, 64, 32 // f.group2)
    assert v.w13.data_ptr() == buf.data_ptr() and torch.equal(f.dequantize_slot(v, 2)[1], c)
    tol = {"int8": 0.01, "fp8": 0.04, "int4": 0.15, "mxfp4": 0.15}[name]
    assert (a - w13).norm() / w13.norm() < tol and (c - w2).norm() / w2.norm() < tol


def test_packed_bytes_per_expert():
    dense = ExpertFormat("bf16", 768, 2048, torch.bfloat16)
    assert dense.nbytes == 3 * 768 * 2048 * 2
    assert ExpertFormat("int8", 768, 2048, torch.bfloat16).nbytes < dense.nbytes * 0.51
    assert ExpertFormat("int4", 768, 2048, torch.bfloat16).nbytes < dense.nbytes * 0.27


def test_bf16_row_is_the_flat_expert(mixtral):
    st = store_of(mixtral)
    f = ExpertFormat("bf16", st.inter, st.hidden, torch.float32)
    g, u, d = st.read(0, 3)
    assert torch.equal(f.pack(torch.cat([g, u]), d), st.read_flat(0, 3, torch.float32))


# ------------------------------------------------------------------------ quantize on load
@pytest.mark.parametrize("name", PACKED)
def test_quantized_logits_close_to_bf16(mixtral, bf16, name):
    eng = moetandem.load(mixtral, device="cpu", dtype="float32", progress=False, expert_format=name)
    assert eng.provider.fmt.name == name
    assert eng.provider.expert_bytes() < bf16.provider.expert_bytes() / (3.5 if name in ("int8", "fp8") else 6)
    agree = total = 0
    for p in PROMPTS:
        ref, got = logits(bf16, p), logits(eng, p)
        rel = ((got - ref).norm() / ref.norm()).item()
        assert rel < {"int8": 0.01, "fp8": 0.03, "int4": 0.15, "mxfp4": 0.15}[name], rel
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += len(p)
    assert agree / total >= {"int8": 1.0, "fp8": 0.9, "int4": 0.8, "mxfp4": 0.8}[name]  # random weights: near ties


def test_committee_holds_more_packed_experts_within_budget(mixtral):
    """At the same --expert-budget (a fraction of the bf16 expert bytes) int4 slots hold ~8x the fp32 experts
    (4x bf16's on a GPU); the budget is honoured, and an exact committee equals its all-resident twin."""
    st = store_of(mixtral)
    dense_total = st.expert_bytes(torch.float32) * st.num_experts * len(st.layers)
    slots = {}
    for name in ("bf16", "int8", "int4"):
        c = moetandem.load(mixtral, device="cpu", dtype="float32", progress=False, expert_budget=0.25,
                           policy="auto", expert_format=name)
        assert c.provider.expert_bytes() <= dense_total // 4
        slots[name] = sum(s.n for s in c.provider.layers.values())
        if name == "int8":  # slots, host copies and host misses all in int8: same tokens as int8 all resident
            ref = moetandem.load(mixtral, device="cpu", dtype="float32", progress=False, expert_format=name)
            c.provider.set_budget(dense_total // 8)
            want = [g.token_ids for g in ref.generate(PROMPTS, max_new_tokens=12)]
            assert [g.token_ids for g in c.generate(PROMPTS, max_new_tokens=12)] == want
            assert c.expert_stats()["misses"] > 0
    assert slots["int8"] > 2 * slots["bf16"] and slots["int4"] > slots["int8"]


def test_unknown_format_is_refused(mixtral):
    with pytest.raises(InvalidRequestError, match="expert-format"):
        moetandem.load(mixtral, device="cpu", progress=False, expert_format="int3")


def test_flag_shared_by_the_loading_commands(mixtral):
    """--expert-format is declared once (cli/flags.py) and reaches ModelConfig in every command that loads."""
    from moetandem.cli import build_parser
    from moetandem.cli.flags import configs
    parser = build_parser()
    for cmd in (["generate", "--prompt", "1"], ["serve"], ["eval", "--data", "x"], ["cloud", "--token-file", "t"]):
        ns = parser.parse_args([*cmd, "--expert-format", "int4"])
        assert ns.expert_format == "int4"
    assert configs(ns, mixtral)[0].expert_format == "int4"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--expert-format", "int3"])


# ------------------------------------------------------------------------ pre-quantized checkpoints
def _to_fp8_blocks(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A block-FP8 release's layout: fp8 [N, K], scale_inv [⌈N/b⌉, ⌈K/b⌉] (W ≈ w · s)."""
    n, k = w.shape
    pad = torch.zeros(-(-n // block) * block, -(-k // block) * block)
    pad[:n, :k] = w.float()
    blocks = pad.unflatten(0, (-1, block)).unflatten(2, (-1, block))  # [N/b, b, K/b, b]
    s = blocks.abs().amax(dim=(1, 3)) / 448.0  # [N/b, K/b]
    q = (blocks / s[:, None, :, None]).flatten(2).flatten(0, 1)[:n, :k].to(torch.float8_e4m3fn)
    return q, s


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    """A tiny Qwen3-MoE with every linear weight in block FP8, as DeepSeek-V3 / Qwen3-FP8 ship it (16×16 blocks
    that divide every matrix, as real releases' 128×128 do: transformers assumes they do)."""
    src = build_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe"))
    dst = tmp_path_factory.mktemp("qwen3_moe_fp8")
    out = {}
    for k, v in read_all(src).items():
        if v.ndim == 2 and k.endswith("proj.weight"):
            out[k], out[k + "_scale_inv"] = _to_fp8_blocks(v, 16)
        else:
            out[k] = v
    write_single(src, dst, out, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                 "weight_block_size": [16, 16]})
    return dst


def test_block_fp8_kept_packed_and_equal_to_transformers(fp8_checkpoint):
    from transformers import AutoModelForCausalLM
    st = store_of(fp8_checkpoint)
    assert st.native_format == "fp8" and st.native_group == 16
    eng = moetandem.load(fp8_checkpoint, device="cpu", dtype="float32", progress=False)  # auto: fp8, native
    assert eng.provider.fmt.name == "fp8" and eng.provider.fmt.group13 == 16
    hf = AutoModelForCausalLM.from_pretrained(fp8_checkpoint, dtype=torch.float32).eval()  # dequantizes on CPU
    dense = moetandem.load(fp8_checkpoint, device="cpu", dtype="float32", progress=False, expert_format="bf16")
    for p in PROMPTS:
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0]
        torch.testing.assert_close(logits(eng, p), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits(dense, p), ref, rtol=1e-4, atol=1e-4)


def _pack_int32(q: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' pack_to_int32 for 4 bits: value + 8, eight a word, element i in bits 4i..4i+3."""
    u = (q.long() + 8).unflatten(-1, (-1, 8))  # [N, K/8, 8]
    word = (u << (torch.arange(8) * 4)).sum(-1)  # [N, K/8] in [0, 2^32)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def test_compressed_tensors_w4a16_loads_to_its_dequantization(mixtral, tmp_path):
    """A W4A16 pack-quantized checkpoint written by hand: the experts load packed (int4, group 32) to exactly the
    checkpoint's weights, the attention weights dequantized; logits equal the bf16 read of the same file."""
    dst = tmp_path / "w4a16"
    out, deq = {}, {}
    for k, v in read_all(mixtral).items():
        if v.ndim == 2 and (".experts." in k or "self_attn" in k):
            w = v.float()
            s = (w.unflatten(-1, (-1, 32)).abs().amax(-1) / 7).clamp_min(1e-8)  # [N, K/32]
            q = (w / s.repeat_interleave(32, -1)).round().clamp(-8, 7)
            base = k.removesuffix(".weight")
            out[base + ".weight_packed"] = _pack_int32(q)
            out[base + ".weight_scale"] = s.to(torch.bfloat16)
            out[base + ".weight_shape"] = torch.tensor(list(w.shape), dtype=torch.int32)
            deq[k] = q * s.to(torch.bfloat16).float().repeat_interleave(32, -1)
        else:
            out[k] = v
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
    write_single(mixtral, dst, out, {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                     "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                                                   "weights": weights}}, "ignore": ["lm_head"]})
    st = store_of(dst)
    assert st.native_format == "int4" and st.native_group == 32
    gate = "model.layers.1.block_sparse_moe.experts.5.w1.weight"
    assert torch.equal(st.read(1, 5)[0], deq[gate])
    eng = moetandem.load(dst, device="cpu", dtype="float32", progress=False)  # auto: int4, kept packed
    assert eng.provider.fmt.name == "int4"
    w13, _, _, _ = eng.provider.fmt.unpack(eng.provider.packed[1][5])
    assert torch.equal(w13[: st.inter], deq[gate])
    dense = moetandem.load(dst, device="cpu", dtype="float32", progress=False, expert_format="bf16")
    for p in PROMPTS:
        torch.testing.assert_close(logits(eng, p), logits(dense, p), rtol=1e-5, atol=1e-5)


def test_unreadable_compressed_tensors_refused(mixtral, tmp_path):
    dst = tmp_path / "w8a8"
    shutil.copytree(mixtral, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "int-quantized",
                                  "config_groups": {"g": {"weights": {"num_bits": 8}}}}
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(moetandem.errors.UnsupportedModelError, match="W4A16"):
        moetandem.load(dst, device="cpu", progress=False)


# ------------------------------------------------------------------------ CUDA (the fused kernel over packed slots)


@pytest.mark.parametrize("name", PACKED)
@pytest.mark.parametrize("budget", [None, 0.3])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_packed_experts_match_the_cpu_dequantized_path(mixtral, name, budget):
    """fp32 on both sides: the kernel over packed slots (all resident, or a committee at 30% of the bf16 bytes,
    zero-copy exact misses, CUDA graphs) gives the CPU loop's logits and tokens."""
    cpu = moetandem.load(mixtral, device="cpu", dtype="float32", progress=False, expert_format=name)
    dev = moetandem.load(mixtral, device="cuda", dtype="float32", progress=False, expert_format=name,
                         expert_budget=budget, fidelity="exact")
    assert dev.provider.grouped  # the device path, not the per-slot loop
    for p in PROMPTS:
        ids = torch.tensor([p], device="cuda")
        cache = KVCache(dev.args, 1, len(p), torch.device("cuda"), torch.float32)
        with torch.no_grad():
            got = dev.forward(ids, torch.arange(len(p), device="cuda")[None], cache, len(p))[0].cpu()
        torch.testing.assert_close(got, logits(cpu, p), rtol=2e-3, atol=2e-3)
    want = [g.token_ids for g in cpu.generate(PROMPTS, max_new_tokens=16)]
    assert [g.token_ids for g in dev.generate(PROMPTS, max_new_tokens=16)] == want


def test_packed_committee_keeps_one_host_copy_of_its_rows(tmp_path, monkeypatch):
    """With zero-copy misses (the CUDA wiring, forced on the CPU) a committee of int8 experts pins every row once for
    the kernel; the rows it keeps for swaps are that pinned copy, not a second one, and still the quantized rows."""
    from moetandem.experts.rows import ExpertRows
    monkeypatch.setattr("moetandem.experts.committee.maps_experts", lambda *a: True)
    ckpt = build_checkpoint("mixtral", tmp_path / "m")
    eng = moetandem.load(ckpt, device="cpu", dtype="bfloat16", progress=False, expert_budget=0.15,
                         expert_format="int8", policy="auto", async_swaps=False)
    c = eng.provider
    assert c.mapped is not None and c.rows.source == "quantize"
    fresh = ExpertRows(c.store, c.fmt, keep=False)
    for layer in c.store.layers:
        assert c.rows.get(layer, 0).data_ptr() == c.mapped[layer][0].data_ptr()
        assert torch.equal(c.host_flat(layer, 1), fresh.get(layer, 1))
    assert eng.generate(PROMPTS[:1], max_new_tokens=8, stop_on_eos=False)[0].token_ids


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_rows_copy_into_a_buffer_equal_get(tmp_path, fmt):
    """copy_into writes what get() returns (a bf16 row read from the checkpoint straight into the buffer)."""
    from moetandem.experts.rows import ExpertRows
    eng = moetandem.load(build_checkpoint("mixtral", tmp_path / "m"), device="cpu", dtype="bfloat16", progress=False)
    st = eng.store
    rows = ExpertRows(st, ExpertFormat(fmt, st.inter, st.hidden, torch.bfloat16), keep=fmt != "bf16")
    buf = rows.fmt.empty(2).zero_()
    for layer in st.layers[:2]:
        rows.copy_into(layer, 3, buf[1])
        assert torch.equal(buf[1], rows.get(layer, 3)) and not torch.equal(buf[0], buf[1])
