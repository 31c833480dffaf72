"""Qwen2-MoE: GQA with q/k/v bias, softmax router, optional dense layers, a shared expert behind a sigmoid gate."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from moetandem.models.components import SharedExpertSpec, SoftmaxTopK
from moetandem.models.family import Family, common_args, gqa, need, sparse_layers
from moetandem.models.transformer import ArchArgs

EXPERT_KEYS = ("model.layers.{l}.mlp.experts.{e}.gate_proj.weight",
               "model.layers.{l}.mlp.experts.{e}.up_proj.weight",
               "model.layers.{l}.mlp.experts.{e}.down_proj.weight")


def args(c: dict[str, Any], path: Path) -> ArchArgs:
    shared = int(c.get("shared_expert_intermediate_size", 0))
    return common_args(
        c, path, num_experts=int(need(c, path, "num_experts", "num_local_experts")),
        moe_intermediate_size=int(need(c, path, "moe_intermediate_size")),
        attention=gqa(c, path, qkv_bias=bool(c.get("qkv_bias", True))),
        router=SoftmaxTopK(norm_topk_prob=bool(c.get("norm_topk_prob", False))),
        shared_expert=SharedExpertSpec(shared, gated=True) if shared else None,
        moe_layers=sparse_layers(c, int(need(c, path, "num_hidden_layers"))),
        dense_intermediate_size=int(c.get("intermediate_size", 0)))


FAMILY = Family(model_type="qwen2_moe", args=args, expert_keys=EXPERT_KEYS,
                renames=((r"\.mlp\.shared_expert_gate\.", ".mlp.shared_expert.gate."),))
