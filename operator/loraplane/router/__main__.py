import sys

from loraplane.router.cli import main

sys.exit(main())
