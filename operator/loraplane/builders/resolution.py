"""Resolve a ModelRoute and the Adapters of its namespace into its `ServingTable` (pure, deterministic).

Which adapters a route serves: those named by a backend and those matched by a route's label selector.
Each must pass what metadata can tell before any replica downloads it: same base model identity (and
revision when both sides set one) and a declared rank (spec.rank, else the rank the loader read from the
artifact) no larger than the route's engine.maxLoraRank. Adapters that fail stay out of the table; the
reason is kept for the ModelRoute's and the Adapter's status.

Public model names are unique in a table. Rule when two sources publish one name: a route with `backends`
(an explicit name; the API keeps those unique) wins over a name a selector route derives (`prefix` + Adapter
name), and between two selector routes the one listed first in spec.routes wins (for one route, each Adapter
gives one name). The losing name is left out of the table and reported (`Resolution.conflicts`, reason
PublicNameConflict), so the table the router gets never holds a duplicate.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from loraplane.api.adapter import Adapter, AdapterPhase
from loraplane.api.common import LabelSelector
from loraplane.api.reasons import Reason, reason_or_unknown
from loraplane.api.redaction import redacted
from loraplane.builders.rollout import candidate_served
from loraplane.api.modelroute import ModelRoute
from loraplane.builders.engine_pod import FORCE_INCLUDE_USAGE, model_path_in_replica, served_model_name
from loraplane.builders.orchestration import ContentResolution, Publication, resolve_content, route_created
from loraplane.api.wire.serving import Backend, DesiredAdapter, PublicModel, RouterSettings, ServingTable
from loraplane.storage.uri import Scheme, try_parse_uri


@dataclass(frozen=True)
class Verdict:
    """Whether an Adapter may be served by a route, the Reason and a message naming both."""

    compatible: bool
    reason: Reason
    message: str = ""


@dataclass
class Resolution:
    """A route's resolved ServingTable and, for status, the verdict of each selected adapter and the
    referenced backends left out."""

    table: ServingTable
    # Adapter name -> verdict, for every adapter the route selects (by reference or selector).
    selected: dict[str, Verdict] = field(default_factory=dict)
    # (public model, adapter) -> why a referenced backend is left out (missing, incompatible, rejected).
    missing: dict[tuple[str, str], Verdict] = field(default_factory=dict)
    # Public names two sources publish, in spec order: each left out of the table for its losing source.
    conflicts: list[NameConflict] = field(default_factory=list)
    # Adapter name -> the versions the table holds of each served adapter (stable, candidate, candidate's share).
    versions: dict[str, AdapterVersions] = field(default_factory=dict)
    # Adapter name -> why its candidate version is left out of the table (NoRoomForCandidate, or a metadata check
    # such as RankTooLarge refuses it) while its stable version serves.
    held: dict[str, Verdict] = field(default_factory=dict)
    # spec.contentRouting resolved against the namespace's other routes (builders.orchestration).
    content: ContentResolution = field(default_factory=ContentResolution)


@dataclass(frozen=True)
class NameConflict:
    """A public model name published twice: `kept` (the source that serves it) and `dropped` (left out), each a
    readable source such as `routes[0] (analytics-sql)` or `routes[1] selector, Adapter sql`."""

    name: str
    kept: str
    dropped: str

    @property
    def message(self) -> str:
        """One sentence naming both sources and the fix."""
        return (f"public model {self.name!r} is published by {self.kept} and by {self.dropped}; "
                f"{self.dropped} is left out (explicit routes and content-routed models win over selectors, "
                "earlier routes over later); "
                "rename the route, change the selector's prefix, or narrow the selector")


def selector_matches(selector: LabelSelector | None, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels AND matchExpressions); an empty selector matches all,
    None matches nothing. The selector is the API's validated LabelSelector, so matching cannot fail."""
    return selector is not None and selector.matches(labels)


def route_selects(route: ModelRoute, name: str | None, labels: dict[str, str]) -> bool:
    """Whether one of `route`'s public models names the Adapter `name` as a backend or matches its `labels` by
    label selector: the Adapters whose state a route's resolution reads (no other Adapter changes it).

    Called for every (route, Adapter) pair of a namespace when Adapters change (tens of thousands of times in a
    burst): what the spec selects is read once per spec object (`_selection`), not walked on every call."""
    names, selectors = _selection(route.spec)
    if name in names:
        return True
    for selector in selectors:
        if selector.matches(labels):
            return True
    return False


# id(spec) -> (a weak reference to the spec, the Adapter names its backends name, its selectors). Parsed specs are
# shared by every status update of a route (api objects are copied shallowly), so this holds one entry per route
# generation in memory; an entry goes with its spec.
_SELECTIONS: dict[int, tuple[weakref.ref, frozenset[str], tuple[LabelSelector, ...]]] = {}


def route_selection(route: ModelRoute) -> tuple[frozenset[str], tuple[LabelSelector, ...]]:
    """What `route` selects Adapters by: the names its backends name, and its selectors (read once per spec)."""
    return _selection(route.spec)


def _selection(spec) -> tuple[frozenset[str], tuple[LabelSelector, ...]]:
    key = id(spec)
    hit = _SELECTIONS.get(key)
    if hit is None or hit[0]() is not spec:
        names = frozenset(b.adapter for r in spec.routes if r.backends is not None for b in r.backends if b.adapter)
        selectors = tuple(r.selector for r in spec.routes if r.backends is None and r.selector is not None)

        def gone(ref: weakref.ref) -> None:
            if (entry := _SELECTIONS.get(key)) is not None and entry[0] is ref:
                del _SELECTIONS[key]

        hit = _SELECTIONS[key] = (weakref.ref(spec, gone), names, selectors)
    return hit[1], hit[2]


class SelectionIndex:
    """Which of a namespace's routes select an Adapter (`route_selects`), found without matching every route: the
    routes are indexed by the Adapter names their backends name and by one matchLabels pair of each selector;
    only the routes found so (and those whose selectors have no matchLabels) are matched. With 50 routes and
    1,000 Adapters changing, matching every route for every Adapter change was the largest cost left of an
    Adapter reconcile (issue 17)."""

    def __init__(self, routes: list[ModelRoute]):
        self.routes = routes
        self._by_name: dict[str, list[int]] = {}
        self._by_label: dict[tuple[str, str], list[int]] = {}
        self._always: list[int] = []   # routes with a selector without matchLabels: matched for every Adapter
        for i, route in enumerate(routes):
            names, selectors = _selection(route.spec)
            for name in names:
                self._by_name.setdefault(name, []).append(i)
            for selector in selectors:
                if selector.match_labels:
                    self._by_label.setdefault(next(iter(selector.match_labels.items())), []).append(i)
                else:
                    self._always.append(i)

    def selecting(self, name: str | None, labels: dict[str, str]) -> list[ModelRoute]:
        """The routes that select the Adapter `name` with `labels`, in the order of `routes`."""
        found = set(self._always)
        found.update(self._by_name.get(name or "", ()))
        for pair in labels.items():
            if isinstance(pair[1], str):
                found.update(self._by_label.get(pair, ()))
        return [self.routes[i] for i in sorted(found) if route_selects(self.routes[i], name, labels)]


# id(routes list) -> (the list, its index): a store's valid_in() list is reused until the namespace changes. A
# few entries (one per busy namespace); each keeps its list, and so its routes, alive until it is dropped.
_INDEXES: dict[int, tuple[list, SelectionIndex]] = {}
_INDEXES_MAX = 16


def selection_index(routes: list[ModelRoute]) -> SelectionIndex:
    """The SelectionIndex of `routes`, built once per list object (callers must not mutate the list)."""
    hit = _INDEXES.get(id(routes))
    if hit is None or hit[0] is not routes:
        if len(_INDEXES) >= _INDEXES_MAX:
            _INDEXES.clear()
        hit = _INDEXES[id(routes)] = (routes, SelectionIndex(routes))
    return hit[1]


def declared_rank(adapter: Adapter) -> int | None:
    """The adapter's LoRA rank: spec.rank, else the rank read from its artifact; None when neither is known."""
    if adapter.spec.rank:
        return adapter.spec.rank
    status = adapter.status
    # status.artifact describes the serving version (status.servedName), which may be another one than spec's.
    if status and status.artifact and status.artifact.rank and status.served_name == adapter.served_name():
        return status.artifact.rank
    return None


def check_compatibility(adapter: Adapter, route: ModelRoute, *, local_paths: bool = False) -> Verdict:
    """What can be checked from metadata alone; the loader checks the artifact itself again.

    `local_paths`: a `/PATH` or `file://` spec.source.uri may be served (local runs, `loraplane run`). In a
    cluster it may not (LocalSourceRefused): a replica would read it from its own file system, where other
    Adapters' cached weights and credentials are (the loader refuses it too)."""
    base = route.spec.base_model
    want = adapter.spec.base_model
    source = try_parse_uri(adapter.spec.source.uri)
    if source is not None and source.scheme == Scheme.LOCAL and not local_paths:
        return Verdict(False, Reason.LocalSourceRefused,
                       f"adapter {adapter.metadata.name}: spec.source.uri {redacted(source.text)!r} is a local path, "
                       "which only local runs read; in a cluster publish the adapter to pvc://CLAIM/PATH, s3://, "
                       "https:// or hf:// and set spec.source.uri to it")
    if want.name != base.identity:
        return Verdict(False, Reason.BaseModelMismatch,
                       f"adapter {adapter.metadata.name} was trained on {want.name}, but ModelRoute "
                       f"{route.metadata.name} serves {base.identity}; serve it on a ModelRoute of "
                       f"{want.name}, or retrain it on {base.identity}")
    if want.revision and base.revision and want.revision != base.revision:
        return Verdict(False, Reason.BaseModelRevisionMismatch,
                       f"adapter {adapter.metadata.name} was trained on {want.name}@{want.revision}, but "
                       f"ModelRoute {route.metadata.name} serves revision {base.revision}; align "
                       "spec.baseModel.revision of the two, or retrain on the served revision")
    rank = declared_rank(adapter)
    if rank and rank > route.spec.engine.max_lora_rank:
        return Verdict(False, Reason.RankTooLarge,
                       f"adapter {adapter.metadata.name} has rank {rank}, above ModelRoute "
                       f"{route.metadata.name}'s engine.maxLoraRank {route.spec.engine.max_lora_rank}; "
                       "raise maxLoraRank or train with a smaller method.r")
    return Verdict(True, Reason.Compatible, f"compatible with ModelRoute {route.metadata.name}")


def expected_digest(adapter: Adapter) -> str | None:
    """The sha256 every replica must verify for this version: spec.source.sha256, else the digest the Adapter
    recorded for this very version and URI when it was first served (status.artifact, written by the Adapter
    controller). A version is content-addressed once published: changed content under it is never loaded."""
    if adapter.spec.source.sha256:
        return adapter.spec.source.sha256
    status = adapter.status
    art = status.artifact if status else None
    if art and art.sha256 and status.version == adapter.spec.version and art.uri == adapter.spec.source.uri:
        return art.sha256
    return None


def desired_adapter(adapter: Adapter) -> DesiredAdapter:
    """The serving-table entry for an Adapter: its served name, source URI and expected sha256, rank, base
    model and the credentials Secret the loader fetches it with."""
    creds = adapter.spec.source.credentials_secret_ref
    return DesiredAdapter(
        served_name=adapter.served_name(), adapter=adapter.metadata.name or "", version=adapter.spec.version,
        uri=adapter.spec.source.uri or "", sha256=expected_digest(adapter), rank=declared_rank(adapter),
        base_model=adapter.spec.base_model.name, base_model_revision=adapter.spec.base_model.revision,
        credentials_secret=creds.name if creds else None, credentials_key=creds.key if creds else None)


class VersionRole(StrEnum):
    """Which of an Adapter's versions a serving-table entry is (make-before-break, docs/adapters.md)."""

    Stable = "Stable"
    """The version that serves: the Adapter's status.version (or spec's when no version served before)."""
    Candidate = "Candidate"
    """spec's version while another one serves: loaded and smoke-tested beside it before it gets traffic."""


@dataclass(frozen=True)
class AdapterVersions:
    """The versions of one Adapter a route's table holds, and the candidate's share of its traffic.

    `stable` is the version that serves (the Adapter's status: status.servedName, status.artifact), `candidate`
    spec's version while it is not promoted (None when spec's version is the stable one). `weight` is the
    candidate's share (0..100 %) of every backend that names the Adapter: the Adapter controller's
    `candidate_weight` decides it and writes it to status.candidate.weight; only a candidate whose phase is Ready
    gets any."""

    stable: DesiredAdapter | None
    candidate: DesiredAdapter | None = None
    weight: int = 0

    def entries(self) -> list[tuple[VersionRole, DesiredAdapter]]:
        """The table entries, stable first."""
        return [(role, d) for role, d in ((VersionRole.Stable, self.stable), (VersionRole.Candidate, self.candidate))
                if d is not None]


def stable_desired(adapter: Adapter) -> DesiredAdapter | None:
    """The serving-table entry of the version that serves, from the Adapter's status, when it is not spec's
    version: status.servedName with the artifact recorded when it was first served (status.artifact uri,
    sha256, rank). None when status has none recorded (no version served yet: spec's version is the only one)
    or when it is spec's version. The base model is immutable (spec's is the stable's), the credentials Secret
    is spec's (a Secret is per Adapter, not per version)."""
    status = adapter.status
    art = status.artifact if status else None
    if status is None or not status.served_name or art is None or not art.uri:
        return None
    if status.served_name == adapter.served_name():
        return None
    creds = adapter.spec.source.credentials_secret_ref
    return DesiredAdapter(
        served_name=status.served_name, adapter=adapter.metadata.name or "", version=status.version, uri=art.uri,
        sha256=art.sha256, rank=art.rank, base_model=adapter.spec.base_model.name,
        base_model_revision=adapter.spec.base_model.revision,
        credentials_secret=creds.name if creds else None, credentials_key=creds.key if creds else None)


def first_version_held(adapter: Adapter) -> Verdict | None:
    """Why an Adapter with no version serving yet is left out of every table because its rollout holds spec's
    version back (its evaluation gates failed, or it was aborted), else None. With a version serving, the held
    version is left out by `adapter_versions` and the serving one stays."""
    rollout = adapter.status.rollout if adapter.status else None
    if (rollout is None or rollout.candidate != adapter.spec.version or candidate_served(rollout)
            or stable_desired(adapter) is not None):
        return None
    return Verdict(False, reason_or_unknown(rollout.reason),
                   f"Adapter {adapter.metadata.name} version {rollout.candidate}: {rollout.message}")


def adapter_versions(adapter: Adapter) -> AdapterVersions:
    """The stable and candidate entries of `adapter` (see AdapterVersions). A candidate that status says a
    route has no room for (NoRoomForCandidate) is still returned: the route's resolution leaves it out."""
    stable = stable_desired(adapter)
    if stable is None:
        return AdapterVersions(stable=desired_adapter(adapter))
    rollout = adapter.status.rollout if adapter.status else None
    if rollout is not None and rollout.candidate == adapter.spec.version and not candidate_served(rollout):
        # The rollout holds spec's version back (gate failed, rolled back, aborted, rollbackTo): not loaded.
        return AdapterVersions(stable=stable)
    cand = adapter.status.candidate if adapter.status else None
    weight = 0
    if cand is not None and cand.served_name == adapter.served_name() and cand.phase == AdapterPhase.Ready:
        weight = max(0, min(100, cand.weight))
    return AdapterVersions(stable=stable, candidate=desired_adapter(adapter), weight=weight)


def split_backend(versions: AdapterVersions, weight: int) -> list[Backend]:
    """The backends one route backend of `weight` naming the Adapter becomes: all on the stable version while
    the candidate's share is 0, all on the candidate at 100, else the weight split between them (rounded; the
    stable version gets the rest)."""
    stable, cand = versions.stable, versions.candidate
    if cand is None or versions.weight <= 0:
        return [Backend(served_name=stable.served_name, adapter=stable.adapter, weight=weight)]
    if versions.weight >= 100:
        return [Backend(served_name=cand.served_name, adapter=cand.adapter, weight=weight)]
    share = round(weight * versions.weight / 100)
    return [Backend(served_name=stable.served_name, adapter=stable.adapter, weight=weight - share),
            Backend(served_name=cand.served_name, adapter=cand.adapter, weight=share)]


def lora_capacity(route: ModelRoute) -> int:
    """How many adapter versions vLLM's LoRA cache holds on one replica of `route`: --max-cpu-loras, which the
    engine pod sets to spec.engine.maxCpuLoras, else 2 x maxLoras (builders.engine_pod.engine_args)."""
    engine = route.spec.engine
    return engine.max_cpu_loras or 2 * engine.max_loras


# The serving table travels in one ConfigMap, whose data the API server caps at 1 MiB (core validation
# MaxSecretSize, also applied to ConfigMaps); the headroom leaves room for the object's metadata and encoding.
CONFIGMAP_DATA_LIMIT = 1024 * 1024
TABLE_MAX_BYTES = CONFIGMAP_DATA_LIMIT - 64 * 1024


def resolve(route: ModelRoute, adapters: list[Adapter], rejected: dict[str, Verdict] | None = None,
            max_bytes: int = TABLE_MAX_BYTES, *, local_paths: bool = False,
            others: Sequence[Publication] = ()) -> Resolution:
    """The ServingTable of `route` given the Adapters of its namespace.

    `rejected` names adapters the operator refuses (an invalid spec or a change to an immutable field):
    they are never served, whatever selects them. `local_paths`: check_compatibility's (local runs only).
    `others`: what the namespace's other ModelRoutes publish (builders.orchestration.Publication), against
    which spec.contentRouting's names resolve (Resolution.content; without them a name the route does not
    serve itself is missing).

    The table's JSON (`ServingTable.to_json`, what the ConfigMap holds) is kept within `max_bytes`: when the
    adapters it would serve make it larger, the ones with the largest entries are left out (ties by name, so
    the choice is stable) with reason ServingTableFull until it fits. One table that cannot be applied would
    stop every change from reaching any replica of the route; this way only the adapters left out are not
    served, and their status and the route's say why.
    """
    rejected = dict(rejected or {})
    while True:
        resolution = _resolve(route, adapters, rejected, local_paths, others)
        size = len(resolution.table.to_json().encode())
        if size <= max_bytes:
            return resolution
        # Leave out the largest entries until their bytes cover the excess (re-checked on the next pass).
        cost: dict[str, int] = {}
        for d in resolution.table.adapters:   # an Adapter being updated has two entries (stable, candidate)
            cost[d.adapter] = cost.get(d.adapter, 0) + len(d.model_dump_json(indent=2).encode()) * 2
        if not cost:
            return resolution   # nothing left to leave out (the spec's own bounds keep the rest small)
        excess = size - max_bytes
        for name in sorted(cost, key=lambda n: (-cost[n], n)):
            rejected[name] = Verdict(False, Reason.ServingTableFull, (
                f"Adapter {name} is left out of route {route.metadata.name}'s serving table: with the adapters it "
                f"selects the table would be {size} bytes, over the {max_bytes}-byte budget of its ConfigMap "
                f"(this adapter's entries: about {cost[name]} bytes)"))
            excess -= cost[name]
            if excess <= 0:
                break


def with_others(resolution: Resolution, route: ModelRoute, others: Sequence[Publication],
                max_bytes: int = TABLE_MAX_BYTES) -> Resolution | None:
    """`resolution` (of `route`, resolved with any `others`, typically none) with spec.contentRouting resolved
    again against `others`: the adapters, the public models and their verdicts do not depend on other routes, so
    only Resolution.content and the table's content and external models are recomputed. The table is the same
    object when those are unchanged (a route without contentRouting: only its conflicts across routes are new).
    None when the new table would be over `max_bytes`: `resolve` with `others` then leaves adapters out to fit.

    This is what lets the controller re-resolve a route cheaply when only another route's names changed, instead
    of matching every selector against every Adapter again."""
    content = resolve_content(route, [m.name for m in resolution.table.models], others)
    table = resolution.table
    if content.models != table.content_models or content.external != table.external_models:
        # A new table (not model_copy: that would carry over the cached json_text of the old one).
        table = ServingTable(**{**{k: getattr(table, k) for k in type(table).model_fields},
                                "content_models": content.models, "external_models": content.external})
        if len(table.to_json().encode()) > max_bytes:
            return None
    return replace(resolution, table=table, content=content)


def _resolve(route: ModelRoute, adapters: list[Adapter], rejected: dict[str, Verdict],
             local_paths: bool = False, others: Sequence[Publication] = ()) -> Resolution:
    """`resolve` without the size bound."""
    by_name = {a.metadata.name: a for a in adapters}
    base_served = served_model_name(route)
    selected: dict[str, Verdict] = {}

    refused: dict[str, Verdict] = {}   # adapters whose candidate (spec) is refused while their stable serves

    def verdict(name: str) -> Verdict:
        if name not in selected:
            if name in rejected:
                selected[name] = rejected[name]
            elif name not in by_name:
                selected[name] = Verdict(False, Reason.AdapterNotFound, f"Adapter {name} does not exist in namespace "
                                                                   f"{route.metadata.namespace or 'default'}")
            elif (hold := first_version_held(by_name[name])) is not None:
                selected[name] = hold
            else:
                if not by_name[name].spec.source.uri:
                    v = Verdict(False, Reason.ArtifactPending,
                                f"Adapter {name} has no source.uri yet (its FineTuneJob has not finished)")
                else:
                    v = check_compatibility(by_name[name], route, local_paths=local_paths)
                stable = stable_desired(by_name[name])
                if not v.compatible and stable is not None:
                    # spec's new version is refused by metadata; the version that serves was accepted and keeps
                    # serving (make-before-break: a bad candidate never breaks what serves).
                    refused[name] = v
                    v = Verdict(True, Reason.Compatible, f"{v.message}; version {stable.version or stable.served_name}"
                                " keeps serving")
                selected[name] = v
        return selected[name]

    # Every verdict first (in the order the route selects the adapters), so the room for candidates is known.
    # Each selector is matched once, against the adapters sorted once (the second pass below reuses the matches).
    by_name_sorted = sorted(adapters, key=lambda a: a.metadata.name or "")
    matched: dict[int, list[Adapter]] = {}
    for i, r in enumerate(route.spec.routes):
        if r.backends is not None:
            for b in r.backends:
                if b.adapter:
                    verdict(b.adapter)
        else:
            matched[i] = [a for a in by_name_sorted if selector_matches(r.selector, a.metadata.labels)]
            for a in matched[i]:
                verdict(a.metadata.name or "")
    # Make-before-break needs room for both versions of an Adapter being updated: candidates enter the table while
    # it holds at most lora_capacity(route) versions (in the order the route selects the adapters); the others
    # wait with NoRoomForCandidate while their stable versions serve. Stable versions are never left out here.
    versions: dict[str, AdapterVersions] = {}
    held: dict[str, Verdict] = {}
    served_names = [n for n, v in selected.items() if v.compatible]
    room = lora_capacity(route) - len(served_names)
    for name in served_names:
        v = adapter_versions(by_name[name])
        if name in refused:
            held[name], v = refused[name], AdapterVersions(stable=v.stable)
        elif v.candidate is not None:
            if room > 0:
                room -= 1
            else:
                held[name] = Verdict(False, Reason.NoRoomForCandidate, (
                    f"version {v.candidate.version or v.candidate.served_name} of Adapter {name} waits outside "
                    f"route {route.metadata.name}'s serving table: with it the route would hold more adapter versions "
                    f"than vLLM's LoRA cache (engine.maxCpuLoras {lora_capacity(route)}); version "
                    f"{v.stable.version or v.stable.served_name} keeps serving. Raise spec.engine.maxCpuLoras"))
                v = AdapterVersions(stable=v.stable)
        versions[name] = v

    models: list[PublicModel] = []
    missing: dict[tuple[str, str], Verdict] = {}
    # Explicit names first (they win), so a selector's derived name can be checked against all of them.
    sources: dict[str, str] = {r.name: f"routes[{i}] ({r.name})" for i, r in enumerate(route.spec.routes)
                               if r.backends is not None and r.name}
    # Content-routed names are explicit too (the API keeps them apart from spec.routes' names).
    sources.update({c.name: f"contentRouting[{i}] ({c.name})" for i, c in enumerate(route.spec.content_routing)
                    if c.name not in sources})
    conflicts: list[NameConflict] = []
    for i, r in enumerate(route.spec.routes):
        if r.backends is not None:
            backends = []
            for b in r.backends:
                if b.adapter:
                    v = verdict(b.adapter)
                    if not v.compatible:
                        missing[(r.name or "", b.adapter)] = v
                        continue
                    backends.extend(split_backend(versions[b.adapter], b.weight))
                else:
                    backends.append(Backend(served_name=base_served, adapter=None, weight=b.weight))
            models.append(PublicModel(name=r.name or "", backends=backends))
        else:
            for a in matched[i]:
                if verdict(a.metadata.name or "").compatible:
                    public = f"{r.prefix}{a.metadata.name}"
                    source = f"routes[{i}] selector (Adapter {a.metadata.name})"
                    if public in sources:
                        conflicts.append(NameConflict(public, sources[public], source))
                        continue
                    sources[public] = source
                    models.append(PublicModel(name=public,
                                              backends=split_backend(versions[a.metadata.name or ""], 100)))
    served = sorted((d for v in versions.values() for _, d in v.entries()),
                    key=lambda d: d.served_name)
    spec = route.spec
    content = resolve_content(route, [m.name for m in models], others)
    table = ServingTable(
        route=route.metadata.name or "", namespace=route.metadata.namespace or "default",
        generation=route.metadata.generation or 0,
        base_model=spec.base_model.identity, base_model_revision=spec.base_model.revision,
        served_model_name=base_served, model_path=model_path_in_replica(spec.base_model),
        max_lora_rank=spec.engine.max_lora_rank, max_loras=spec.engine.max_loras,
        adapters=served, models=models, content_models=content.models, external_models=content.external,
        route_created=route_created(route) or None,
        router=RouterSettings(sticky_header=spec.router.sticky_header,
                              timeout_seconds=spec.router.timeout_seconds,
                              max_request_bytes=spec.router.max_request_bytes,
                              log_prompts=spec.router.log_prompts,
                              # Fixed `replicas: 0` is a parked route: nothing will come up, so no request waits.
                              cold_start_wait_seconds=0 if spec.replicas == 0 else spec.router.cold_start.max_wait_seconds,
                              cold_start_max_requests=spec.router.cold_start.max_requests,
                              engine_includes_usage=any(a.split("=", 1)[0] == FORCE_INCLUDE_USAGE
                                                        for a in spec.engine.extra_args)))
    return Resolution(table=table, selected=selected, missing=missing, conflicts=conflicts,
                      versions=versions, held=held, content=content)
