"""Random checkpoints of real MoE shapes, written straight from tensors (no model init). OLMoE / Qwen3 shapes use
the hub's per-expert layout; the newer families take their tensor names and shapes from transformers' own model
built on the meta device, i.e. transformers 5's fused expert layout, which both moetandem's ExpertStore and
transformers read."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

SHAPES: dict[str, dict] = {
    "olmoe-1b-7b": dict(model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024,
                        num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, num_experts=64,
                        num_experts_per_tok=8, max_position_embeddings=4096, rms_norm_eps=1e-5,
                        rope_theta=10000.0, norm_topk_prob=False, clip_qkv=None, tie_word_embeddings=False),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                          max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                          norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                          tie_word_embeddings=False),
    # the Qwen3-30B-A3B layer shape with half its layers: per-layer speed and memory are the same, and the checkpoint
    # plus a pinned copy of its experts fit the GPU host's RAM (the full 61 GB model does not, twice)
    "qwen3-30b-a3b-24l": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                              moe_intermediate_size=768, num_hidden_layers=24, num_attention_heads=32,
                              num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                              max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                              norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                              tie_word_embeddings=False),
    # 27 layers (first dense), MLA (kv_lora 512, no q LoRA), 64 experts top-6 + 2 shared, YaRN as released
    "deepseek-v2-lite": dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                             moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                             num_key_value_heads=16, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
                             kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128,
                             v_head_dim=128, first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1,
                             routed_scaling_factor=1.0, norm_topk_prob=False, max_position_embeddings=163840,
                             rms_norm_eps=1e-6, tie_word_embeddings=False,
                             rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096,
                                               beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707,
                                               rope_theta=10000.0)),
    # the first 4 layers of DeepSeek-V3 (3 dense + 1 MoE with 256 experts top-8, n_group 8 / topk_group 4):
    # ~30 GB in bf16, 22.5 GB of it one layer's routed experts
    "deepseek-v3-4l": dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                           moe_intermediate_size=2048, num_hidden_layers=4, num_attention_heads=128,
                           num_key_value_heads=128, n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1,
                           kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128,
                           v_head_dim=128, first_k_dense_replace=3, n_group=8, topk_group=4,
                           routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=163840,
                           rms_norm_eps=1e-6, tie_word_embeddings=False, rope_interleave=True,
                           rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096,
                                             beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0,
                                             rope_theta=10000.0)),
    # GLM-4.5-Air: 46 layers, 128 experts top-8 + 1 shared, ~212 GB in bf16 (a committee budget, or more GPUs);
    # glm-4.5-air-8l is its first 8 layers (~31 GB) for one GPU with everything resident
    "glm-4.5-air": dict(model_type="glm4_moe", vocab_size=151552, hidden_size=4096, intermediate_size=10944,
                        moe_intermediate_size=1408, num_hidden_layers=46, num_attention_heads=96,
                        num_key_value_heads=8, head_dim=128, n_routed_experts=128, num_experts_per_tok=8,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                        routed_scaling_factor=1.0, norm_topk_prob=True, partial_rotary_factor=0.5,
                        attention_bias=True, use_qk_norm=False, max_position_embeddings=131072, rms_norm_eps=1e-5,
                        rope_theta=1000000.0, tie_word_embeddings=False),
    # gpt-oss-20b: 24 layers, 32 experts top-4, sliding (128) / full attention alternating, sinks; the random
    # checkpoint's experts are bf16 (gate_up_proj [E, H, 2I], interleaved), not the hub's MXFP4
    "gpt-oss-20b": dict(model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880,
                        num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                        num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
                        layer_types=["sliding_attention", "full_attention"] * 12, attention_bias=True,
                        swiglu_limit=7.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
                        rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0,
                                             beta_slow=1.0, truncate=False, original_max_position_embeddings=4096),
                        tie_word_embeddings=False),
    "tiny-olmoe": dict(model_type="olmoe", vocab_size=512, hidden_size=64, intermediate_size=32,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, num_experts=8,
                       num_experts_per_tok=2, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                       norm_topk_prob=False, clip_qkv=None, tie_word_embeddings=False),
}


SHAPES["olmoe-1b-7b-4l"] = {**SHAPES["olmoe-1b-7b"], "num_hidden_layers": 4}  # bench/testbed.py --gpu
SHAPES["qwen3-30b-a3b-4l"] = {**SHAPES["qwen3-30b-a3b"], "num_hidden_layers": 4}  # bench/testbed.py --gpu --shape
SHAPES["glm-4.5-air-8l"] = {**SHAPES["glm-4.5-air"], "num_hidden_layers": 8}
SHAPES["deepseek-v2-lite-9l"] = {**SHAPES["deepseek-v2-lite"], "num_hidden_layers": 9}  # 1 dense + 8 MoE
# Qwen3.5-35B-A3B (text model): 40 layers, 3 Gated DeltaNet : 1 gated attention, 256 experts top-8 + a gated shared
# expert, ~67 GB in bf16; the -20l variant is its first 20 layers (same per-layer shape, fits a pinned host copy)
SHAPES["qwen3.5-35b-a3b"] = dict(
    model_type="qwen3_5_moe_text", vocab_size=248320, hidden_size=2048, num_hidden_layers=40, num_attention_heads=16,
    num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
    linear_value_head_dim=128, linear_conv_kernel_dim=4, full_attention_interval=4, num_experts=256,
    num_experts_per_tok=8, moe_intermediate_size=512, shared_expert_intermediate_size=512,
    max_position_embeddings=262144, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_parameters=dict(rope_type="default", rope_theta=10000000.0, partial_rotary_factor=0.25))
SHAPES["qwen3.5-35b-a3b-20l"] = {**SHAPES["qwen3.5-35b-a3b"], "num_hidden_layers": 20}
SHAPES["qwen3.5-35b-a3b-8l"] = {**SHAPES["qwen3.5-35b-a3b"], "num_hidden_layers": 8}  # 2 attention + 6 DeltaNet
# Qwen3-Next-80B-A3B with 12 of its 48 layers (~40 GB): 512 experts top-10 + a gated shared expert
SHAPES["qwen3-next-80b-a3b-12l"] = dict(
    model_type="qwen3_next", vocab_size=151936, hidden_size=2048, intermediate_size=5120, num_hidden_layers=12,
    num_attention_heads=16, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
    linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4, full_attention_interval=4,
    num_experts=512, num_experts_per_tok=10, moe_intermediate_size=512, shared_expert_intermediate_size=512,
    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=262144,
    rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_parameters=dict(rope_type="default", rope_theta=10000000.0, partial_rotary_factor=0.25))
# Gemma-4-26B-A4B (text model; the published config as we read it: 30 layers, 5 sliding : 1 global attention,
# 128 GELU experts top-8 beside a dense MLP, global layers with 512-dim heads and K = V); -10l: its first 10 layers
SHAPES["gemma-4-26b-a4b"] = dict(
    model_type="gemma4_text", vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
    num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2,
    attention_k_eq_v=True, sliding_window=1024, enable_moe_block=True, num_experts=128, top_k_experts=8,
    moe_intermediate_size=704, hidden_size_per_layer_input=0, vocab_size_per_layer_input=262144,
    final_logit_softcapping=30.0, max_position_embeddings=262144, rms_norm_eps=1e-6, tie_word_embeddings=True,
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                     "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                        "rope_theta": 1000000.0}})
SHAPES["gemma-4-26b-a4b-10l"] = {**SHAPES["gemma-4-26b-a4b"], "num_hidden_layers": 10}
# Switch Transformers (google/switch-base-64 / -128): T5-base encoder-decoder, 12 + 12 blocks, every second one a
# top-1 MoE of 64 / 128 ReLU experts (d_ff 3072), capacity 64; 7.2 / 14.5 GB of experts in bf16
SHAPES["switch-base-64"] = dict(
    model_type="switch_transformers", vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12,
    num_decoder_layers=12, num_heads=12, num_experts=64, num_sparse_encoder_layers=6, num_sparse_decoder_layers=6,
    expert_capacity=64, relative_attention_num_buckets=32, relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6, dense_act_fn="relu", tie_word_embeddings=True, is_encoder_decoder=True,
    pad_token_id=0, decoder_start_token_id=0)
SHAPES["switch-base-128"] = {**SHAPES["switch-base-64"], "num_experts": 128}
HUB_LAYOUT = ("olmoe", "qwen3_moe")  # written by hand in the per-expert hub layout; the rest via transformers


def tensor_shapes(cfg: dict) -> dict[str, list[int]]:
    """Tensor names and shapes of a checkpoint of this config."""
    return hub_tensor_shapes(cfg) if cfg["model_type"] in HUB_LAYOUT else hf_tensor_shapes(cfg)


def hf_tensor_shapes(cfg: dict) -> dict[str, list[int]]:
    """transformers' own parameter (and persistent buffer) names and shapes, from its model on the meta device;
    an encoder-decoder's tied copies of the shared embedding are left out (transformers ties them on load)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    conf = AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    seq2seq = bool(cfg.get("is_encoder_decoder"))
    with torch.device("meta"):
        model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_config(conf)
    tied = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"} if seq2seq else set()
    if seq2seq and cfg.get("tie_word_embeddings", True):
        tied.add("lm_head.weight")
    return {name: list(t.shape) for name, t in model.state_dict().items() if name not in tied}


def hub_tensor_shapes(cfg: dict) -> dict[str, list[int]]:
    """Hub tensor names and shapes for the OLMoE / Qwen3-MoE layouts."""
    H, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or H // nh
    E = cfg["num_experts"]
    inter = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    per_head_norm = cfg["model_type"] == "qwen3_moe"
    out = {"model.embed_tokens.weight": [V, H], "model.norm.weight": [H], "lm_head.weight": [V, H]}
    for l in range(L):
        p = f"model.layers.{l}"
        out.update({f"{p}.input_layernorm.weight": [H], f"{p}.post_attention_layernorm.weight": [H],
                    f"{p}.self_attn.q_proj.weight": [nh * hd, H], f"{p}.self_attn.k_proj.weight": [nkv * hd, H],
                    f"{p}.self_attn.v_proj.weight": [nkv * hd, H], f"{p}.self_attn.o_proj.weight": [H, nh * hd],
                    f"{p}.self_attn.q_norm.weight": [hd if per_head_norm else nh * hd],
                    f"{p}.self_attn.k_norm.weight": [hd if per_head_norm else nkv * hd],
                    f"{p}.mlp.gate.weight": [E, H]})
        for e in range(E):
            q = f"{p}.mlp.experts.{e}"
            out.update({f"{q}.gate_proj.weight": [inter, H], f"{q}.up_proj.weight": [inter, H],
                        f"{q}.down_proj.weight": [H, inter]})
    return out


def build_random_checkpoint(shape: str, path: Path, dtype: torch.dtype = torch.bfloat16,
                            device: str = "cpu", shard_bytes: int = 4 << 30, seed: int = 0) -> Path:
    """Write config.json + sharded safetensors with N(0, 0.02) weights (norms = 1)."""
    cfg = dict(SHAPES[shape])
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**cfg, "architectures": ["X"], "torch_dtype": str(dtype)[6:],
                                                  "bos_token_id": 1, "eos_token_id": None}, indent=1))
    gen = torch.Generator(device=device).manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    nbytes, idx = 0, 0

    def flush() -> None:
        nonlocal shard, nbytes, idx
        name = f"model-{idx:05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, nbytes, idx = {}, 0, idx + 1

    for name, shp in tqdm(tensor_shapes(cfg).items(), desc=f"building {shape}", unit="tensor", mininterval=5):
        if name.endswith("norm.weight") or name.endswith("e_score_correction_bias"):
            t = torch.ones(shp, dtype=dtype) if name.endswith("weight") else torch.zeros(shp, dtype=dtype)
        else:
            t = (torch.randn(shp, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype).cpu()
        shard[name] = t
        nbytes += t.numel() * t.element_size()
        if nbytes >= shard_bytes:
            flush()
    if shard:
        flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def shape_checkpoint(shape: str, root: Path = Path("/tmp")) -> Path:
    """The random checkpoint of `shape` at root/moetandem-<shape>, built on first use (on the GPU when there is one:
    seconds for a 4-layer slice)."""
    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; one of: {', '.join(SHAPES)}")
    path = root / f"moetandem-{shape}"
    if not (path / "model.safetensors.index.json").exists():
        import time
        t = time.time()
        build_random_checkpoint(shape, path, device="cuda" if torch.cuda.is_available() else "cpu")
        print(f"built {shape} at {path} in {time.time() - t:.0f} s", flush=True)
    return path
