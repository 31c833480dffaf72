"""Random hub-format checkpoints of real MoE shapes, written straight from tensors (no model init)."""
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
    "tiny-olmoe": dict(model_type="olmoe", vocab_size=512, hidden_size=64, intermediate_size=32,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, num_experts=8,
                       num_experts_per_tok=2, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                       norm_topk_prob=False, clip_qkv=None, tie_word_embeddings=False),
}


def tensor_shapes(cfg: dict) -> dict[str, list[int]]:
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
        if name.endswith("norm.weight"):
            t = torch.ones(shp, dtype=dtype)
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
