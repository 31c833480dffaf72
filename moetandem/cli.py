"""The `moetandem` command line: `moetandem generate | calibrate | plan`.

Every MoetandemError becomes one line `moetandem: error: <message>` on stderr and exit code 2; Ctrl-C exits 130."""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import moetandem
from moetandem import assets
from moetandem.checkpoint import Checkpoint
from moetandem.engine import Engine, GenerationStats
from moetandem.errors import InvalidRequestError, MoetandemError
from moetandem.analysis.commands import add_eval_parser, add_trace_parser
from moetandem.serve.cli import add_serve_parser
from moetandem.gating.commands import add_profile_parser
from moetandem.experts.commands import add_calibrate_parser, add_committee_args, add_plan_parser, committee_kwargs
from moetandem.split.commands import add_cloud_parser, add_split_args, format_split_stats, split_kwargs
from moetandem.streaming import TextStream

EXIT_USER_ERROR = 2
DEMO_PROMPT = "The king said"
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: argparse has already printed
        return e.code if isinstance(e.code, int) else EXIT_USER_ERROR
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    try:
        return int(args.run(args))
    except MoetandemError as e:
        sys.stdout.flush()
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"moetandem: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout closed early, e.g. `moetandem generate ... | head`
        _silence_stdout()
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moetandem", description=moetandem.__doc__)
    parser.add_argument("--version", action="version", version=f"moetandem {moetandem.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate text from a prompt, streamed to stdout",
                         description="Generate from a prompt and stream the text to stdout; stats go to stderr.")
    gen.add_argument("--model", metavar="PATH",
                     help="Hugging Face checkpoint directory (default: the shipped demo MoE)")
    gen.add_argument("--prompt", default=DEMO_PROMPT, metavar="TEXT",
                     help=f"prompt text; token ids separated by spaces when the checkpoint has no tokenizer "
                          f"(default: {DEMO_PROMPT!r})")
    gen.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate (default 64)")
    add_device_args(gen)
    gen.add_argument("--temperature", type=_finite_float, default=0.0, metavar="T", help="0 = greedy (default)")
    gen.add_argument("--top-p", type=_finite_float, default=1.0, metavar="P", help="nucleus sampling mass (default 1)")
    gen.add_argument("--seed", type=int, default=None, metavar="S", help="seed for reproducible sampling")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    add_committee_args(gen)
    add_split_args(gen)  # --cloud HOST:PORT --token-file F ... (split execution)
    gen.set_defaults(run=generate_command)
    add_calibrate_parser(sub, add_device_args)
    add_plan_parser(sub, add_device_args)
    add_eval_parser(sub, add_device_args)
    add_trace_parser(sub, add_device_args)
    add_serve_parser(sub, add_device_args)
    add_profile_parser(sub, add_device_args)
    add_cloud_parser(sub, add_device_args)
    return parser


def add_device_args(p: argparse.ArgumentParser) -> None:
    """--device / --dtype, shared by every command that loads a model."""
    p.add_argument("--device", type=_device, default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (default: bfloat16 on GPU, float32 on CPU)")


def generate_command(args: argparse.Namespace) -> int:
    path = Path(args.model) if args.model else assets.demo_model_path()
    tokenizer = Checkpoint(path).tokenizer()  # prompt problems surface before the weights are loaded
    prompt_ids = encode_prompt(tokenizer, args.prompt, args.chat, path)
    engine = Engine.from_pretrained(path, device=args.device, dtype=args.dtype, progress=True,
                                    **committee_kwargs(args), **split_kwargs(args))
    out = sys.stdout
    if hasattr(out, "reconfigure"):
        out.reconfigure(errors="replace")  # a terminal that cannot show a character must not end the run
    stream = TextStream(tokenizer, prompt_ids) if tokenizer is not None else None
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
    if getattr(engine, "split", None) is not None:
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


def format_stats(stats: GenerationStats) -> str:
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
            f"{format_bytes(int(s.get('bytes_moved', 0)))} | stall {s.get('stall_s', 0.0):.3f} s")


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not one of auto, cpu, cuda, cuda:N")
    return text


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not complain about the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
