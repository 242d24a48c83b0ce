"""`loraplane render -f FILE`: the child manifests the operator would create, for GitOps reviews.

Not rendered: the two objects the operator creates once and never updates, which hold nothing of a spec (each
ModelRoute's engine key Secret, a random key, and the artifact store's PersistentVolumeClaim): docs/gitops.md
says so."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from loraplane.api.reasons import Reason
from loraplane.builders.settings import BuildSettings


def add_render_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `loraplane render`: the input files and the BuildSettings the operator would use."""
    d = BuildSettings()
    # The same spellings on validate, render and run (-f/--filename/--file, --values/--policy).
    p.add_argument("-f", "--filename", "--file", dest="files", action="append", type=Path, required=True,
                   help="YAML file with FineTuneJob/ModelRoute/Adapter manifests (repeatable; - for stdin)")
    p.add_argument("-n", "--namespace", default="default",
                   help="namespace of manifests that set none (default: default)")
    p.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml",
                   help="yaml: multi-document YAML (default); json: one kubectl-style v1 List")
    p.add_argument("--values", "--policy", dest="values", type=Path, metavar="VALUES",
                   help="the loraplane chart's values file the operator is installed with: render with its "
                        "childPods (pull secrets, security context, labels, node selection) and refuse what its "
                        "operator.policy refuses (reason PolicyViolation), as the operator does")
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


def settings_from_args(args: argparse.Namespace, values: dict | None = None) -> BuildSettings:
    """The BuildSettings the parsed render options describe; with chart `values`, also its childPods and
    operator.policy (cli.validate.settings_from_values; raises ValueError on bad values)."""
    from loraplane.builders.policy import SpecPolicy
    from loraplane.api.pods import PodSettings

    policy, child_pods = SpecPolicy(), PodSettings()
    if values is not None:
        from loraplane.cli.validate import settings_from_values

        chart = settings_from_values(values)
        policy, child_pods = chart.policy, chart.child_pods
    return BuildSettings(image=args.image, trainer_image=args.trainer_image,
                         engine_image=args.engine_image, artifact_store=args.artifact_store,
                         hpa_api_version=args.hpa_api_version, pdb_api_version=args.pdb_api_version,
                         pod_failure_policy=args.pod_failure_policy == "true",
                         allow_insecure_http=args.allow_insecure_http, policy=policy, child_pods=child_pods)


def render_main(args: argparse.Namespace) -> int:
    """Print the children of every loraplane object in the files as multi-document YAML; returns 1 (and
    prints nothing to stdout) when any object is invalid, else 0."""
    from loraplane.builders import render, route_warnings
    from loraplane.local.manifests import parse_document, read_documents
    from loraplane.builders.policy import unconditional_violations

    values = None
    if (values_file := getattr(args, "values", None)) is not None:
        try:
            values = yaml.safe_load(values_file.read_text())
            settings = settings_from_args(args, values)
        except (OSError, yaml.YAMLError, ValueError) as exc:
            print(f"error {values_file}: {exc}", file=sys.stderr)
            return 1
    else:
        settings = settings_from_args(args)
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
        obj, detail = parse_document(doc)
        if obj is None:
            bad += 1
            print(f"error {d.where}\n{detail}", file=sys.stderr)
            continue
        # Without --values: what no policy allows (a loosened security context, ...); with them, all its policy refuses.
        violations = settings.violations(obj) if values is not None else unconditional_violations(obj)
        if violations:
            bad += 1
            detail = "\n".join(f"  {v}" for v in violations)
            print(f"error {d.where} ({Reason.PolicyViolation})\n{detail}", file=sys.stderr)
            continue
        resources.append(obj)
    if bad:
        return 1
    # Rendered anyway (the operator serves every other name), but the reviewer should see it.
    for line in route_warnings(resources):
        print(f"warn  {line}", file=sys.stderr)
    manifests = render(resources, settings)
    sys.stdout.write(dump_manifests(manifests) if args.output == "yaml" else dump_json(manifests))
    return 0


def dump_json(manifests: list[dict]) -> str:
    """Manifests as one JSON `v1 List` (what `kubectl get -o json` prints for several objects), indented."""
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests}, indent=2) + "\n"


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (ConfigMap data: the serving table, the trainer config) as readable blocks, and every
    value written out where it is: the builders share one dict between fields (the engine's three probes have
    one httpGet), which PyYAML would print once as an anchor `&id001` and then as aliases `*id001`, a
    manifest a reviewer cannot read field by field and that tools without alias support refuse."""

    def ignore_aliases(self, data) -> bool:  # noqa: D102 - PyYAML hook
        return True


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def dump_manifests(manifests: list[dict]) -> str:
    """Manifests as multi-document YAML in their key order, multi-line strings as `|` blocks."""
    return yaml.dump_all(manifests, Dumper=_BlockDumper, sort_keys=False, default_flow_style=False, width=120)
