"""`moetandem generate`: stream a completion of one prompt to stdout (a text-to-text model's output for the prompt
as input); stats to stderr."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from moetandem.cli.flags import add_committee_args, add_device_args, add_split_args, configs, finite_float, model_path
from moetandem.errors import InvalidRequestError

DEMO_PROMPT = "The king said"


def register(sub: Any) -> None:
    gen = sub.add_parser("generate", help="generate text from a prompt, streamed to stdout",
                         description="Generate from a prompt and stream the text to stdout; stats go to stderr.")
    gen.add_argument("--model", metavar="PATH",
                     help="Hugging Face checkpoint directory (default: the shipped demo MoE)")
    gen.add_argument("--prompt", default=DEMO_PROMPT, metavar="TEXT",
                     help=f"prompt text; token ids separated by spaces when the checkpoint has no tokenizer "
                          f"(default: {DEMO_PROMPT!r})")
    gen.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                     help="tokens to generate (default 64)")
    add_device_args(gen)
    gen.add_argument("--temperature", type=finite_float, default=0.0, metavar="T", help="0 = greedy (default)")
    gen.add_argument("--top-p", type=finite_float, default=1.0, metavar="P", help="nucleus sampling mass (default 1)")
    gen.add_argument("--seed", type=int, default=None, metavar="S", help="seed for reproducible sampling")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    add_committee_args(gen)
    add_split_args(gen)
    gen.set_defaults(run=generate_command)


def generate_command(args: argparse.Namespace) -> int:
    path = model_path(args)
    cfgs = configs(args, path)  # flag problems surface before anything loads
    from moetandem.checkpoint import Checkpoint
    from moetandem.runtime import build_engine
    from moetandem.streaming import TextStream

    tokenizer = Checkpoint(path).tokenizer()  # prompt problems surface before the weights are loaded
    prompt_ids = encode_prompt(tokenizer, args.prompt, args.chat, path)
    engine = build_engine(*cfgs)
    out = sys.stdout
    if hasattr(out, "reconfigure"):
        out.reconfigure(errors="replace")  # a terminal that cannot show a character must not end the run
    # a text-to-text model's output does not continue its input: no prompt context for the detokenizer
    stream = TextStream(tokenizer, () if engine.seq2seq else prompt_ids) if tokenizer is not None else None
    count = 0

    def on_token(_: int, token: int) -> None:
        nonlocal count
        piece = stream.push(token) if stream is not None else f"{' ' if count else ''}{token}"
        count += 1
        if piece:
            out.write(piece)
            out.flush()

    engine.generate([prompt_ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, seed=args.seed, on_token=on_token)
    out.write((stream.flush() if stream is not None else "") + "\n")
    out.flush()
    if engine.last_stats is not None:
        print(format_stats(engine.last_stats), file=sys.stderr)
    experts = engine.expert_stats()
    if experts:
        print(format_expert_stats(experts), file=sys.stderr)
        from moetandem.experts.stats import provider_hint
        hint = provider_hint(engine.provider, engine.device)
        if hint:
            print(hint, file=sys.stderr)
    if engine.split is not None:
        print(format_split_stats(engine.split.split_stats()), file=sys.stderr)
    return 0


def encode_prompt(tokenizer: Any, prompt: str, chat: bool, path: Path) -> list[int]:
    """Prompt text -> token ids: through the chat template with --chat, as literal ids without a tokenizer."""
    if tokenizer is None:
        if chat:
            raise InvalidRequestError(f"--chat needs a tokenizer with a chat template, and {path} ships no tokenizer")
        try:
            ids = [int(t) for t in prompt.replace(",", " ").split()]
        except ValueError:
            raise InvalidRequestError(f"{path} ships no tokenizer, so --prompt must be token ids separated by "
                                      f"spaces (e.g. \"5 17 42\"), got {prompt[:40]!r}") from None
    elif chat:
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequestError(f"the tokenizer in {path} has no chat template; drop --chat to send the "
                                      "prompt as plain text")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template holds BOS itself
    else:
        ids = list(tokenizer(prompt)["input_ids"]) if prompt else []
    if not ids:
        raise InvalidRequestError("the prompt is empty")
    return ids


def format_stats(stats: Any) -> str:
    return (f"[moetandem] prompt {stats.prompt_tokens} tok | generated {stats.generated_tokens} tok | "
            f"prefill {stats.prefill_s:.3f} s | decode {stats.decode_tok_s:.1f} tok/s | "
            f"peak mem {format_bytes(stats.peak_memory_bytes)}")


def format_expert_stats(s: dict[str, float]) -> str:
    """Committee counters (cumulative since load) on one line."""
    looked_up = s.get("hits", 0) + s.get("misses", 0)
    hit_rate = s.get("hits", 0) / looked_up if looked_up else 0.0
    return (f"[moetandem] experts: hit rate {hit_rate:.2f} | misses {int(s.get('misses', 0))} (skip "
            f"{int(s.get('skips', 0))}, substitute {int(s.get('substitutions', 0))}, fetch {int(s.get('fetches', 0))}"
            f", host {int(s.get('host_computes', 0))}) | swaps {int(s.get('swaps', 0))} | moved "
            f"{format_bytes(int(s.get('bytes_moved', 0)))} | misses read {format_bytes(int(s.get('miss_bytes', 0)))}"
            f" | stall {s.get('stall_s', 0.0):.3f} s")


def format_split_stats(s: dict[str, float]) -> str:
    return (f"[moetandem] split: {int(s['cloud_forwards'])} forwards via the cloud, {int(s['local_forwards'])} on "
            f"the end | fallbacks {int(s['fallbacks'])}, link losses {int(s['link_losses'])}, rebuilt "
            f"{int(s['rebuilt_tokens'])} tok | link {s['bytes_sent'] / 1e3:.1f} kB up, {s['bytes_received'] / 1e3:.1f} "
            f"kB down in {int(s['exchanges'])} exchanges | RTT {s['rtt_s'] * 1e3:.2f} ms")


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
