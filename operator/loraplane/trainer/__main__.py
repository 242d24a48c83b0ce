"""`python -m loraplane.trainer --config FILE`: the program a FineTuneJob's pod runs."""

import sys

from loraplane.trainer.cli import main

if __name__ == "__main__":
    sys.exit(main())
