"""`python -m moetandem.serve [MODEL] [--host --port ...]`: the same as `moetandem serve`."""
from __future__ import annotations

import argparse
import sys

from moetandem.errors import MoetandemError
from moetandem.serve.cli import add_serve_parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moetandem.serve")
    sub = parser.add_subparsers(dest="command")
    add_serve_parser(sub, prog="python -m moetandem.serve")
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.run(args))
    except MoetandemError as e:
        print(f"moetandem: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
