"""`loraplane validate FILE...`: validate loraplane manifests exactly as the operator parses them (schema and
CEL rules), before they are applied."""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import ValidationError

from loraplane.api.redaction import redacted
from loraplane.api.validation import format_validation_error
from loraplane.cli.manifests import read_documents


def add_validate_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `loraplane validate`: the YAML files to check."""
    p.add_argument("files", nargs="+", type=Path, help="YAML files (multi-document allowed); - reads stdin")


def plain_http_uris(value: object, path: str) -> list[tuple[str, str]]:
    """(field path, value) of every string under `value` that is a plain http:// URI (wire names, Kubernetes'
    list notation)."""
    if isinstance(value, str):
        return [(path, value)] if value.lower().startswith("http://") else []
    if isinstance(value, dict):
        return [hit for k, v in value.items() for hit in plain_http_uris(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [hit for i, v in enumerate(value) for hit in plain_http_uris(v, f"{path}[{i}]")]
    return []


def validate_main(args: argparse.Namespace) -> int:
    """Validate every loraplane object in the files as the operator parses them, printing ok/error per
    document (other API groups are skipped; an unknown loraplane.io kind, unreadable YAML or a non-object
    document is an error) and a warning per public model name published twice among them; returns 1 when any
    is invalid or when there is no loraplane object at all, else 0."""
    from loraplane.api import GROUP, parse

    from loraplane.builders import route_warnings

    bad = 0
    parsed = []
    for d in read_documents(args.files):
        if d.skip:
            continue
        if d.error is not None:
            bad += 1
            print(f"error {d.where}\n  {d.error}")
            continue
        try:
            parsed.append(parse(d.doc))
            print(f"ok    {d.where}")
        except (ValidationError, ValueError) as exc:
            bad += 1
            detail = format_validation_error(exc, "  ") if isinstance(exc, ValidationError) else f"  {exc}"
            print(f"error {d.where}\n{detail}")
    if not bad and not parsed:
        print(f"error no {GROUP} object (FineTuneJob, Adapter, ModelRoute) in {', '.join(map(str, args.files))}")
        return 1
    # What the operator would report about the valid routes, resolved against the files' Adapters: a public name
    # published twice (served once, PublicNameConflict), a backend left out (missing here, or incompatible).
    for line in route_warnings(parsed):
        print(f"warn  {line}")
    for obj in parsed:
        for path, uri in plain_http_uris(obj.wire().get("spec") or {}, "spec"):
            print(f"warn  {obj.kind}/{obj.metadata.name}: {path} is plain http ({redacted(uri)}): refused at run time "
                  "(InsecureSource) unless the operator allows it (chart value operator.allowInsecureHttp); use https")
    return 1 if bad else 0
