"""Render charts/loraplane through the Helm v4 SDK (helm-python-sdk) and parse the manifests."""

from __future__ import annotations

from typing import Any

import yaml
from support.paths import ROOT

CHART = ROOT / "charts" / "loraplane"
RELEASE = "lp"
RELEASE_NAMESPACE = "loraplane-system"


def render(values: dict[str, Any] | None = None, namespace: str = RELEASE_NAMESPACE,
           name: str = RELEASE) -> dict[str, list[dict]]:
    """Template path -> the objects it renders (empty documents dropped), as `helm template` would."""
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        out = chart.render(values or {}, name=name, namespace=namespace, is_install=True)
    return {path: [d for d in yaml.safe_load_all(text) if d]
            for path, text in out.items() if not path.endswith("NOTES.txt")}


def objects(values: dict[str, Any] | None = None, **kw) -> list[dict]:
    return [obj for docs in render(values, **kw).values() for obj in docs]


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def notes(values: dict[str, Any] | None = None) -> str:
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        out = chart.render(values or {}, name=RELEASE, namespace=RELEASE_NAMESPACE, is_install=True)
    return next(text for path, text in out.items() if path.endswith("NOTES.txt"))


def rule_grants(rules: list[dict]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) triples a list of RBAC rules grants (resourceNames ignored: broader)."""
    return {(g, r, v) for rule in rules for g in rule.get("apiGroups", [])
            for r in rule.get("resources", []) for v in rule.get("verbs", [])}
