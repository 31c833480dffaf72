"""Mixtral: GQA, softmax router with top-k renormalised, experts w1 (gate) / w3 (up) / w2 (down)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from moetandem.models.components import SoftmaxTopK
from moetandem.models.family import Family, common_args, need
from moetandem.models.transformer import ArchArgs


def args(c: dict[str, Any], path: Path) -> ArchArgs:
    return common_args(c, path, num_experts=int(need(c, path, "num_local_experts", "num_experts")),
                       moe_intermediate_size=int(need(c, path, "intermediate_size")),
                       router=SoftmaxTopK(norm_topk_prob=True))


FAMILY = Family(
    model_type="mixtral",
    args=args,
    expert_keys=("model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight",
                 "model.layers.{l}.block_sparse_moe.experts.{e}.w3.weight",
                 "model.layers.{l}.block_sparse_moe.experts.{e}.w2.weight"),
    renames=((r"\.block_sparse_moe\.", ".mlp."),),
)
