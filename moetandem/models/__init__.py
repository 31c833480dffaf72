"""Model families, picked by config.json "model_type". Registering a family here is all it takes for the parity
tests (tests/test_parity.py) to run it against transformers."""
from __future__ import annotations

from moetandem.errors import UnsupportedModelError
from moetandem.models import (deepseek_v2, deepseek_v3, gemma4, glm4_moe, gpt_oss, mixtral, olmoe, qwen2_moe,
                               qwen3_5_moe, qwen3_moe, qwen3_next, switch_transformers)
from moetandem.models.cache import KVCache
from moetandem.models.family import Family
from moetandem.models.transformer import ArchArgs, MoEForCausalLM

REGISTRY: tuple[Family, ...] = (*(m.FAMILY for m in (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3,
                                                      glm4_moe, gpt_oss, qwen3_next)), qwen3_5_moe.TEXT,
                                 qwen3_5_moe.FAMILY, gemma4.TEXT, gemma4.FAMILY, switch_transformers.FAMILY)
#: model_type (and aliases) -> family
FAMILIES: dict[str, Family] = {t: f for f in REGISTRY for t in f.model_types}


def get_family(model_type: str | None) -> Family:
    """The family of a runnable model_type, or UnsupportedModelError saying why not."""
    if model_type is None:
        raise UnsupportedModelError("config.json has no model_type; is this a transformers checkpoint?")
    family = FAMILIES.get(model_type)
    if family is None or family.experts_unsupported is not None:
        runnable = sorted(t for t, f in FAMILIES.items() if f.experts_unsupported is None)
        why = "" if family is None else f" ({family.experts_unsupported})"
        raise UnsupportedModelError(f"unsupported model_type {model_type!r}{why}; moetandem runs: {', '.join(runnable)}")
    return family


__all__ = ["ArchArgs", "FAMILIES", "Family", "KVCache", "MoEForCausalLM", "REGISTRY", "get_family"]
