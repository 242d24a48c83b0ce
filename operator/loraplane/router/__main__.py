"""`python -m loraplane.router`: the OpenAI-compatible router a ModelRoute runs (docs/router.md)."""

import sys

from loraplane.router.cli import main

if __name__ == "__main__":
    sys.exit(main())
