"""The parts of the Helm chart `charts/loraplane` generated from the API models: its CRD templates.

Helm installs a chart's `crds/` folder once and never upgrades it, so the chart templates its CRDs instead:
each one behind `crds.enabled` (clusters where a platform team installs CRDs separately turn it off) and
annotated `helm.sh/resource-policy: keep`, so `helm upgrade` updates the schema while `helm uninstall`
leaves the CRDs, and with them every FineTuneJob, Adapter and ModelRoute, in place.

`loraplane crds` writes these files with the plain CRDs and `loraplane crds --check` fails when they are stale.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from loraplane.codegen import crds as crdgen

TEMPLATE_HEADER = ("{{- /* Generated from operator/loraplane/api by `loraplane crds`. Do not edit by hand. */ -}}\n"
                   "{{- if .Values.crds.enabled }}\n")


def _escape(text: str) -> str:
    """Model text (descriptions, CEL rules) is data, not template: `{{` must reach the output literally."""
    return text.replace("{{", '{{ "{{" }}')


def crd_template(crd: dict) -> str:
    """One CRD as a chart template: the generated CRD plus the chart's labels and the keep policy."""
    meta = dict(crd["metadata"])
    name_part = yaml.safe_dump({"name": meta["name"]}, sort_keys=False).strip()
    body = {k: v for k, v in crd.items() if k != "metadata"}
    api_kind = yaml.safe_dump({"apiVersion": body.pop("apiVersion"), "kind": body.pop("kind")}, sort_keys=False)
    extra_labels = {k: v for k, v in (meta.get("labels") or {}).items()
                    if k != "app.kubernetes.io/part-of"}  # the chart's labels include part-of already
    label_lines = "".join(f"    {line}\n" for line in
                          yaml.safe_dump(extra_labels, sort_keys=False).splitlines()) if extra_labels else ""
    return (TEMPLATE_HEADER
            + _escape(api_kind)
            + "metadata:\n"
            + f"  {_escape(name_part)}\n"
            + "  labels:\n"
            + '    {{- include "loraplane.labels" . | nindent 4 }}\n'
            + label_lines
            + "  annotations:\n"
            + "    # Upgrades update the schema; `helm uninstall` keeps the CRDs and every object of these kinds.\n"
            + "    helm.sh/resource-policy: keep\n"
            + _escape(yaml.safe_dump(body, sort_keys=False, width=120))
            + "{{- end }}\n")


def crd_template_files(chart_dir: Path) -> dict[Path, str]:
    """templates/crd-<plural>.yaml for every kind, with its expected content."""
    return {chart_dir / "templates" / f"crd-{crd['spec']['names']['plural']}.yaml": crd_template(crd)
            for crd in crdgen.all_crds().values()}
