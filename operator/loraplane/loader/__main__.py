"""`python -m loraplane.loader`: the adapter loader sidecar a ModelRoute's replicas run (docs/loader.md)."""

import sys

from loraplane.loader.cli import main

if __name__ == "__main__":
    sys.exit(main())
