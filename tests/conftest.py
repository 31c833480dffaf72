"""Tiny random checkpoints of every family, saved by transformers in the hub layout."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.08, eos_token_id=None,
              bos_token_id=None, pad_token_id=None)


MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
           moe_intermediate_size=16, first_k_dense_replace=1)


#: hybrid linear attention (Qwen3-Next, Qwen3.5): 3 Gated DeltaNet layers + 1 gated full attention, grouped value heads
LINEAR = dict(num_hidden_layers=4, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
              linear_key_head_dim=16, linear_value_head_dim=8, linear_conv_kernel_dim=4, num_experts=8,
              num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=24)


def family_configs() -> dict:
    """One tiny config per registered family (moetandem.models.REGISTRY): a family without one fails its tests."""
    from transformers import (DeepseekV2Config, DeepseekV3Config, Glm4MoeConfig, GptOssConfig, MixtralConfig,
                              OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig)
    yarn = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64,
                beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
    return {
        "mixtral": MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2),
        "qwen2_moe": Qwen2MoeConfig(**{**COMMON, "intermediate_size": 40}, num_experts=8, num_experts_per_tok=2,
                                    moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                    mlp_only_layers=[1]),
        "qwen3_moe": Qwen3MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                                    norm_topk_prob=True, head_dim=24),
        "olmoe": OlmoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2, clip_qkv=4.0),
        # V2-Lite style: no q LoRA; the full V2's group-limited greedy routing with a routed scaling factor
        "deepseek_v2": DeepseekV2Config(**{**COMMON, **MLA}, n_routed_experts=8, num_experts_per_tok=2,
                                        n_shared_experts=2, q_lora_rank=None, topk_method="group_limited_greedy",
                                        n_group=4, topk_group=2, routed_scaling_factor=1.5),
        # V3 / R1 / Kimi-K2 style: q LoRA, interleaved YaRN RoPE (with the mscale softmax correction)
        "deepseek_v3": DeepseekV3Config(**{**COMMON, **MLA}, n_routed_experts=8, num_experts_per_tok=2,
                                        n_shared_experts=1, q_lora_rank=24, n_group=4, topk_group=2,
                                        routed_scaling_factor=2.5, rope_parameters=yarn),
        "glm4_moe": Glm4MoeConfig(**COMMON, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                  n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1,
                                  use_qk_norm=True, attention_bias=True, head_dim=16, routed_scaling_factor=1.5),
        "gpt_oss": GptOssConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2, head_dim=16, sliding_window=4),
        **hybrid_configs(),
        **gemma4_configs(),
    }


def gemma4_configs() -> dict:
    """Gemma-4 MoE: sliding layers (window 4) and full layers with their own head size, one KV head and k = v,
    proportional partial RoPE, soft-capped logits; the text model and the multimodal wrapper."""
    from transformers.models.gemma4 import Gemma4Config, Gemma4TextConfig
    text = dict({**COMMON, "pad_token_id": 0}, num_hidden_layers=4, head_dim=16, global_head_dim=32,
                num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=4,
                layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention"],
                enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=16,
                hidden_size_per_layer_input=0, final_logit_softcapping=30.0)
    vision = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=8)
    return {"gemma4_text": Gemma4TextConfig(**text),
            "gemma4": Gemma4Config(text_config=Gemma4TextConfig(**text).to_dict(), vision_config=vision,
                                   audio_config=None)}


def hybrid_configs() -> dict:
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_5_moe import Qwen3_5MoeConfig, Qwen3_5MoeTextConfig
    text = {k: v for k, v in {**COMMON, **LINEAR}.items() if k != "intermediate_size"}
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=COMMON["hidden_size"])
    return {
        "qwen3_next": Qwen3NextConfig(**{**COMMON, **LINEAR}, mlp_only_layers=[2]),  # one dense layer
        "qwen3_5_moe_text": Qwen3_5MoeTextConfig(**text),
        # the multimodal wrapper: language model under model.language_model., a vision tower we do not run
        "qwen3_5_moe": Qwen3_5MoeConfig(text_config=Qwen3_5MoeTextConfig(**text).to_dict(), vision_config=vision),
    }


def _registry() -> tuple[list[str], list[str]]:
    """Decoder-only families: the parity tests build them with AutoModelForCausalLM and drive the batcher. The
    encoder-decoders (seq2seq: Switch Transformers) have their own parity tests (tests/test_switch.py)."""
    from moetandem.models import REGISTRY
    fams = [f for f in REGISTRY if not f.seq2seq]
    return [f.model_type for f in fams], [f.model_type for f in fams if f.experts_unsupported is None]


#: every registered family / those moetandem.load runs end to end (the others' experts are not supported yet)
FAMILIES, RUNNABLE = _registry()


def build_checkpoint(family: str, path: Path, seed: int = 0, **overrides: object) -> Path:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    configs = family_configs()
    if family not in configs:
        pytest.fail(f"family {family!r} is registered but has no tiny config: add one to family_configs() in "
                    "tests/conftest.py")
    cfg = configs[family]
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if hasattr(cfg, "text_config") else AutoModelForCausalLM  # wrappers as released
    model = auto.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # init leaves DeepSeek-V3's expert-choice bias at zero: make it matter
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.1)
    model.save_pretrained(path, max_shard_size="200KB")  # several shards: exercises the index
    return path


@pytest.fixture(scope="session", params=RUNNABLE)
def tiny_checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    fam = request.param
    return fam, build_checkpoint(fam, tmp_path_factory.mktemp(fam))


@pytest.fixture(scope="session", params=FAMILIES)
def family_checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """Every registered family, including those whose routed experts moetandem cannot run yet."""
    fam = request.param
    return fam, build_checkpoint(fam, tmp_path_factory.mktemp(fam))


def _interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter holds a scalar as a 1-element array and turns it into a loop bound with
    int(array), which recent numpy (2.4 here) refuses (a TypeError at every `range(lo, hi)` over loaded values): read its one
    element instead. Patches only the interpreter, only under TRITON_INTERPRET=1."""
    import os
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "scalar_index", False):
        return

    def patched(tensor: type, scope: object) -> None:
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))  # type: ignore[attr-defined]

    patched.scalar_index = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


_interpreter_scalar_index()
