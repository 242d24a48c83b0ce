"""Content routing of a ModelRoute resolved against the ModelRoutes of its namespace (pure, deterministic).

`spec.contentRouting` names public models (destinations, a default, a classifier, an embedding model). Each is
either served by this route (its serving table's public models) or published by another ModelRoute of the
namespace, as that route's status says (`Publication`: status.models and status.contentModels, the same
source the gateway reads, so both agree on who owns a name). Ownership across routes is
`api.orchestration.public_name_owners`: the oldest route publishing a name owns it. A name owned by another
route becomes an `ExternalModel` of the table (forwarded to that route's router Service, its URL built from
names only); a name nobody serves is left out of the wire content model and reported (ContentTargetNotFound);
a name of this route that an older route owns is a cross-route PublicNameConflict on this route.

The inputs are plain values (this route, its table's public names, the other routes' publications): the
controller reads them from its stores, tests build them by hand.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from difflib import get_close_matches

from loraplane.api.modelroute import ModelRoute
from loraplane.api.orchestration import (
    ENGINE_TASK_EMBED, ContentModel, ContentRoute, ExternalModel, Publication, WireClassifier, WireDestination,
    WireRules, WireSemantic, public_name_owners,
)
from loraplane.api.reasons import Reason

from loraplane.builders.modelroute import router_url


def route_created(route: ModelRoute) -> str:
    """metadata.creationTimestamp of a parsed route (RFC 3339), "" when unknown (a file not yet applied)."""
    value = (route.metadata.model_extra or {}).get("creationTimestamp")
    return value if isinstance(value, str) else ""


@dataclass(frozen=True)
class Target:
    """Where a public model a content model names is served: by this route (`local`), by another route
    (`route`, then `external` is its ExternalModel), or nowhere it can serve (`missing` says why, `reason` is
    ContentTargetNotFound, or ContentTargetWrongTask for another route whose spec.engine.task cannot answer what
    the reference asks)."""

    name: str
    route: str | None = None
    local: bool = False
    external: ExternalModel | None = None
    missing: str | None = None
    reason: Reason = Reason.ContentTargetNotFound


@dataclass
class ContentResolution:
    """A route's content routing resolved: the wire content models and external models of its table, where each
    referenced name is, and this route's names an older route of the namespace owns."""

    models: list[ContentModel] = field(default_factory=list)
    external: list[ExternalModel] = field(default_factory=list)
    # Where each referenced name is served. A name another route serves with a spec.engine.task that cannot answer
    # one role is still here as that route's external model (it may answer the other role: an embed route's model
    # is a right embeddingModel and a wrong default); the role's verdict is in `wrong_task`, read by `target()`.
    targets: dict[str, Target] = field(default_factory=dict)
    # (name, asked as an embedding model) -> its ContentTargetWrongTask Target, for that role only.
    wrong_task: dict[tuple[str, bool], Target] = field(default_factory=dict)
    # (public name, older route owning it): names this route publishes that an older route published first.
    conflicts: list[tuple[str, str]] = field(default_factory=list)
    # Content model name -> the (field path, name) references that are missing, in spec order.
    missing: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def conflict_message(self) -> str:
        """One sentence per cross-route conflict, naming the name and the older route, and the fix."""
        return "; ".join(
            f"public model {name!r} is also published by ModelRoute {owner}, which is older and owns it in the "
            "namespace (the gateway and other routes' content routing send it there; this route still serves it "
            "on its own endpoint): rename it here or remove it from one of the two" for name, owner in self.conflicts)

    def target(self, path: str, name: str) -> Target:
        """Where the reference `path` (a field path under the content route, as ContentRoute.references gives)
        to `name` is served, for that role: ContentTargetWrongTask when the route serving `name` cannot answer
        what `path` asks (an embedding model for semantic.embeddingModel, a completion for the others), else the
        name's Target. KeyError for a name no content model references."""
        return self.wrong_task.get((name, path == EMBEDDING_PATH)) or self.targets[name]

    @property
    def missing_reason(self) -> Reason | None:
        """The reason of the first missing reference (spec order): ContentTargetNotFound or ContentTargetWrongTask;
        None when nothing is missing."""
        for refs in self.missing.values():
            for path, name in refs:
                return self.target(path, name).reason
        return None

    def missing_message(self) -> str:
        """One clause per content model with missing references, naming each field, name and why."""
        parts = []
        for model, refs in self.missing.items():
            what = ", ".join(f"{path} {name!r} ({self.target(path, name).missing})" for path, name in refs)
            parts.append(f"content model {model!r}: {what}")
        return "; ".join(parts)


def _wire_destination(d) -> WireDestination:
    rules = None
    if d.rules is not None:
        r = d.rules
        rules = WireRules(pattern=r.pattern, keywords=list(r.keywords), headers=dict(r.headers),
                          min_prompt_tokens=r.min_prompt_tokens, max_prompt_tokens=r.max_prompt_tokens)
    return WireDestination(model=d.model, rules=rules, examples=list(d.examples), label=d.label)


def wire_content_model(spec: ContentRoute, log_decisions: bool, found: Container[str],
                       embeddings: Container[str] | None = None) -> ContentModel | None:
    """The router's form of one content model, with only the references in `found` (the names that serve a
    completion; `embeddings`: the names that serve /v1/embeddings, default `found`): a destination nobody serves
    is left out (never chosen), a classifier or embedding model nobody serves takes its method out of `methods`
    (the other methods and the default still decide). None when the default is not found: the content model
    cannot serve, so it is not in the table at all (a request for it is answered as an unknown model, and the
    route's status says why)."""
    embeddings = found if embeddings is None else embeddings
    if spec.default not in found:
        return None
    methods = [m for m in spec.methods
               if not (m == "classifier" and (spec.classifier is None or spec.classifier.model not in found))
               and not (m == "semantic" and (spec.semantic is None or spec.semantic.embedding_model not in embeddings))]
    classifier = semantic = None
    if "classifier" in methods and spec.classifier is not None:
        classifier = WireClassifier(model=spec.classifier.model, timeout_ms=spec.classifier.timeout_milliseconds)
    if "semantic" in methods and spec.semantic is not None:
        s = spec.semantic
        semantic = WireSemantic(embedding_model=s.embedding_model, min_similarity=s.min_similarity,
                                timeout_ms=s.timeout_milliseconds)
    return ContentModel(name=spec.name, default=spec.default, methods=methods,
                        destinations=[_wire_destination(d) for d in spec.destinations if d.model in found],
                        classifier=classifier, semantic=semantic, log_decisions=log_decisions)


def _did_you_mean(name: str, known: Sequence[str]) -> str:
    """`; did you mean 'x'?` naming the served public name closest to a missing `name` (a typo in a destination
    is the usual cause of ContentTargetNotFound), or "" when none is close (difflib's ratio >= 0.75)."""
    close = get_close_matches(name, sorted(set(known)), n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""


EMBEDDING_PATH = "semantic.embeddingModel"   # the one reference that asks for /v1/embeddings, not a completion


def _wrong_task(path: str, owner: str, task: str) -> str:
    """Why route `owner` (spec.engine.task `task`) cannot answer what the reference `path` asks of its public
    model, or "": an embedding model must be on an embed route (vLLM's pooling runner answers /v1/embeddings
    only), a destination, default or classifier on a generate route (the pooling runner answers no completions).
    Within one route the API refuses the same mismatch (ModelRouteSpec); across routes only the other's spec
    knows. The verdict is per reference, not per name: one name may be right in one role and wrong in another."""
    embed = task == ENGINE_TASK_EMBED
    if (path == EMBEDDING_PATH) == embed:
        return ""
    role = "an embedding model" if path == EMBEDDING_PATH else "a destination, default or classifier"
    if embed:
        return (f"served by ModelRoute {owner}, an embedding model (spec.engine.task embed) that cannot answer "
                f"the completion {path} asks for; {role} must be a model of a ModelRoute with spec.engine.task "
                "generate")
    return (f"served by ModelRoute {owner}, a generation model (spec.engine.task {task}) that has no "
            "/v1/embeddings, so semantic routing would always fall back; name the public model of a ModelRoute "
            "with spec.engine.task embed")


def resolve_content(route: ModelRoute, served: Sequence[str], others: Sequence[Publication]) -> ContentResolution:
    """Resolve `route`'s spec.contentRouting.

    `served`: the public model names of the route's own serving table (ServingTable.models, after its own
    conflicts). `others`: the Publications of the namespace's ModelRoutes (this route's own, if included, is
    ignored: it is `served` plus its content names). Never raises: every problem becomes a Target.missing or a
    conflict."""
    me = route.metadata.name or ""
    ns = route.metadata.namespace or "default"
    spec = route.spec
    content_names = [c.name for c in spec.content_routing]
    by_route = {p.route: p for p in others if p.route != me}
    owners, conflicts = public_name_owners(
        [(me, route_created(route), [*served, *content_names])]
        + [(p.route, p.created, p.names()) for p in by_route.values()])
    out = ContentResolution(conflicts=list(conflicts.get(me, [])))
    local = set(served)
    content = set(content_names)
    for c in spec.content_routing:
        for path, name in c.references():
            if (name, path == EMBEDDING_PATH) in out.wrong_task:
                continue
            if (known := out.targets.get(name)) is not None:
                if known.external is not None and (why := _wrong_task(path, known.route or "",
                                                                         by_route[known.route or ""].task)):
                    out.wrong_task[(name, path == EMBEDDING_PATH)] = Target(
                        name, route=known.route, missing=why, reason=Reason.ContentTargetWrongTask)
                continue
            if name in local:
                target = Target(name, route=me, local=True)
            elif name in content:   # refused by the API (no chains); kept here for a table built without it
                target = Target(name, route=me, missing=f"a content-routed model of ModelRoute {me}: content "
                                "models do not chain")
            elif (owner := owners.get(name)) is None or owner not in by_route:
                target = Target(name, missing="no ModelRoute of the namespace publishes it"
                                + _did_you_mean(name, [*served, *(r.name for r in spec.routes if r.name),
                                                         *(n for p in by_route.values() for n, _ in p.models)]))
            elif name not in dict(by_route[owner].models):
                target = Target(name, route=owner, missing=f"a content-routed model of ModelRoute {owner}: "
                                "content models do not chain")
            else:
                target = Target(name, route=owner,
                                external=ExternalModel(name=name, route=owner, url=router_url(owner, ns)))
                if why := _wrong_task(path, owner, by_route[owner].task):
                    out.wrong_task[(name, path == EMBEDDING_PATH)] = Target(
                        name, route=owner, missing=why, reason=Reason.ContentTargetWrongTask)
            out.targets[name] = target
    found = {n for n, t in out.targets.items() if t.missing is None and (n, False) not in out.wrong_task}
    embeddings = {n for n, t in out.targets.items() if t.missing is None and (n, True) not in out.wrong_task}
    for c in spec.content_routing:
        if refs := [(path, n) for path, n in c.references() if out.target(path, n).missing is not None]:
            out.missing[c.name] = refs
        if (wire := wire_content_model(c, spec.router.log_decisions, found, embeddings)) is not None:
            out.models.append(wire)
    used = {n for m in out.models for n in (m.default, *(d.model for d in m.destinations),
                                            *([m.classifier.model] if m.classifier else []),
                                            *([m.semantic.embedding_model] if m.semantic else []))}
    out.external = sorted((t.external for t in out.targets.values() if t.external is not None and t.name in used),
                          key=lambda e: e.name)
    return out


def referenced_names(body: dict) -> set[str]:
    """The public names a ModelRoute object's spec.contentRouting sends requests to (destinations, defaults,
    classifier and embedding models), read from the stored dict without parsing it (the controller asks this of
    every route of a namespace when one route's publication changes); empty without contentRouting. Values of
    another shape are skipped."""
    spec = body.get("spec")
    routing = spec.get("contentRouting") if isinstance(spec, dict) else None
    if not isinstance(routing, list) or not routing:
        return set()
    out: set[str] = set()

    def add(value: object) -> None:
        if isinstance(value, str):
            out.add(value)

    for c in routing:
        if not isinstance(c, dict):
            continue
        add(c.get("default"))
        for d in c.get("destinations") if isinstance(c.get("destinations"), list) else ():
            if isinstance(d, dict):
                add(d.get("model"))
        for part, key in (("classifier", "model"), ("semantic", "embeddingModel")):
            if isinstance(c.get(part), dict):
                add(c[part].get(key))
    return out


def publication_changes(before: Publication | None, after: Publication) -> tuple[set[str], set[str]]:
    """What changed between two Publications of one route, as (names whose readiness or presence changed,
    names that appeared or disappeared). `before` None (the route appeared or disappeared): every name of
    `after`, in both sets. Content models count by presence only (no route may send requests to another's
    content model, so their readiness concerns nobody else)."""
    if before is None:
        names = set(after.names())
        return names, names
    if before.task != after.task:   # every name now answers other requests (ContentTargetWrongTask or not)
        return set(before.names()) | set(after.names()), set()
    bm, am = dict(before.models), dict(after.models)
    bc, ac = {n for n, _ in before.content}, {n for n, _ in after.content}
    presence = (bm.keys() ^ am.keys()) | (bc ^ ac)
    ready = {n for n in bm.keys() & am.keys() if bm[n] != am[n]}
    return presence | ready, presence
