"""Test helpers for the generated CRDs: evaluate their CEL rules offline, write them to a directory.

`validate_object` walks a CRD's structural schema as the API server does (the product evaluates the same rules
per model class with `loraplane.api.cel.failed_rules`); `write_crds` writes the CRD files `loraplane crds`
writes, without the reference docs or the chart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraplane.api.cel import evaluate, is_transition_rule
from loraplane.codegen.crds import all_crds, render


def validate_object(schema: dict[str, Any], value: Any, old: Any = None, path: str = "") -> list[str]:
    """Evaluate every x-kubernetes-validations rule in `schema` against `value`, as the API server does.

    Rules apply at the node that declares them; transition rules (oldSelf) only where an old value exists at
    the same path (for list items, only in list-type=map lists, matched by their keys, as in Kubernetes).
    Returns 'PATH: message' for each broken rule.
    """
    errors: list[str] = []
    for r in schema.get("x-kubernetes-validations", []):
        if is_transition_rule(r["rule"]) and old is None:
            continue
        try:
            ok = evaluate(r["rule"], value, old)
        except Exception as exc:  # noqa: BLE001
            ok = False
            r = {**r, "message": f"{r.get('message', r['rule'])} (could not be evaluated: {exc})"}
        if not ok:
            errors.append(f"{path or '<root>'}: {r.get('message') or 'failed rule ' + r['rule']}")
    if isinstance(value, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name in value:
                old_sub = old.get(name) if isinstance(old, dict) else None
                errors += validate_object(sub, value[name], old_sub, f"{path}.{name}" if path else name)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name, v in value.items():
                old_sub = old.get(name) if isinstance(old, dict) else None
                errors += validate_object(extra, v, old_sub, f"{path}[{name}]")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        keys = schema.get("x-kubernetes-list-map-keys") if schema.get("x-kubernetes-list-type") == "map" else None
        old_by_key = {}
        if keys and isinstance(old, list):
            old_by_key = {tuple(o.get(k) for k in keys): o for o in old if isinstance(o, dict)}
        for i, item in enumerate(value):
            old_item = old_by_key.get(tuple(item.get(k) for k in keys)) if keys and isinstance(item, dict) else None
            errors += validate_object(schema["items"], item, old_item, f"{path}[{i}]")
    return errors


def write_crds(out_dir: Path) -> list[Path]:
    """Write every kind's CRD into `out_dir` (created if missing), named as `loraplane crds` names them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, crd in all_crds().items():
        path = out_dir / name
        path.write_text(render(crd))
        written.append(path)
    return written
