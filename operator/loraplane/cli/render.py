"""`loraplane render -f FILE`: the exact child manifests the operator would create, for GitOps reviews."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from loraplane.builders.settings import BuildSettings


def add_render_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `loraplane render`: the input files and the BuildSettings the operator would use."""
    d = BuildSettings()
    p.add_argument("-f", "--filename", dest="files", action="append", type=Path, required=True,
                   help="YAML file with FineTuneJob/ModelRoute/Adapter manifests (repeatable; - for stdin)")
    p.add_argument("--namespace", default="default", help="namespace of manifests that set none (default: default)")
    p.add_argument("--image", default=d.image, help=f"loraplane image (loader, router, trainer) [{d.image}]")
    p.add_argument("--trainer-image", default=None, help="trainer image (default: --image)")
    p.add_argument("--engine-image", default=d.engine_image,
                   help=f"vLLM image of ModelRoutes without spec.engine.image [{d.engine_image}]")
    p.add_argument("--artifact-store", default=d.artifact_store,
                   help=f"where jobs without spec.output.uri write adapters [{d.artifact_store}]")
    p.add_argument("--hpa-api-version", default=d.hpa_api_version,
                   help="autoscaling/v2 (Kubernetes >= 1.23) or autoscaling/v2beta2")
    p.add_argument("--pdb-api-version", default=d.pdb_api_version,
                   help="policy/v1 (Kubernetes >= 1.21) or policy/v1beta1")
    p.add_argument("--pod-failure-policy", choices=("true", "false"), default="true",
                   help="give training Jobs a podFailurePolicy (Kubernetes >= 1.26) [true]")
    p.add_argument("--allow-insecure-http", action="store_true",
                   help="let loaders, fetch-model and trainers fetch plain http:// and loopback sources")


def settings_from_args(args: argparse.Namespace) -> BuildSettings:
    """The BuildSettings the parsed render options describe."""
    return BuildSettings(image=args.image, trainer_image=args.trainer_image,
                         engine_image=args.engine_image, artifact_store=args.artifact_store,
                         hpa_api_version=args.hpa_api_version, pdb_api_version=args.pdb_api_version,
                         pod_failure_policy=args.pod_failure_policy == "true",
                         allow_insecure_http=args.allow_insecure_http)


def render_main(args: argparse.Namespace) -> int:
    """Print the children of every loraplane object in the files as multi-document YAML; returns 1 (and
    prints nothing to stdout) when any object is invalid, else 0."""
    from loraplane.api import parse
    from loraplane.builders import render, route_warnings
    from loraplane.cli.manifests import read_documents
    from loraplane.api.validation import format_validation_error

    resources, bad = [], 0
    for d in read_documents(args.files):
        if d.skip:
            continue
        if d.error is not None:
            bad += 1
            print(f"error {d.where}\n  {d.error}", file=sys.stderr)
            continue
        doc = d.doc
        if isinstance(meta := doc.setdefault("metadata", {}), dict):  # not a mapping: parse() names the field
            meta.setdefault("namespace", args.namespace)
        try:
            resources.append(parse(doc))
        except (ValidationError, ValueError) as exc:
            bad += 1
            detail = format_validation_error(exc, "  ") if isinstance(exc, ValidationError) else f"  {exc}"
            print(f"error {d.where}\n{detail}", file=sys.stderr)
    if bad:
        return 1
    # Rendered anyway (the operator serves every other name), but the reviewer should see it.
    for line in route_warnings(resources):
        print(f"warn  {line}", file=sys.stderr)
    manifests = render(resources, settings_from_args(args))
    sys.stdout.write(dump_manifests(manifests))
    return 0


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (ConfigMap data: the serving table, the trainer config) as readable blocks."""


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def dump_manifests(manifests: list[dict]) -> str:
    """Manifests as multi-document YAML in their key order, multi-line strings as `|` blocks."""
    return yaml.dump_all(manifests, Dumper=_BlockDumper, sort_keys=False, default_flow_style=False, width=120)
