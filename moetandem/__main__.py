"""`python -m moetandem ...` is the `moetandem` command."""
import sys

from moetandem.cli import main

if __name__ == "__main__":
    sys.exit(main())
