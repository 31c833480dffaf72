"""Qwen3.5 / 3.6 MoE (35B-A3B, ...): Qwen3-Next's hybrid stack with separate linear-attention projections
(in_proj_qkv / z / b / a), every layer MoE, top-k always renormalised; its multimodal RoPE is plain RoPE for text.
The released checkpoints are multimodal wrappers (`qwen3_5_moe`: `text_config`, the language model under
`model.language_model.`, a vision tower that is not run); text-only `qwen3_5_moe_text` checkpoints load too."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from moetandem.models.family import FUSED, Family, need, text_config
from moetandem.models.qwen2_moe import EXPERT_KEYS
from moetandem.models.qwen3_next import SHARED_GATE, hybrid_args
from moetandem.models.transformer import ArchArgs

LM = "model.language_model."


def args(c: dict[str, Any], path: Path) -> ArchArgs:
    c = text_config(c)
    return hybrid_args(c, path, fused_proj=False, norm_topk_prob=True,
                       moe_layers=[True] * int(need(c, path, "num_hidden_layers")))


def _wrapped(keys: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(k.replace("model.", LM, 1) for k in keys)


TEXT = Family(model_type="qwen3_5_moe_text", args=args, expert_keys=EXPERT_KEYS, renames=SHARED_GATE)
FAMILY = Family(model_type="qwen3_5_moe", args=args, expert_keys=_wrapped(EXPERT_KEYS), fused=_wrapped(FUSED),
                renames=((r"^model\.language_model\.", "model."), *SHARED_GATE))
