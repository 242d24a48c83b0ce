import sys

from loraplane.cli import main

sys.exit(main(["loader", *sys.argv[1:]]))
