"""Every CEL rule of the generated CRDs evaluates, as Kubernetes evaluates it, on objects with optional fields absent.

The CRDs carry no defaults (codegen/crds.py: defaults live in the models), so an API server runs each rule on the
object exactly as the user wrote it: a rule that reads an optional field without `has()` fails with "no such key"
and the object is refused although it is valid (issue 13, item 10: `self.minReplicas <= self.maxReplicas` refused
every autoscaling block without minReplicas). The test server ignores CEL, so this test evaluates the rules' CEL
text itself with cel-python (loraplane.api.cel.evaluate, not the Python mirrors in CelRule.check).

For each CRD, each node that declares rules, and each optional field below that node: the node's sample value
with that one field removed must evaluate every rule of the node without an error (True or False both fine: a
rule may rightly refuse a missing field, e.g. "set exactly one of"). The all-optional-fields-absent value too.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest

from loraplane.api import cel
from loraplane.codegen.crds import all_crds

Path_ = tuple[str | int, ...]


def sample(schema: dict[str, Any], full: bool = True) -> Any:
    """A value of `schema`: every property (full) or only the required ones (recursively)."""
    if "enum" in schema:
        return schema["enum"][0]
    if schema.get("x-kubernetes-int-or-string"):
        return 1
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        required = set(schema.get("required") or [])
        return {name: sample(sub, full) for name, sub in props.items() if full or name in required}
    if kind == "array":
        return [sample(schema.get("items") or {}, full)]
    if kind == "string":
        return "x"
    if kind == "integer":
        return max(int(schema.get("minimum", 1)), 1)
    if kind == "number":
        return 1.5
    if kind == "boolean":
        return True
    return {}


def optional_paths(schema: dict[str, Any], path: Path_ = ()) -> Iterator[Path_]:
    """Paths (in a `sample(schema)` value) of every field not listed in its object's `required`."""
    if schema.get("type") == "array":
        yield from optional_paths(schema.get("items") or {}, (*path, 0))
        return
    required = set(schema.get("required") or [])
    for name, sub in (schema.get("properties") or {}).items():
        if name not in required:
            yield (*path, name)
        yield from optional_paths(sub, (*path, name))


def without(value: Any, path: Path_) -> Any:
    """A copy of `value` with the field at `path` removed."""
    out = copy.deepcopy(value)
    node = out
    for step in path[:-1]:
        node = node[step]
    del node[path[-1]]
    return out


def rule_nodes(schema: dict[str, Any], where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, node) of every schema node that declares x-kubernetes-validations."""
    if schema.get("x-kubernetes-validations"):
        yield where or "<root>", schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from rule_nodes(sub, f"{where}.{name}" if where else name)
    if isinstance(schema.get("items"), dict):
        yield from rule_nodes(schema["items"], f"{where}[]")


def cases() -> Iterator[Any]:
    for name, crd in sorted(all_crds().items()):
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for where, node in rule_nodes(schema):
            yield pytest.param(node, id=f"{crd['spec']['names']['kind']}:{where}")


@pytest.mark.parametrize("node", list(cases()))
def test_every_rule_evaluates_with_each_optional_field_absent(node):
    full = sample(node)
    variants = {"<all optional absent>": sample(node, full=False), "<all present>": full}
    for path in optional_paths(node):
        variants["/".join(map(str, path))] = without(full, path)
    errors = []
    for rule in node["x-kubernetes-validations"]:
        for absent, value in variants.items():
            # Transition rules run on updates only, with an old value at the same place.
            old = value if cel.is_transition_rule(rule["rule"]) else None
            try:
                cel.evaluate(rule["rule"], value, old)
            except Exception as exc:  # noqa: BLE001 - a rule error is what the API server refuses the object for
                errors.append(f"rule {rule['rule']!r} errors without {absent}: {exc}")
    assert not errors, "\n".join(errors) + "\nguard optional fields with has(self.FIELD)"


def test_the_walk_covers_the_known_optional_rule_fields():
    """The test above would be vacuous if it found no rules or no optional fields: it must see these."""
    ids = {p.id for p in cases()}
    assert "ModelRoute:spec.autoscaling" in ids and "ModelRoute:spec.routes[]" in ids
    route = all_crds()["loraplane.io_modelroutes.yaml"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    autoscaling = route["properties"]["spec"]["properties"]["autoscaling"]
    assert ("minReplicas",) in set(optional_paths(autoscaling))


def test_autoscaling_without_min_replicas_parses():
    """The model path evaluates the same CEL (ApiModel._check_cel_rules): omitting minReplicas is valid."""
    from loraplane.api.modelroute import AutoscalingSpec

    assert AutoscalingSpec.model_validate({"maxReplicas": 3}).min_replicas == 1
    with pytest.raises(ValueError, match="minReplicas must be <= "):
        AutoscalingSpec.model_validate({"minReplicas": 5, "maxReplicas": 3})


def test_compile_all_compiles_every_rule_the_crds_carry():
    """The operator compiles its CEL rules at start-up (cel.compile_all) so that the first reconciles do not pay
    for cel-python's parser; it must see every rule the generated CRDs carry, not only the kinds' own."""
    from loraplane.api.common import ApiModel

    in_crds: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            in_crds.update(r["rule"] for r in node.get("x-kubernetes-validations") or [])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(all_crds())
    evaluated = {r for r in in_crds if not cel.is_transition_rule(r)}  # field immutability is the server's
    assert evaluated
    cel._program.cache_clear()
    assert cel.compile_all(ApiModel) == len(evaluated)
    assert cel._program.cache_info().currsize == len(evaluated)
