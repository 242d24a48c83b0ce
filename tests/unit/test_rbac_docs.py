"""docs/operations.md's RBAC table is every rule of the chart's rbac.yaml, no more and no less: the table had
drifted (no secrets create, persistentvolumeclaims, networkpolicies, events list), so parse both and compare."""

from __future__ import annotations

import re

import yaml
from support.paths import ROOT

RBAC = ROOT / "charts" / "loraplane" / "templates" / "rbac.yaml"
DOC = ROOT / "docs" / "operations.md"


def chart_grants() -> set[tuple[str, str, str]]:
    """(API group, resource, verb) of every rule in rbac.yaml's rule templates (template lines dropped)."""
    rules = re.findall(r"^- apiGroups: (\[.*?\])\n\s+resources: (\[.*?\])\n\s+verbs: (\[.*?\])", RBAC.read_text(), re.M)
    assert len(rules) == RBAC.read_text().count("- apiGroups:"), "a rule of rbac.yaml is not in the expected form"
    grants = set()
    for groups, resources, verbs in rules:
        grants |= {(g, r, v) for g in yaml.safe_load(groups) for r in yaml.safe_load(resources)
                   for v in yaml.safe_load(verbs)}
    return grants


def doc_grants() -> set[tuple[str, str, str]]:
    """The same, from the table under `## RBAC` (group `core` is the core group, "")."""
    section = DOC.read_text().split("## RBAC", 1)[1].split("\n## ", 1)[0]
    grants = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or cells[0] in ("API group", "") or set(cells[0]) <= {"-"}:
            continue
        group = "" if cells[0] == "core" else cells[0].strip("`")
        grants |= {(group, r.strip(), v.strip()) for r in cells[1].split(",") for v in cells[2].split(",")}
    return grants


def test_the_rbac_table_of_the_docs_is_the_charts_rules():
    chart, doc = chart_grants(), doc_grants()
    assert len(chart) > 40
    assert chart - doc == set(), f"granted by the chart, missing from docs/operations.md: {sorted(chart - doc)}"
    assert doc - chart == set(), f"in docs/operations.md, not granted by the chart: {sorted(doc - chart)}"
