"""Evaluate the API's CEL rules with cel-python, the way the API server evaluates x-kubernetes-validations.

Kubernetes >= 1.25 enforces these rules itself; older servers drop them. Evaluating the same expressions
here means one definition of each rule, enforced everywhere a spec is parsed.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import celpy

# cel-python (celpy, and its lark parser) is imported by the functions that evaluate with it, not here: parsing a
# spec imports this module for `failed_rules`, and every rule has a Python mirror (CelRule.check), so the
# operator never loads it (its import cost ~50 ms of CPU, on the first parse of a reconcile).


def _list_sum(values):
    import celpy

    total = celpy.celtypes.IntType(0)
    for v in values:
        total = total + v
    return total


# The parts of Kubernetes' CEL list library (k8s.io/apiserver/pkg/cel/library) that our rules use;
# cel-python has only the CEL standard library.
KUBERNETES_FUNCTIONS = {
    "sum": _list_sum,
    "min": lambda values: min(values),
    "max": lambda values: max(values),
    "isSorted": lambda values: _celtypes().BoolType(list(values) == sorted(values)),
}


def _celtypes():
    import celpy

    return celpy.celtypes


@functools.lru_cache(maxsize=1)
def _environment() -> celpy.Environment:
    # Building the CEL grammar's parser is the expensive part (seconds): once per process.
    import celpy

    return celpy.Environment()


@functools.lru_cache(maxsize=None)
def _program(rule: str):
    env = _environment()
    return env.program(env.compile(rule), functions=KUBERNETES_FUNCTIONS)


def evaluate(rule: str, self_value: Any, old_self: Any = None) -> bool:
    """True when `rule` holds for `self_value` (and `old_self`, for transition rules)."""
    import celpy

    activation = {"self": celpy.json_to_cel(self_value)}
    if old_self is not None:
        activation["oldSelf"] = celpy.json_to_cel(old_self)
    result = _program(rule).evaluate(activation)
    if isinstance(result, Exception):  # celpy returns evaluation errors (e.g. no such key) as values
        raise result
    return bool(result)


def compile_all(root: type) -> int:
    """Compile the CEL rules of `root` (api.common.ApiModel) and of all its imported subclasses now; return how
    many rules there are.

    Building cel-python's parser takes seconds of CPU and each rule's compilation milliseconds; both are cached
    per process (`_environment`, `_program`). The operator does not need it: every rule has a Python mirror
    (`CelRule.check`, tests/unit/api/test_cel_mirrors.py), so parsing never runs cel-python; the tests compile
    every rule the CRDs carry with it."""
    rules: set[str] = set()
    pending, seen = [root], set()
    while pending:
        cls = pending.pop()
        if cls in seen:
            continue
        seen.add(cls)
        rules.update(r.rule for r in getattr(cls, "cel_rules", ()) or ())
        pending.extend(cls.__subclasses__())
    for rule in sorted(rules):
        _program(rule)
    return len(rules)


def is_transition_rule(rule: str) -> bool:
    """True when `rule` mentions oldSelf: Kubernetes runs such rules on updates only."""
    return "oldSelf" in rule


def failed_rules(model_cls, wire_value: dict[str, Any], old_value: dict[str, Any] | None = None) -> list[str]:
    """Messages of the rules of `model_cls` that `wire_value` breaks.

    Transition rules (those that mention oldSelf) run only when an old value is given, as in Kubernetes.
    """
    failed = []
    for r in model_cls.cel_rules:
        if is_transition_rule(r.rule) and old_value is None:
            continue
        try:
            ok = r.check(wire_value) if r.check is not None else evaluate(r.rule, wire_value, old_value)
        except Exception as exc:  # noqa: BLE001 - a rule that cannot evaluate is a failed rule, with why
            detail = str(exc.args[0] if exc.args else exc)[:200]
            failed.append(f"{r.message} (rule {r.rule!r} could not be evaluated: {detail})")
            continue
        if not ok:
            failed.append(r.message)
    return failed
