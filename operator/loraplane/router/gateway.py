"""Gateway mode (`loraplane router --gateway`, issue 15): one OpenAI-compatible endpoint across the ModelRoutes
of a namespace.

The gateway watches the ModelRoutes of its namespace (optionally a label selector), read-only, and serves one
routing table in which every public name of every selected route (`status.models[].name` and
`status.contentModels[].name`: what the operator resolved) is an external model forwarded to that route's router
(router/forward.py): body unchanged, the client's own Authorization, every end-to-end client header. The route's
router then does its own weights, adapter-aware replica choice and metrics; the gateway counts each name under
backend `route:<route>`.

- URL: `api.orchestration.router_url(route, namespace)`, from the route's name and the watched namespace only
  (never a status field: a pod-writable endpoint could otherwise redirect clients' keys).
- Ownership: `api.orchestration.public_name_owners`: the oldest route owns a name; only the conflicting name of
  a later route is left out (logged; the operator puts the PublicNameConflict condition on that route), never
  the route's other names.
- The table's source is this watch: `watch_gateway_table` yields `TableRead`s as the ConfigMap watch does, so the
  router applies it the same way (RouterService.apply_read); a new table only when the forwarded names or the
  routes' limits change (status updates of replicas or conditions change nothing).
- Limits: the largest spec.router.timeoutSeconds and maxRequestBytes of the routes (`route_limits`; the body
  limit at most GATEWAY_MAX_REQUEST_BYTES), so the gateway never cuts what a route's own router allows.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Iterable

from loraplane.api.common import API_VERSION
from loraplane.api.orchestration import ExternalModel, is_route_name, public_name_owners, publication, router_url
from loraplane.api.wire.serving import RouterSettings, ServingTable
from loraplane.kube.client import ApiError, KubeClient
from loraplane.kube.informer import Informer, Source, Store, key_of
from loraplane.kube.tablewatch import BACKOFF_FIRST, BACKOFF_MAX, TableRead

log = logging.getLogger("loraplane.router")

# The largest request body the gateway takes for any route (a route's spec.router.maxRequestBytes has no upper
# bound; the gateway buffers each body before forwarding it).
GATEWAY_MAX_REQUEST_BYTES = 64 << 20
_DEFAULT_ROUTER = RouterSettings()
GATEWAY_ROUTE = "gateway"   # the synthesised table's `route` (its /v1/models entries name their own routes)
# --route-selector: equality terms only (key=value,...): a label key (optional DNS prefix) and a label value.
_SELECTOR_TERM = re.compile(r"^((?:[a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)="
                            r"(([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?)$")


def parse_route_selector(text: str) -> str:
    """`--route-selector k=v[,k=v...]` checked and normalised (the label selector sent to the API server).
    Raises ValueError naming the bad term: only equality terms of valid label keys and values."""
    terms = [t.strip() for t in text.split(",")]
    for t in terms:
        m = _SELECTOR_TERM.match(t)
        if m is None or len(m.group(1).rsplit("/", 1)[-1]) > 63 or len(m.group(4)) > 63:
            raise ValueError(f"--route-selector: {t[:100]!r} is not key=value with a label key and value "
                             "(e.g. team=search,tier=prod)")
    return ",".join(terms)


def route_names(obj: dict) -> tuple[str, str, list[str]] | None:
    """(route name, creationTimestamp, its public names) of a ModelRoute object as the API returns it, or None
    when it cannot be served (a name that is not a route name). The names are status.models[].name then
    status.contentModels[].name, each a public model name (others skipped: status is read, not trusted), each once:
    what the operator reads of it too (api.orchestration.publication)."""
    if not is_route_name((obj.get("metadata") or {}).get("name")):
        return None
    pub = publication(obj)
    return pub.route, pub.created, list(dict.fromkeys(pub.names()))


def route_limits(obj: dict) -> tuple[float, int]:
    """(spec.router.timeoutSeconds, spec.router.maxRequestBytes) of a ModelRoute object as stored, each within
    the API's bounds (the default where unset or of another shape), the body limit at most
    GATEWAY_MAX_REQUEST_BYTES: the gateway relays a route's long streams and large bodies as its router would,
    but no route can make the gateway hold more than that per request."""
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    router = spec.get("router") if isinstance(spec.get("router"), dict) else {}
    timeout, size = router.get("timeoutSeconds"), router.get("maxRequestBytes")
    timeout = timeout if type(timeout) is int and 1 <= timeout <= 86400 else _DEFAULT_ROUTER.timeout_seconds
    size = size if type(size) is int and size >= 1024 else _DEFAULT_ROUTER.max_request_bytes
    return timeout, min(size, GATEWAY_MAX_REQUEST_BYTES)


def synthesize_table(objects: Iterable[dict], namespace: str, generation: int = 0
                     ) -> tuple[ServingTable, dict[str, list[tuple[str, str]]]]:
    """The gateway's table for the ModelRoute objects of `namespace`: every public name of every route as an
    external model to `router_url(route, namespace)`, owned by `public_name_owners` (the oldest route), with the
    largest timeout and body limit of those routes (`route_limits`). Returns (table, conflicts: later route ->
    [(name left out, owning route)]). Pure."""
    read = [(names, route_limits(o)) for o in objects if (names := route_names(o)) is not None]
    return table_of_routes([n for n, _ in read], namespace, generation, [lim for _, lim in read])


def table_of_routes(routes: list[tuple[str, str, list[str]]], namespace: str, generation: int = 0,
                    limits: list[tuple[float, int]] = ()) -> tuple[ServingTable, dict[str, list[tuple[str, str]]]]:
    """`synthesize_table` on routes already read by `route_names` (and their `route_limits`)."""
    owners, conflicts = public_name_owners(routes)
    router = RouterSettings(timeout_seconds=max((t for t, _ in limits), default=_DEFAULT_ROUTER.timeout_seconds),
                            max_request_bytes=max((b for _, b in limits), default=_DEFAULT_ROUTER.max_request_bytes))
    order = {name: i for i, (name, _, _) in enumerate(sorted(routes, key=lambda r: (r[1], r[0])))}
    external = [ExternalModel(name=n, route=owner, url=router_url(owner, namespace))
                for n, owner in sorted(owners.items(), key=lambda kv: (order[kv[1]], kv[0]))]
    table = ServingTable(route=GATEWAY_ROUTE, namespace=namespace, generation=generation, base_model="",
                         served_model_name="", max_lora_rank=0, max_loras=0, external_models=external,
                         router=router)
    return table, conflicts


async def watch_gateway_table(kube: KubeClient, namespace: str, selector: str | None = None
                              ) -> AsyncIterator[TableRead]:
    """Yield the gateway's table for the ModelRoutes of `namespace` (label `selector`, if any) now and whenever
    the forwarded names change. LIST (retried with BACKOFF_FIRST doubling to BACKOFF_MAX seconds; an API error,
    e.g. 403 without the gateway's Role, is yielded as a read with the problem), then the kube Informer's WATCH
    (resumes from the last resourceVersion, LISTs again after 410 Gone). Needs get/list/watch on
    modelroutes.loraplane.io in `namespace` only. Public-name conflicts are logged when they change."""
    origin = f"ModelRoutes in namespace {namespace}" + (f" selected by {selector}" if selector else "")
    store = Store()
    changed = asyncio.Event()
    # Each stored route's `route_names`, kept up to date per event: an event (most are status updates of one
    # route's replicas or conditions) costs reading that route only, and the table is rebuilt only when some
    # route's names changed. Rebuilding from every route on every event cost ~0.35 s per event at 50,000 names.
    namings: dict[tuple[str, str], tuple[tuple[str, str, list[str]], tuple[float, int]] | None] = {}

    def read(obj: dict):
        names = route_names(obj)
        return None if names is None else (names, route_limits(obj))

    def on_change(_source: str, obj: dict, _old: dict | None) -> None:
        key = key_of(obj)
        if key in store.objects:
            naming = read(obj)
            if key in namings and namings[key] == naming:
                return   # e.g. a status update of its replicas: same names, same table
            namings[key] = naming
        elif namings.pop(key, None) is None:
            return       # deleted, and it served no name
        changed.set()

    informer = Informer(kube, Source("modelroutes", API_VERSION, "ModelRoute", selector), store,
                        on_change, namespaces=(namespace,))
    backoff = BACKOFF_FIRST
    while True:
        try:
            await informer.relist(namespace)
            break
        except ApiError as exc:
            yield TableRead(origin, problem=f"cannot be listed: HTTP {exc.status} {exc.message} (the gateway needs "
                                            f"get/list/watch on modelroutes.loraplane.io in {namespace})")
        except Exception as exc:  # noqa: BLE001 - API server restarts, network: retry
            log.warning("listing %s failed (%s); retrying in %.0f s", origin, exc, backoff)
        await asyncio.sleep(backoff)
        backoff = min(BACKOFF_MAX, backoff * 2)
    namings.update((key, read(obj)) for key, obj in store.objects.items())
    informer.active = True
    task = asyncio.create_task(informer.run(namespace))
    last_names: tuple | None = None
    last_conflicts: dict | None = None
    generation = 0
    try:
        while True:
            changed.clear()
            read_routes = [n for n in namings.values() if n is not None]
            table, conflicts = table_of_routes([n for n, _ in read_routes], namespace, generation + 1,
                                               [lim for _, lim in read_routes])
            if conflicts != last_conflicts:
                for route, names in sorted(conflicts.items()):
                    for name, owner in names:
                        log.warning("public model %r of ModelRoute %s/%s is left out: the older route %s "
                                    "publishes it (condition PublicNameConflict on %s)", name, namespace, route,
                                    owner, route)
                last_conflicts = conflicts
            if (table.external_models, table.router) != last_names:
                last_names = (table.external_models, table.router)
                generation += 1
                yield TableRead(origin, text=table.to_json(), table=table)
            await changed.wait()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
