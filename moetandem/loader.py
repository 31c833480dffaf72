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
    # {l}: a layer number, or a family's layer prefix (Switch Transformers: encoder.block.3.layer.1)
    alts = [re.escape(k).replace(r"\{l\}", r"[\w.]+").replace(r"\{e\}", r"\d+") for k in templates]
    return re.compile("^(?:" + "|".join(alts) + ")$")


def packed_shards(model: torch.nn.Module) -> dict[str, tuple[str, int, int]]:
    """Checkpoint names that fill rows [a, b) of a packed parameter (e.g. q/k/v_proj -> qkv_proj): each module's
    `packed` table ({local checkpoint name: (local parameter, a, b)}), with the module prefix added."""
    out = {}
    for prefix, m in model.named_modules():
        for name, (target, a, b) in getattr(m, "packed", {}).items():
            out[f"{prefix}.{name}" if prefix else name] = (f"{prefix}.{target}" if prefix else target, a, b)
    return out


def load_dense(ckpt: Checkpoint, family: Family, args: ArchArgs, device: torch.device, dtype: torch.dtype,
               progress: bool = True) -> MoEForCausalLM:
    """Instantiate the model (the family's class) without allocating on the host, then fill each parameter from
    its tensor (a packed parameter from its shards, in place)."""
    with torch.device("meta"):
        model = (family.model or MoEForCausalLM)(args)
    # each parameter in its final dtype before anything is allocated (on meta this costs nothing), so the device
    # holds every dense weight once: allocated in the default fp32 and then replaced, the load's peak was twice the
    # bf16 dense bytes
    fp32 = {f"{mod}.{p}" for mod, m in model.named_modules() if getattr(m, "keep_fp32", False)
            for p, _ in m.named_parameters(recurse=False)}  # routers transformers also keeps in fp32
    model = model.to(dtype)
    for name, p in model.named_parameters():
        if name in fp32:
            p.data = p.data.float()
    model = model.to_empty(device=device)
    params = dict(model.named_parameters())
    shards = packed_shards(model)
    pending: dict[str, set[str]] = {}  # packed parameter -> its shards not yet read
    for name, (target, _, _) in shards.items():
        pending.setdefault(target, set()).add(name)
    experts = expert_pattern(family)
    sch = scheme(ckpt.config, ckpt.path)  # pre-quantized non-expert weights are dequantized here
    todo = [n for n in ckpt.names() if not experts.match(param_name(sch, n))]
    filled: set[str] = set()
    for hub_name in tqdm(todo, desc="weights", unit="tensor", disable=not progress, leave=False):
        name = param_name(sch, family.rename(hub_name))
        if name in shards:
            target, a, b = shards[name]
            t = dense(ckpt, sch, hub_name)
            p = params[target]
            if list(t.shape) != [b - a, *p.shape[1:]]:
                raise CheckpointError(f"{hub_name} has shape {list(t.shape)}, config.json implies "
                                      f"{[b - a, *p.shape[1:]]}")
            with torch.no_grad():  # packed parameters (attention's qkv) were allocated in dtype above
                p.data[a:b].copy_(t)
            pending[target].discard(name)
            if not pending[target]:
                filled.add(target)
            continue
        if name not in params:
            continue  # e.g. stale rotary buffers some exporters save, quantization scales
        t = dense(ckpt, sch, hub_name)
        if list(t.shape) != list(params[name].shape):
            raise CheckpointError(f"{hub_name} has shape {list(t.shape)}, config.json implies "
                                  f"{list(params[name].shape)}")
        with torch.no_grad():  # into the allocated parameter: converted on the host, then one copy to the device
            params[name].copy_(t.to(params[name].dtype))
        filled.add(name)
    if args.tie_word_embeddings and "lm_head.weight" not in filled:
        model.lm_head.weight = model.input_embeddings().weight
        filled.add("lm_head.weight")
    missing = sorted(set(params) - filled)
    if missing:
        raise CheckpointError(f"{len(missing)} weights are missing from the checkpoint (first: {missing[0]})")
    model.init_rope(device)
    return model.eval()
