"""Adapter reconcile: which ModelRoutes select it, whether it is compatible with each (from metadata), and
what the replicas' loaders report (loadedOn, and the loader's reason when it refused or failed)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import ValidationError

from loraplane.api.adapter import Adapter, AdapterStatus, LoadedOn
from loraplane.api.common import API_VERSION
from loraplane.api.modelroute import ModelRoute
from loraplane.builders.resolution import Verdict, check_compatibility, selector_matches
from loraplane.api.validation import format_validation_error
from loraplane.controllers.modelroute import pod_ready, replica_report
from loraplane.controllers.runtime import Key, dump_status, owned_status, status_patch, write_invalid

if TYPE_CHECKING:
    from loraplane.controllers.operator import Operator

API = API_VERSION
OWNED_STATUS = ("phase", "observedGeneration", "conditions", "version", "servedName", "routes", "loadedOn",
                "acceptedBaseModel")
FAILED_STATES = ("Failed", "Incompatible")


def selects(route: ModelRoute, adapter: Adapter) -> bool:
    name = adapter.metadata.name
    for r in route.spec.routes:
        if r.backends is not None and any(b.adapter == name for b in r.backends):
            return True
        if r.selector is not None and selector_matches(r.selector, adapter.metadata.labels):
            return True
    return False


def adapter_status(adapter: Adapter, routes: list[ModelRoute], pods_by_route: dict[str, list[dict]],
                   previous: AdapterStatus, generation: int | None, rejection: Verdict | None) -> AdapterStatus:
    """Aggregate (pure): routes, compatibility, loadedOn, phase and the Compatible/Ready conditions."""
    new = previous.model_copy(deep=True)
    new.observed_generation = generation
    new.version = adapter.spec.version
    served = adapter.served_name()
    new.served_name = served
    if new.accepted_base_model is None:
        new.accepted_base_model = adapter.spec.base_model
    selecting = sorted((r for r in routes if selects(r, adapter)), key=lambda r: r.metadata.name or "")
    new.routes = [r.metadata.name or "" for r in selecting]
    verdicts = {r.metadata.name: check_compatibility(adapter, r) for r in selecting}
    compatible = [r for r in selecting if verdicts[r.metadata.name].compatible]
    loaded: list[LoadedOn] = []
    loader_problems: list[tuple[str, str, str]] = []
    previous_since = {(lo.route, lo.replica): lo.since for lo in previous.loaded_on}
    for r in compatible:
        for pod in pods_by_route.get(r.metadata.name or "", []):
            report = replica_report(pod)
            entry = report.adapters.get(served) if report else None
            if entry is None:
                continue
            pod_name = pod["metadata"]["name"]
            if entry.state == "Ready" and pod_ready(pod):
                loaded.append(LoadedOn(route=r.metadata.name or "", replica=pod_name, served_name=served,
                                       since=previous_since.get((r.metadata.name or "", pod_name), entry.since)))
            elif entry.state in FAILED_STATES:
                loader_problems.append((entry.state, entry.reason, f"replica {pod_name}: {entry.message}"))
    new.loaded_on = sorted(loaded, key=lambda lo: (lo.route, lo.replica))
    g = generation
    if rejection is not None:
        new.phase = "Failed"
        new.set_condition("Ready", False, rejection.reason, rejection.message, g)
        return new
    if not selecting:
        new.phase = "Pending"
        new.set_condition("Compatible", "Unknown", "NoRoute", "no ModelRoute selects this adapter", g)
        new.set_condition("Ready", False, "NoRoute", "no ModelRoute in this namespace selects this adapter; "
                                                      "reference it in a route's backends or match a selector", g)
        return new
    if not compatible:
        first = verdicts[selecting[0].metadata.name]
        new.phase = "Incompatible"
        message = "; ".join(v.message for v in verdicts.values())
        new.set_condition("Compatible", False, first.reason, message, g)
        new.set_condition("Ready", False, first.reason, message, g)
        return new
    incompatible = [v.message for v in verdicts.values() if not v.compatible]
    new.set_condition("Compatible", True, "Compatible",
                      f"compatible with {', '.join(r.metadata.name or '' for r in compatible)}"
                      + (f"; not with: {'; '.join(incompatible)}" if incompatible else ""), g)
    if loaded:
        new.phase = "Ready"
        new.set_condition("Ready", True, "Loaded", f"served as {served} by {len(loaded)} replica(s)", g)
    elif loader_problems:
        state, reason, message = loader_problems[0]
        new.phase = "Incompatible" if state == "Incompatible" else "Failed"
        new.set_condition("Ready", False, reason, message, g)
    else:
        new.phase = "Loading"
        new.set_condition("Ready", False, "Loading",
                          f"waiting for the replicas of {', '.join(r.metadata.name or '' for r in compatible)} "
                          f"to load {served}", g)
    return new


async def reconcile(op: "Operator", key: Key) -> None:
    body = op.adapters.get(key)
    if body is None:
        op.adapter_rejections.pop(key, None)
        return
    adapter = op.adapters.parsed(key, Adapter)
    generation = body["metadata"].get("generation")
    current = body.get("status") or {}
    ns, name = key
    if isinstance(adapter, ValidationError):
        message = format_validation_error(adapter, "spec field ")
        if op.adapter_rejections.get(key) != Verdict(False, "InvalidSpec", message):
            op.adapter_rejections[key] = Verdict(False, "InvalidSpec", message)
            op.schedule_routes(ns)
        await write_invalid(op, body, current, generation, message)
        return
    previous = owned_status(AdapterStatus, current, OWNED_STATUS)
    rejection = None
    accepted = previous.accepted_base_model
    if accepted is not None and accepted != adapter.spec.base_model:
        rejection = Verdict(False, "SpecImmutable",
                            f"spec.baseModel cannot change from {accepted.name}@{accepted.revision or '-'} to "
                            f"{adapter.spec.base_model.name}@{adapter.spec.base_model.revision or '-'} "
                            "(immutable); revert it or create a new Adapter. Not served until then.")
    if op.adapter_rejections.get(key) != rejection:
        if rejection is None:
            op.adapter_rejections.pop(key, None)
        else:
            op.adapter_rejections[key] = rejection
        op.schedule_routes(ns)
    routes = [r for r in (op.routes.parsed(k, ModelRoute) for k in list(op.routes.objects) if k[0] == ns)
              if isinstance(r, ModelRoute)]
    pods_by_route = {r.metadata.name or "": op.engine_pods.group(ns, r.metadata.name or "") for r in routes}
    new = adapter_status(adapter, routes, pods_by_route, previous, generation, rejection)
    patch = status_patch(current, dump_status(new), OWNED_STATUS)
    if patch:
        await op.kube.patch_status(API, "Adapter", ns, name, patch)
    old_phase = current.get("phase")
    if old_phase != new.phase and (old_phase is not None or new.phase not in ("Pending", "Loading")):
        ready = new.condition("Ready")
        warn = new.phase in ("Incompatible", "Failed")
        await op.events.post(body, "Warning" if warn else "Normal", ready.reason if ready else new.phase,
                             ready.message if ready else "")
