"""Model families, picked by config.json "model_type"."""
from __future__ import annotations

from moetandem.errors import UnsupportedModelError
from moetandem.models import mixtral, olmoe, qwen2_moe, qwen3_moe
from moetandem.models.family import Family
from moetandem.models.transformer import ArchArgs, KVCache, MoEForCausalLM

FAMILIES: dict[str, Family] = {m.FAMILY.model_type: m.FAMILY for m in (mixtral, qwen2_moe, qwen3_moe, olmoe)}


def get_family(model_type: str | None) -> Family:
    if model_type is None:
        raise UnsupportedModelError("config.json has no model_type; is this a transformers checkpoint?")
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}; moetandem runs: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


__all__ = ["ArchArgs", "FAMILIES", "Family", "KVCache", "MoEForCausalLM", "get_family"]
