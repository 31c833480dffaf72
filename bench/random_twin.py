"""A random-weight twin of a checkpoint: the same config and tokenizer, weights from transformers' own init
(seeded). The GPU bench shapes are random checkpoints; measuring the committee on a trained model and on its
twin side by side shows how far a random router's routing is from a trained one's.

    python bench/random_twin.py --out /tmp/demo-random            # the shipped demo MoE's twin
    python bench/committee.py --data ../shared/data/eval/wikitext2_valid.txt --configs "exact (auto)" \
        --budgets 0.25 0.5 --model /tmp/demo-random                # and without --model: the trained demo
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def random_twin(model: Path, out: Path, seed: int = 0) -> Path:
    """Write `out`: `model`'s config and tokenizer files with weights from the architecture's own init."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(model)
    torch.manual_seed(seed)
    net = AutoModelForCausalLM.from_config(cfg, dtype=getattr(cfg, "dtype", None) or torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (model / name).exists():
            shutil.copy(model / name, out / name)
    return out


def main() -> None:
    from moetandem.assets import demo_model_path
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the demo MoE)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(random_twin(a.model or demo_model_path(), a.out, a.seed))


if __name__ == "__main__":
    main()
