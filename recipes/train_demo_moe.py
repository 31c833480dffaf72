#!/usr/bin/env python
"""Train the small demo Mixtral-architecture MoE shipped in moetandem/assets/demo-moe/.

From scratch: a byte-level BPE tokenizer and a 16-expert, top-2 MixtralForCausalLM trained on the
plain-text files of ``--data-dir`` (never on the eval split, which is used only for the final
validation perplexity).  The run stops at ``--steps`` or ``--time-budget-min``, whichever comes
first; the cosine schedule follows whichever of the two is further along, so a time-bounded run
still anneals fully.  Output: a Hugging Face checkpoint (bf16, per-expert hub-format tensors),
tokenizer files, ``training_log.json`` and, when matplotlib is importable, ``loss_curve.png``.

    python recipes/train_demo_moe.py --out /tmp/demo-moe --time-budget-min 6 --device cuda
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
EOT = "<|endoftext|>"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared/data/train")
    p.add_argument("--eval-file", type=Path, default=REPO.parent / "shared/data/eval/wikitext2_valid.txt")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=1500, help="upper bound on optimizer steps")
    p.add_argument("--time-budget-min", type=float, default=6.0, help="stop training after this many minutes")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    # model shape
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=160, help="per-expert FFN width")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--aux-coef", type=float, default=0.02)
    p.add_argument("--experts-impl", default="grouped_mm", help="transformers experts implementation")
    # logging / eval / save
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--holdout-frac", type=float, default=0.02, help="held-out tail of each file")
    p.add_argument("--holdout-every", type=int, default=100, help="steps between holdout evals (0: never)")
    p.add_argument("--eval-max-tokens", type=int, default=0, help="cap on validation tokens (0: all)")
    p.add_argument("--max-shard-size", default="16MB", help="16MB = 15.3 MiB")
    return p.parse_args()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def read_documents(data_dir: Path) -> list[str]:
    files = sorted(data_dir.glob("*.txt"))
    if not files:
        raise SystemExit(f"no *.txt files in {data_dir}")
    if any("eval" in f.parts for f in files):
        raise SystemExit("refusing to train on the eval split")
    # inaugural.txt and state_union.txt hold a few hundred stray non-UTF-8 bytes: drop them
    return [f.read_bytes().decode("utf-8", errors="replace").replace("\ufffd", "") for f in files]


def train_tokenizer(docs: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=EOT,
        model_max_length=1024,
    )


def encode_corpus(tokenizer: PreTrainedTokenizerFast, docs: list[str], holdout_frac: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and holdout streams; each document ends with <|endoftext|>, its last tokens go to holdout."""
    train: list[int] = []
    hold: list[int] = []
    for doc in docs:
        ids = tokenizer.backend_tokenizer.encode(doc).ids + [tokenizer.eos_token_id]
        cut = len(ids) - int(len(ids) * holdout_frac)
        train.extend(ids[:cut])
        hold.extend(ids[cut:])
    return torch.tensor(train, dtype=torch.long), torch.tensor(hold, dtype=torch.long)


def build_model(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast) -> MixtralForCausalLM:
    eot = tokenizer.eos_token_id
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, max_position_embeddings=1024, rope_theta=10000.0,
        num_local_experts=args.experts, num_experts_per_tok=args.top_k, output_router_logits=True,
        router_aux_loss_coef=args.aux_coef, tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot,
        pad_token_id=eot, initializer_range=0.02, attention_dropout=0.0, sliding_window=None,
    )
    model = MixtralForCausalLM(config)
    if args.experts_impl != "eager":
        model.set_experts_implementation(args.experts_impl)
    return model


def lr_at(step: int, progress: float, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    cos = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * (args.min_lr_ratio + (1.0 - args.min_lr_ratio) * cos)


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "norm" in n]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def evaluate(model: MixtralForCausalLM, ids: torch.Tensor, seq_len: int, device: str, n_words: int = 0,
             batch: int = 16) -> dict[str, float]:
    """Perplexity over non-overlapping windows; per BPE token and per whitespace word."""
    model.eval()
    n = (len(ids) - 1) // seq_len * seq_len
    xs, ys = ids[:n].view(-1, seq_len), ids[1 : n + 1].view(-1, seq_len)
    nll, count = 0.0, 0
    for i in range(0, len(xs), batch):
        x, y = xs[i : i + batch].to(device), ys[i : i + batch].to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            logits = model(input_ids=x, output_router_logits=False).logits.float()
        nll += torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1),
                                                 reduction="sum").item()
        count += y.numel()
    model.train()
    metrics = {"val_loss": nll / count, "val_ppl": math.exp(nll / count), "val_tokens": count}
    if n_words:  # per-word perplexity over the words covered by the evaluated tokens
        metrics["val_word_ppl"] = math.exp(nll / (n_words * count / max(len(ids) - 1, 1)))
    return metrics


def save_plot(curve: list[tuple[int, float]], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([s for s, _ in curve], [v for _, v in curve])
    ax.set(xlabel="step", ylabel="train LM loss (nats/token)", title="demo MoE training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    t_start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    device = args.device

    docs = read_documents(args.data_dir)
    tokenizer = train_tokenizer(docs, args.vocab_size)
    data, hold = encode_corpus(tokenizer, docs, args.holdout_frac)
    print(f"tokenizer: vocab {len(tokenizer)}; train corpus {sum(map(len, docs)) / 1e6:.2f} MB "
          f"-> {len(data):,} train + {len(hold):,} holdout tokens ({time.time() - t_start:.1f}s)", flush=True)
    data = data.to(device)
    offsets = torch.arange(args.seq_len + 1, device=device)

    model = build_model(args, tokenizer).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    per_expert = 3 * args.hidden * args.intermediate
    n_active = n_params - args.layers * (args.experts - args.top_k) * per_expert
    print(f"model: {n_params / 1e6:.2f}M params ({n_active / 1e6:.2f}M active/token), "
          f"bf16 ~{2 * n_params / 2**20:.1f} MiB", flush=True)
    opt = make_optimizer(model, args)
    gen = torch.Generator().manual_seed(args.seed)
    budget_s = args.time_budget_min * 60.0
    use_amp = device.startswith("cuda")

    curve: list[tuple[int, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor] | None] = (math.inf, 0, None)  # holdout loss, step, weights
    ema, step, t_train = None, 0, time.time()
    model.train()
    while step < args.steps:
        elapsed = time.time() - t_train
        if elapsed >= budget_s:
            break
        lr = lr_at(step, max(step / args.steps, elapsed / budget_s), args)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(data) - args.seq_len - 1, (args.batch_size,), generator=gen)
        batch = data[starts.to(device)[:, None] + offsets]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            out = model(input_ids=batch[:, :-1], output_router_logits=True)
            logits = out.logits.float()
            lm_loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        (lm_loss + args.aux_coef * out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        lm = lm_loss.item()
        ema = lm if ema is None else 0.95 * ema + 0.05 * lm
        if step % args.log_every == 0 or step == 1:
            curve.append((step, ema))
            tok_s = step * args.batch_size * args.seq_len / (time.time() - t_train)
            print(f"step {step:5d}  loss {lm:.3f}  ema {ema:.3f}  aux {out.aux_loss.item():.3f}  "
                  f"lr {lr:.2e}  {tok_s / 1e3:.1f}k tok/s  {time.time() - t_train:.0f}s", flush=True)
        if args.holdout_every and len(hold) > args.seq_len and step % args.holdout_every == 0:
            h = evaluate(model, hold, args.seq_len, device)["val_loss"]
            if h < best[0]:
                best = (h, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
            print(f"  holdout loss {h:.3f} (best {best[0]:.3f} at step {best[1]})", flush=True)
    train_s = time.time() - t_train
    if best[2] is not None and args.holdout_every:  # keep the final weights unless they are worse
        h = evaluate(model, hold, args.seq_len, device)["val_loss"]
        print(f"final holdout loss {h:.3f}; best {best[0]:.3f} at step {best[1]}", flush=True)
        if h > best[0]:
            model.load_state_dict(best[2])
            print(f"restored the weights of step {best[1]}", flush=True)
        else:
            best = (h, step, None)
    if not curve or curve[-1][0] != step:
        curve.append((step, ema))

    eval_text = args.eval_file.read_text(encoding="utf-8")
    val_ids = torch.tensor(tokenizer.backend_tokenizer.encode(eval_text).ids)
    n_words = len(eval_text.split())
    if args.eval_max_tokens:
        n_words = int(n_words * min(1.0, args.eval_max_tokens / len(val_ids)))
        val_ids = val_ids[: args.eval_max_tokens]
    metrics = evaluate(model, val_ids, args.seq_len, device, n_words)

    model.config.output_router_logits = False  # inference default; training asks for router logits per call
    model.to(torch.bfloat16).save_pretrained(args.out, max_shard_size=args.max_shard_size)
    tokenizer.save_pretrained(args.out)
    tok_cfg_path = args.out / "tokenizer_config.json"  # a class name that transformers 4.x and 5.x both know
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    plotted = save_plot(curve, args.out / "loss_curve.png")
    log = {
        "params": n_params, "active_params_per_token": n_active, "steps": step,
        "tokens_seen": step * args.batch_size * args.seq_len, "train_corpus_tokens": len(data),
        "wall_time_s": round(time.time() - t_start, 1), "train_time_s": round(train_s, 1),
        "final_train_loss_ema": round(ema, 4), "kept_step": best[1] or step,
        "holdout_loss": None if math.isinf(best[0]) else round(best[0], 4),
        **{k: round(v, 4) for k, v in metrics.items()},
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu x{torch.get_num_threads()}",
        "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()},
        "loss_curve": [[s, round(v, 4)] for s, v in curve],
    }
    (args.out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print("\nloss curve (step: ema train LM loss)")
    shown = curve[:: max(1, len(curve) // 20)]
    for s, v in shown + ([curve[-1]] if shown[-1] != curve[-1] else []):
        print(f"  {s:6d}: {v:6.3f} " + "#" * int(max(v, 0) * 6))
    print(f"\nsteps {step}, tokens {log['tokens_seen']:,}, train {train_s:.0f}s, final train loss {ema:.3f}")
    print(f"wikitext-2 valid: {metrics['val_tokens']:,} tokens, ppl {metrics['val_ppl']:.1f} per token, "
          f"{metrics['val_word_ppl']:.1f} per word" + ("" if plotted else "  (matplotlib missing: no PNG)"))
    print("saved:", ", ".join(sorted(f"{p.name} ({p.stat().st_size / 2**20:.1f} MiB)" for p in args.out.iterdir())))


if __name__ == "__main__":
    main()
