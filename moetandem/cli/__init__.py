"""The `moetandem` command line. Each subcommand lives in its own module of this package and registers itself;
heavy imports (torch, the model) happen inside the commands, so a bad flag is reported at once.

Every MoetandemError becomes one line `moetandem: error: <message>` on stderr and exit code 2; Ctrl-C exits 130."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from moetandem.errors import MoetandemError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
#: subcommand modules, in the order `moetandem --help` lists them; each has register(subparsers)
COMMANDS = ("generate", "serve", "eval", "trace", "calibrate", "plan", "profile", "cloud")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: argparse has already printed
        return e.code if isinstance(e.code, int) else EXIT_USER_ERROR
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Run a parsed subcommand with the CLI's error handling."""
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
    from moetandem import __doc__ as doc, __version__
    parser = argparse.ArgumentParser(prog="moetandem", description=doc)
    parser.add_argument("--version", action="version", version=f"moetandem {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"moetandem.cli.{name}").register(sub)
    return parser


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not complain about the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
