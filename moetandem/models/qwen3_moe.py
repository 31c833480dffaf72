"""Qwen3-MoE: GQA with per-head q/k RMSNorm, softmax router, optional dense layers, no shared expert."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from moetandem.models.components import SoftmaxTopK
from moetandem.models.family import Family, common_args, gqa, need, sparse_layers
from moetandem.models.qwen2_moe import EXPERT_KEYS
from moetandem.models.transformer import ArchArgs


def args(c: dict[str, Any], path: Path) -> ArchArgs:
    bias = bool(c.get("attention_bias", False))
    return common_args(
        c, path, num_experts=int(need(c, path, "num_experts", "num_local_experts")),
        moe_intermediate_size=int(need(c, path, "moe_intermediate_size")),
        attention=gqa(c, path, qkv_bias=bias, o_bias=bias, qk_norm="head"),
        router=SoftmaxTopK(norm_topk_prob=bool(c.get("norm_topk_prob", False))),
        moe_layers=sparse_layers(c, int(need(c, path, "num_hidden_layers"))),
        dense_intermediate_size=int(c.get("intermediate_size", 0)))


FAMILY = Family(model_type="qwen3_moe", args=args, expert_keys=EXPERT_KEYS)
