"""Family and component details the parity tests do not show directly: Kimi-K2 as DeepSeek-V3, MLA's compressed
cache, refusals that must be actionable (gpt-oss experts, quantized checkpoints, --gate on sigmoid routers)."""
from __future__ import annotations

import json
import shutil

import moetandem
import pytest
import torch

from conftest import build_checkpoint
from moetandem import UnsupportedModelError
from moetandem.models import FAMILIES, KVCache


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    return build_checkpoint("deepseek_v3", tmp_path_factory.mktemp("v3") / "deepseek_v3")


def with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **changes}))
    return dst


def test_kimi_k2_runs_as_deepseek_v3(v3, tmp_path):
    """Kimi-K2 ships model_type kimi_k2 (remote code); its YaRN tables come from DeepseekV3Config."""
    kimi = with_config(v3, tmp_path / "kimi", model_type="kimi_k2", auto_map={"AutoConfig": "x.KimiK2Config"})
    assert FAMILIES["kimi_k2"] is FAMILIES["deepseek_v3"]
    a = moetandem.load(v3, device="cpu", progress=False)
    b = moetandem.load(kimi, device="cpu", progress=False)
    assert all(torch.equal(fa, fb) and sa == sb for (fa, sa), (fb, sb)
               in zip(a.model.rope_freqs.values(), b.model.rope_freqs.values()))
    prompt = [5, 17, 42, 99, 3, 250, 7]
    assert a.generate([prompt], max_new_tokens=12)[0].token_ids == b.generate([prompt], max_new_tokens=12)[0].token_ids


def test_mla_caches_latents_not_heads(v3):
    eng = moetandem.load(v3, device="cpu", progress=False)
    cache = KVCache(eng.args, 2, 32, torch.device("cpu"), torch.float32)
    s = eng.args.attention
    assert [tuple(t.shape) for t in cache.layers[0]] == [(2, 32, s.kv_lora_rank), (2, 32, s.qk_rope_head_dim)]
    full = 2 * s.num_heads * (s.qk_nope_head_dim + s.qk_rope_head_dim)  # K and V per token if expanded (≥)
    assert cache.nbytes() < len(cache.layers) * 2 * 32 * full * 4


def test_routed_experts_only_in_the_store(v3):
    """Shared experts and the dense first layer are resident modules; only routed experts reach the provider."""
    eng = moetandem.load(v3, device="cpu", progress=False)
    assert eng.store.layers == [1, 2]  # first_k_dense_replace = 1
    names = dict(eng.model.named_parameters())
    assert "model.layers.1.mlp.shared_expert.gate_proj.weight" in names
    assert "model.layers.0.mlp.gate_proj.weight" in names
    assert names["model.layers.1.mlp.gate.weight"].dtype == torch.float32  # router kept in fp32
    assert not any(".experts." in n for n in names)


def test_quantized_checkpoint_refused(v3, tmp_path):
    fp8 = with_config(v3, tmp_path / "fp8", quantization_config={"quant_method": "fp8", "fmt": "e4m3"})
    with pytest.raises(UnsupportedModelError, match="quantized \\(fp8\\)"):
        moetandem.load(fp8, device="cpu", progress=False)


def test_routing_hook_refused_on_sigmoid_router(v3):
    eng = moetandem.load(v3, device="cpu", progress=False)
    block = eng.model.moe_blocks()[0]
    block.router = lambda blk, x, logits: (None, None)  # what --gate installs
    try:
        with pytest.raises(UnsupportedModelError, match="--gate off"):
            eng.generate([[1, 2, 3]], max_new_tokens=2)
    finally:
        block.router = None
