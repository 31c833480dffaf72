"""Gemma-4 MoE details the parity tests do not show: why it is refused for now, which variants are refused, and
its per-layer-type RoPE tables (proportional partial RoPE on full-attention layers) against transformers."""
from __future__ import annotations

import json
from pathlib import Path

import moetandem
import pytest
import torch

from conftest import family_configs
from moetandem import UnsupportedModelError
from moetandem.models import FAMILIES


def test_experts_run_on_the_geglu_activation(tmp_path):
    """Gemma-4's routed experts are GeGLU: the store, the providers and the committee carry that activation."""
    from conftest import build_checkpoint
    path = build_checkpoint("gemma4_text", tmp_path / "g")
    eng = moetandem.load(path, device="cpu", progress=False, expert_budget=0.5, fidelity="exact")
    assert eng.args.expert_activation.kind == "gelu_tanh"
    assert len(eng.generate([[5, 17, 42]], max_new_tokens=4, stop_on_eos=False)[0].token_ids) == 4


@pytest.mark.parametrize("change", [dict(enable_moe_block=False), dict(hidden_size_per_layer_input=256),
                                    dict(num_kv_shared_layers=2)])
def test_unsupported_variants_refused(change):
    cfg = {**family_configs()["gemma4_text"].to_dict(), **change}
    with pytest.raises(UnsupportedModelError):
        FAMILIES["gemma4_text"].args(cfg, Path("x"))


def test_rope_tables_per_layer_type_match_transformers():
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRotaryEmbedding
    hf_cfg = family_configs()["gemma4_text"]
    a = FAMILIES["gemma4_text"].args(json.loads(hf_cfg.to_json_string()), Path("x"))
    rot = Gemma4TextRotaryEmbedding(hf_cfg)
    for kind, (inv_freq, _) in a.rope_by_type.items():
        torch.testing.assert_close(inv_freq, getattr(rot, f"{kind}_inv_freq"))
    assert {s.head_dim for s in a.layer_attention} == {16, 32} and a.layer_attention[-1].k_eq_v
