"""Build our model for a checkpoint: non-expert weights onto the device, experts behind a provider."""
from __future__ import annotations

import re

import torch
from tqdm import tqdm

from moetandem.checkpoint import Checkpoint
from moetandem.errors import CheckpointError
from moetandem.models import ArchArgs, Family, MoEForCausalLM
from moetandem.quantization import dense, param_name, scheme


def expert_pattern(family: Family) -> re.Pattern[str]:
    """Matches every hub name that belongs to an expert (per-expert or fused layout)."""
    templates = [*family.expert_keys, *family.fused_keys("{l}")]
    alts = [re.escape(k).replace(r"\{l\}", r"\d+").replace(r"\{e\}", r"\d+") for k in templates]
    return re.compile("^(?:" + "|".join(alts) + ")$")


def load_dense(ckpt: Checkpoint, family: Family, args: ArchArgs, device: torch.device, dtype: torch.dtype,
               progress: bool = True) -> MoEForCausalLM:
    """Instantiate the model without allocating on the host, then fill each parameter from its tensor."""
    with torch.device("meta"):
        model = MoEForCausalLM(args)
    model = model.to_empty(device=device)
    params = dict(model.named_parameters())
    fp32 = {f"{mod}.{p}" for mod, m in model.named_modules() if getattr(m, "keep_fp32", False)
            for p, _ in m.named_parameters(recurse=False)}  # routers transformers also keeps in fp32
    experts = expert_pattern(family)
    sch = scheme(ckpt.config, ckpt.path)  # pre-quantized non-expert weights are dequantized here
    todo = [n for n in ckpt.names() if not experts.match(param_name(sch, n))]
    filled: set[str] = set()
    for hub_name in tqdm(todo, desc="weights", unit="tensor", disable=not progress, leave=False):
        name = param_name(sch, family.rename(hub_name))
        if name not in params:
            continue  # e.g. stale rotary buffers some exporters save, quantization scales
        t = dense(ckpt, sch, hub_name)
        if list(t.shape) != list(params[name].shape):
            raise CheckpointError(f"{hub_name} has shape {list(t.shape)}, config.json implies "
                                  f"{list(params[name].shape)}")
        with torch.no_grad():
            params[name].data = t.to(device=device, dtype=torch.float32 if name in fp32 else dtype)
        filled.add(name)
    if args.tie_word_embeddings and "lm_head.weight" not in filled:
        model.lm_head.weight = model.model.embed_tokens.weight
        filled.add("lm_head.weight")
    missing = sorted(set(params) - filled)
    if missing:
        raise CheckpointError(f"{len(missing)} weights are missing from the checkpoint (first: {missing[0]})")
    model.init_rope(device)
    return model.eval()
