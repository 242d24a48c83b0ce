"""`python -m loraplane.cli`: the same as the `loraplane` command."""

import sys

from loraplane.cli import main

if __name__ == "__main__":
    sys.exit(main())
