"""gpt-oss experts from an MXFP4 checkpoint (the hub's *_blocks / *_scales layout: kept packed as mxfp4 experts
by default, or dequantized by the ExpertStore on read with --expert-format bf16) against transformers' own
dequantizer and its model on the dequantized weights."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moetandem
from moetandem.checkpoint import Checkpoint
from moetandem.experts.store import FP4_VALUES, ExpertStore, dequantize_mxfp4
from moetandem.models import FAMILIES

from conftest import build_checkpoint

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [200, 100, 50, 25, 12, 6, 3, 1, 0, 9, 18, 36, 72]]


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., K] (K % 32 == 0) -> blocks [..., K/32, 16] uint8, scales [..., K/32] uint8: per group of 32 a power
    of two 2^(s-127) that brings the group's largest magnitude to <= 6, each value the nearest E2M1 code."""
    g = w.float().unflatten(-1, (-1, 32))  # [..., G, 32]
    amax = g.abs().amax(-1).clamp_min(2.0 ** -120)  # [..., G]
    exp = torch.ceil(torch.log2(amax / 6.0))
    lut = torch.tensor(FP4_VALUES)
    codes = ((g / torch.exp2(exp)[..., None])[..., None] - lut).abs().argmin(-1).to(torch.uint8)  # [..., G, 32]
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)  # low nibble first
    return blocks.contiguous(), (exp + 127).to(torch.uint8)


def mxfp4_checkpoint(src: Path, dst: Path) -> Path:
    """A copy of a tiny gpt-oss checkpoint with its expert matrices in the hub's MXFP4 layout: gate_up_proj
    [E, H, 2I] -> gate_up_proj_blocks [E, 2I, H/32, 16] + _scales [E, 2I, H/32]; down_proj [E, I, H] -> [E, H, ...]."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
                tensors[k + "_blocks"], tensors[k + "_scales"] = quantize_mxfp4(v.transpose(1, 2))  # [E, out, in]
            else:
                tensors[k] = v
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                      "model.layers.*.mlp.router",
                                                                                      "model.embed_tokens", "lm_head"]}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    src = build_checkpoint("gpt_oss", tmp_path_factory.mktemp("gpt_oss") / "bf16")
    return src, mxfp4_checkpoint(src, tmp_path_factory.mktemp("gpt_oss_mxfp4") / "mxfp4")


def test_dequantize_matches_transformers() -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    w = torch.randn(3, 8, 96) * torch.logspace(-3, 1, 96)  # [E, out, in], groups of different magnitudes
    blocks, scales = quantize_mxfp4(w)
    ours = dequantize_mxfp4(blocks, scales)  # [E, out, in]
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out], the bf16 layout
    assert torch.equal(ours, theirs.transpose(1, 2))
    step = torch.exp2(scales.float() - 127).repeat_interleave(32, -1)  # the group's 2^e
    assert ((ours - w).abs() <= step).all()  # within MXFP4 rounding (E2M1 steps are at most 2 units apart)


def test_store_reads_mxfp4(checkpoints) -> None:
    """The MXFP4 read equals the bf16 read within MXFP4 rounding, gate/up de-interleaved the same way."""
    src, q = checkpoints
    stores = []
    for path in (src, q):
        ckpt = Checkpoint(path)
        fam = FAMILIES["gpt_oss"]
        stores.append(ExpertStore(ckpt, fam, fam.args(ckpt.config, ckpt.path)))
    ref, got = stores
    assert got._layout[0] == "mxfp4" and ref._layout[0] == "gpt_oss"
    assert got.expert_numel() == ref.expert_numel() == 3 * 32 * 64 + 2 * 32 + 64
    for layer in ref.layers:
        for e in (0, 5):
            for a, b in zip(ref.read(layer, e), got.read(layer, e)):
                assert torch.equal(b, dequantize_mxfp4(*quantize_mxfp4(a)))  # rows de-interleaved before grouping
                assert (a - b).abs().max() <= a.abs().max() / 3  # within one group's 2^e <= amax / 3
            nb = 2 * ref.inter + ref.hidden  # the biases, read unquantized
            assert torch.equal(ref.read_flat(layer, e, torch.float32)[-nb:], got.read_flat(layer, e, torch.float32)[-nb:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_read_flat_into_a_buffer_equals_the_concatenated_read(checkpoints, dtype) -> None:
    """read_flat(out=) writes each part in place (gpt-oss gate / up from one whole transpose, two-byte floats
    moved as int16): the same values as concatenating read()'s parts, and a buffer of the wrong size is refused."""
    for path in checkpoints:
        ckpt = Checkpoint(path)
        fam = FAMILIES["gpt_oss"]
        store = ExpertStore(ckpt, fam, fam.args(ckpt.config, ckpt.path))
        for layer in store.layers:
            for e in (0, 3):
                parts = (*store.read(layer, e), *store.read_bias(layer, e))
                want = torch.cat([p.reshape(-1).to(dtype) for p in parts])
                out = torch.full((store.expert_numel(),), float("nan"), dtype=dtype)
                assert store.read_flat(layer, e, dtype, out=out) is out and torch.equal(out, want)
        with pytest.raises(ValueError, match="out holds"):
            store.read_flat(store.layers[0], 0, dtype, out=torch.empty(store.expert_numel() + 1, dtype=dtype))


def test_mxfp4_tokens_equal_transformers_dequantized(checkpoints) -> None:
    """16 greedy tokens of moetandem on the MXFP4 checkpoint = transformers on the same dequantized weights, all
    resident and with half the experts under an exact committee."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    src, q = checkpoints
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    packed = load_file(str(q / "model.safetensors"))
    with torch.no_grad():
        for i, layer in enumerate(hf.model.layers):
            for name in ("gate_up_proj", "down_proj"):
                p = f"model.layers.{i}.mlp.experts.{name}"
                getattr(layer.mlp.experts, name).copy_(
                    convert_moe_packed_tensors(packed[p + "_blocks"], packed[p + "_scales"], dtype=torch.float32))
    ours = moetandem.load(q, device="cpu", dtype="float32", progress=False)
    committee = moetandem.load(q, device="cpu", dtype="float32", progress=False, expert_budget=0.08,
                               fidelity="exact")  # packed MXFP4 slots: 8% of the fp32 expert bytes holds ~half
    for p in PROMPTS:
        ids = torch.tensor([p])
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                           do_sample=False, pad_token_id=0)[0, len(p):].tolist()
        assert ours.generate([p], max_new_tokens=16)[0].token_ids == want
        assert committee.generate([p], max_new_tokens=16)[0].token_ids == want
    assert committee.expert_stats()["misses"] > 0


def test_mxfp4_kept_packed(checkpoints) -> None:
    """auto keeps the checkpoint's MXFP4 bytes (never expanded): a quarter of the bf16 bytes plus scales and
    biases, the same logits as the dequantize-on-read path; a committee moves the packed rows."""
    from moetandem.models import KVCache
    _, q = checkpoints
    packed = moetandem.load(q, device="cpu", dtype="float32", progress=False)
    dense = moetandem.load(q, device="cpu", dtype="float32", progress=False, expert_format="bf16")
    assert packed.provider.fmt.name == "mxfp4" and packed.provider.fmt.group13 == 32
    assert packed.provider.expert_bytes() < dense.provider.expert_bytes() / 4
    blk = load_file(str(q / "model.safetensors"))["model.layers.0.mlp.experts.down_proj_blocks"]  # [E, H, I/32, 16]
    v = packed.provider.views[0]
    assert torch.equal(v.w2, blk.flatten(-2))  # the checkpoint's own bytes
    for p in PROMPTS:
        ids = torch.tensor([p])
        outs = []
        for eng in (packed, dense):
            cache = KVCache(eng.args, 1, len(p), torch.device("cpu"), torch.float32)
            with torch.no_grad():
                outs.append(eng.forward(ids, torch.arange(len(p))[None], cache, len(p))[0])
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    committee = moetandem.load(q, device="cpu", dtype="float32", progress=False, expert_budget=0.1, policy="auto")
    assert committee.provider.fmt.name == "mxfp4" and committee.provider.rows.source == "native"
    want = [g.token_ids for g in packed.generate(PROMPTS, max_new_tokens=8)]
    assert [g.token_ids for g in committee.generate(PROMPTS, max_new_tokens=8)] == want


def test_other_quantization_refused(checkpoints, tmp_path) -> None:
    _, q = checkpoints
    fp8 = tmp_path / "fp8"
    shutil.copytree(q, fp8)
    cfg = json.loads((fp8 / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8"}
    (fp8 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(moetandem.errors.UnsupportedModelError, match="fp8"):
        moetandem.load(fp8, device="cpu", dtype="float32", progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_read_on_the_gpu_equals_the_cpu_read_gpu(checkpoints) -> None:
    """read(device=) and read_flat(device=) move gpt-oss's stored tensors first and transpose / dequantize them
    there: the same values as the CPU read, for the bf16 and the MXFP4 layout."""
    for path in checkpoints:
        ckpt = Checkpoint(path)
        fam = FAMILIES["gpt_oss"]
        store = ExpertStore(ckpt, fam, fam.args(ckpt.config, ckpt.path))
        for a, b in zip(store.read(0, 2), store.read(0, 2, device="cuda")):
            assert b.is_cuda and torch.equal(a, b.cpu())
        want = store.read_flat(0, 2, torch.bfloat16)
        out = torch.empty(store.expert_numel(), dtype=torch.bfloat16, device="cuda")
        assert torch.equal(store.read_flat(0, 2, torch.bfloat16, out=out, device="cuda").cpu(), want)
