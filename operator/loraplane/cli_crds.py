"""`loraplane crds` and `loraplane validate`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from loraplane.cli import repo_root


def add_crds_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=repo_root() / "crds", help="output folder (default: crds/)")
    p.add_argument("--check", action="store_true", help="exit 1 if the files there are stale; write nothing")


def crds_main(args: argparse.Namespace) -> int:
    from loraplane.api import crdgen

    if args.check:
        stale = [name for name, crd in crdgen.all_crds().items()
                 if not (args.out / name).is_file() or (args.out / name).read_text() != crdgen.render(crd)]
        for name in stale:
            print(f"stale: {args.out / name} (run `loraplane crds`)", file=sys.stderr)
        return 1 if stale else 0
    for path in crdgen.write_crds(args.out):
        print(path)
    return 0


def add_validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", type=Path, help="YAML files (multi-document allowed)")


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem, naming the field by its wire path (spec.method.r), then the fix."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "tagged-union")))
        lines.append(f"{prefix}{loc or '<object>'}: {e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def validate_main(args: argparse.Namespace) -> int:
    from loraplane.api import KINDS, parse

    bad = 0
    for path in args.files:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if not doc or doc.get("kind") not in KINDS:
                continue
            where = f"{path}#{i} {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
            try:
                parse(doc)
                print(f"ok    {where}")
            except (ValidationError, ValueError) as exc:
                bad += 1
                detail = format_validation_error(exc, "  ") if isinstance(exc, ValidationError) else f"  {exc}"
                print(f"error {where}\n{detail}")
    return 1 if bad else 0
