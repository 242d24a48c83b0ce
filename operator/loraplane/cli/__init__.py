"""`loraplane` command line. Each subcommand lives in its own module and is imported only when used,
so `loraplane crds` does not import torch and `loraplane router` does not import kopf."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# name -> (module, one-line help). The module defines `add_<name>_arguments(parser)` and `<name>_main(args) -> int`
# (a "-" in the name becomes "_").
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "crds": ("loraplane.cli.crds", "write (or --check) the CRD manifests generated from the API models"),
    "validate": ("loraplane.cli.validate", "validate loraplane manifests in files, as the operator would"),
    "loader": ("loraplane.loader.cli", "adapter loader sidecar of a vLLM replica (docs/loader.md)"),
    "fetch-model": ("loraplane.loader.fetch_model", "fetch an s3:// or https:// base model onto a replica's volume"),
    "operator": ("loraplane.cli.operator", "run the operator (kopf) that reconciles the loraplane kinds"),
    "render": ("loraplane.cli.render", "print the child manifests the operator would create for a file's CRs"),
    "run": ("loraplane.cli.run", "run a file's FineTuneJob -> Adapter -> ModelRoute pipeline locally (quickstart)"),
    "router": ("loraplane.router.cli", "run the OpenAI-compatible router of a ModelRoute (docs/router.md)"),
    "train": ("loraplane.trainer.cli", "fine-tune a LoRA/QLoRA adapter from a FineTuneJob file (docs/trainer.md)"),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `loraplane`: parse `argv` (default sys.argv[1:]) and run the chosen subcommand's
    `<name>_main(args)`; returns its exit status, 2 (with help) when no subcommand is given."""
    argv = sys.argv[1:] if argv is None else argv
    from loraplane import __version__

    parser = argparse.ArgumentParser(prog="loraplane", description="LoRA fine-tuning and serving on Kubernetes.")
    # The one version of a release (loraplane/__init__.py): the package, the chart and the image tags carry it.
    parser.add_argument("--version", action="version", version=f"loraplane {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # Only the chosen subcommand's module is imported to build its arguments.
        if argv and argv[0] == name:
            getattr(importlib.import_module(module), f"add_{name.replace('-', '_')}_arguments")(p)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    return int(getattr(importlib.import_module(args._module), f"{args.command.replace('-', '_')}_main")(args) or 0)


def repo_root() -> Path:
    """The checkout root when running from source (where crds/ and docs/ live)."""
    return Path(__file__).resolve().parents[3]

