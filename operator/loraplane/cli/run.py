"""`loraplane run -f FILE`: run a file's FineTuneJob / Adapter / ModelRoute pipeline locally."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loraplane.cli import repo_root


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `loraplane run`: the pipeline file, a local base model, the work folder and prompts."""
    # The same spellings on validate, render and run (-f/--filename/--file).
    p.add_argument("-f", "--file", "--filename", dest="file", type=Path, default=repo_root() / "docs" / "examples" / "quickstart.yaml",
                   help="YAML with FineTuneJobs, Adapters, ModelRoutes (and ConfigMaps they reference); "
                        "default: docs/examples/quickstart.yaml")
    p.add_argument("--model", type=Path, metavar="DIR",
                   help="a local Hugging Face model directory to use as the base model (default: the embedded "
                        "tiny model for loraplane/tiny-llama)")
    p.add_argument("--workdir", type=Path, help="work folder (default: ~/.cache/loraplane/runs/<file name>); a "
                                                "second run reuses what the first built for the same spec; an "
                                                "edited spec trains a new run (own output, next Adapter version)")
    p.add_argument("--prompt", action="append", help="prompt to send to every public model (repeatable)")
    p.add_argument("--keep-serving", action="store_true", help="keep serving after the demo until Ctrl-C")


def run_main(args: argparse.Namespace) -> int:
    """Run the file's pipeline locally (local.pipeline.run); returns 2 for a missing file or a --model
    without config.json, 1 when a step fails, else the pipeline's status."""
    from loraplane.local.pipeline import RunError, run
    from loraplane.local.processes import ProcessFailed
    from loraplane.local.tinymodel import default_cache_dir

    if not args.file.is_file():
        print(f"error: -f {args.file}: no such file", file=sys.stderr)
        return 2
    if args.model and not (args.model / "config.json").is_file():
        print(f"error: --model {args.model}: not a Hugging Face model directory (no config.json)", file=sys.stderr)
        return 2
    workdir = args.workdir or default_cache_dir() / "runs" / args.file.stem
    try:
        return run(args.file, workdir, args.model, args.prompt, args.keep_serving)
    except (RunError, ProcessFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
