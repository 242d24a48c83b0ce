"""`loraplane validate FILE...`: validate loraplane manifests exactly as the operator parses them (schema and
CEL rules), before they are applied."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml
from pydantic import ValidationError

from loraplane.api.validation import format_validation_error


def add_validate_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `loraplane validate`: the YAML files to check."""
    p.add_argument("files", nargs="+", type=Path, help="YAML files (multi-document allowed)")


def validate_main(args: argparse.Namespace) -> int:
    """Validate every loraplane object in the files as the operator parses them, printing ok/error per
    document (other kinds are skipped) and a warning per public model name published twice among them; returns
    1 when any is invalid, else 0."""
    from loraplane.api import KINDS, parse

    from loraplane.builders import public_name_conflicts

    bad = 0
    parsed = []
    for path in args.files:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if not doc or doc.get("kind") not in KINDS:
                continue
            where = f"{path}#{i} {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
            try:
                parsed.append(parse(doc))
                print(f"ok    {where}")
            except (ValidationError, ValueError) as exc:
                bad += 1
                detail = format_validation_error(exc, "  ") if isinstance(exc, ValidationError) else f"  {exc}"
                print(f"error {where}\n{detail}")
    # Valid objects that together publish one public name twice: the operator serves it once (explicit routes
    # win over selectors, earlier routes over later) and reports PublicNameConflict; say so before applying.
    for line in public_name_conflicts(parsed):
        print(f"warn  {line}")
    return 1 if bad else 0
