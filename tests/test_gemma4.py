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


def test_rotary_memory_does_not_grow_with_the_context(tmp_path):
    """cos/sin are computed per step from the positions (rope_at), never held for every position: with 262,144
    positions the tables of Gemma-4's three rotary kinds took 2 GiB of GPU memory. The model's tensors are the same
    for a 2k and a 1M context, and rope_at gives exactly the rows of the full tables."""
    from conftest import build_checkpoint
    from moetandem.models.components import rope_at, rope_tables

    def model_bytes(path: Path) -> int:
        m = moetandem.load(path, device="cpu", progress=False).model
        extra = sum(f.numel() * f.element_size() for f, _ in m.rope_freqs.values())
        return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()]) + extra

    short = build_checkpoint("gemma4_text", tmp_path / "short", max_position_embeddings=2048)
    long = build_checkpoint("gemma4_text", tmp_path / "long", max_position_embeddings=1 << 20)
    assert model_bytes(short) == model_bytes(long)
    eng = moetandem.load(short, device="cpu", progress=False)
    assert len(eng.model.rope_freqs) == 1 + len(eng.args.rope_by_type) >= 3
    pos = torch.tensor([[0, 1, 7], [2047, 1000, 3]])
    for inv_freq, scaling in eng.model.rope_freqs.values():
        cos, sin = rope_tables(inv_freq, scaling, 2048)
        got = rope_at(pos, inv_freq, scaling)
        assert torch.equal(got[0], cos[pos]) and torch.equal(got[1], sin[pos])
