"""Which (state, reason) pairs the real loader can put in a replica report, read from the loader itself.

Tests that hand-write replica reports for the operator's status logic (tests/unit/controllers, the apiserver
tests) check each entry with `check_sendable`, so no test can drive the operator with a report the loader never
sends (issue 11: tests fed it `Incompatible / NoEffect`, while the loader reports `Failed / NoEffect`).

The pairs come from two places in loraplane.loader.reconciler: every literal `move(AdapterState.X, Reason.Y)`
call of its source (progress and waiting states), and its outcome table `OUTCOMES` (each failure reason: the state
it settles in, and Pending while it is being retried). `Unloading / NotDesired` is what `report()` adds for
adapters left the table.
"""

from __future__ import annotations

import ast
import inspect
from functools import cache

from loraplane.api.reasons import Reason
from loraplane.api.wire.serving import AdapterState


@cache
def literal_moves() -> frozenset[tuple[AdapterState, Reason]]:
    """(state, reason) of every `….move(AdapterState.X, Reason.Y, …)` call with literal arguments in the
    loader's control loop."""
    from loraplane.loader import reconciler

    pairs = set()
    for node in ast.walk(ast.parse(inspect.getsource(reconciler))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "move" \
                and len(node.args) >= 2:
            state, reason = node.args[:2]
            if isinstance(state, ast.Attribute) and isinstance(reason, ast.Attribute) \
                    and getattr(state.value, "id", "") == "AdapterState" and getattr(reason.value, "id", "") == "Reason":
                pairs.add((AdapterState[state.attr], Reason[reason.attr]))
    return frozenset(pairs)


@cache
def sendable() -> frozenset[tuple[AdapterState, Reason]]:
    """Every (state, reason) the loader can report for one adapter."""
    from loraplane.loader.reconciler import OUTCOMES

    pairs = set(literal_moves()) | {(AdapterState.Pending, Reason.Desired),
                                    (AdapterState.Unloading, Reason.NotDesired)}
    for reason, outcome in OUTCOMES.items():
        pairs.add((outcome.settles, reason))
        if outcome.retry:
            pairs.add((AdapterState.Pending, reason))
    return frozenset(pairs)


def check_sendable(state: str, reason: str) -> None:
    """Raise AssertionError when the real loader never reports `state` with `reason`."""
    pair = (AdapterState(state), Reason(reason))
    assert pair in sendable(), (f"the loader never reports {state}/{reason}; it reports "
                                f"{sorted(f'{s}/{r}' for s, r in sendable() if r == Reason(reason))} for {reason}")
