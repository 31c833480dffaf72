"""`python -m moetandem.serve [MODEL] [--host --port ...]`: the same as `moetandem serve`."""
from __future__ import annotations

import argparse
import sys

from moetandem.cli import run
from moetandem.cli.serve import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moetandem.serve")
    register(parser.add_subparsers(dest="command"), prog="python -m moetandem.serve")
    return run(parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
