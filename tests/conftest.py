"""Tiny random checkpoints of every family, saved by transformers in the hub layout."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.08, eos_token_id=None,
              bos_token_id=None, pad_token_id=None)


def family_configs() -> dict:
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig
    return {
        "mixtral": MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2),
        "qwen2_moe": Qwen2MoeConfig(**{**COMMON, "intermediate_size": 40}, num_experts=8, num_experts_per_tok=2,
                                    moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                    mlp_only_layers=[1]),
        "qwen3_moe": Qwen3MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                                    norm_topk_prob=True, head_dim=24),
        "olmoe": OlmoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2, clip_qkv=4.0),
    }


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def build_checkpoint(family: str, path: Path, seed: int = 0, **overrides: object) -> Path:
    from transformers import AutoModelForCausalLM
    cfg = family_configs()[family]
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(path, max_shard_size="200KB")  # several shards: exercises the index
    return path


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    fam = request.param
    return fam, build_checkpoint(fam, tmp_path_factory.mktemp(fam))
