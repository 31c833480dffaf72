"""DeepSeek-V3 / R1, Kimi-K2 (model_type kimi_k2, same architecture): multi-head latent attention, sigmoid router
with e_score_correction_bias, group-limited top-k (n_group, topk_group) and routed_scaling_factor, plain shared
experts, the first k layers dense. The MTP layer some checkpoints carry (layer num_hidden_layers) is not run."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from moetandem.models.components import SigmoidGroupTopK
from moetandem.models.deepseek_v2 import SHARED, deepseek_args
from moetandem.models.family import Family
from moetandem.models.qwen2_moe import EXPERT_KEYS
from moetandem.models.transformer import ArchArgs


def sigmoid_router(c: dict[str, Any]) -> SigmoidGroupTopK:
    return SigmoidGroupTopK(n_group=int(c.get("n_group") or 1), topk_group=int(c.get("topk_group") or 1),
                            norm_topk_prob=bool(c.get("norm_topk_prob", True)),
                            routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)))


def args(c: dict[str, Any], path: Path) -> ArchArgs:
    hf_type = "deepseek_v3" if c.get("model_type") != "deepseek_v3" else None
    return deepseek_args(c, path, sigmoid_router(c), hf_type)


FAMILY = Family(model_type="deepseek_v3", aliases=("kimi_k2",), args=args, expert_keys=EXPERT_KEYS, renames=SHARED)
