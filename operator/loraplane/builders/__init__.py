"""Pure builders of the Kubernetes objects the operator creates: no I/O, deterministic output.

`render(resources)` is what `loraplane render` prints and what the controllers apply.
"""

from __future__ import annotations

from loraplane.api import Adapter, FineTuneJob, ModelRoute, Resource
from loraplane.api.reasons import Reason
from loraplane.builders import finetunejob, modelroute
from loraplane.builders.common import Manifest
from loraplane.builders.orchestration import Publication, route_created
from loraplane.builders.resolution import Resolution, resolve
from loraplane.builders.settings import BuildSettings


def route_resolution(route: ModelRoute, adapters: list[Adapter],
                     routes: list[ModelRoute] | None = None) -> Resolution:
    """`resolve` against only the Adapters in the route's namespace (a route never serves another's), and its
    spec.contentRouting against the other `routes` of its namespace (what each would publish, resolved against
    the same Adapters; ready as far as files can tell)."""
    ns = route.metadata.namespace or "default"
    mine = [a for a in adapters if (a.metadata.namespace or "default") == ns]
    others = []
    if route.spec.content_routing:
        for other in routes or []:
            if (other.metadata.namespace or "default") != ns or other.metadata.name == route.metadata.name:
                continue
            table = resolve(other, mine).table
            others.append(Publication(other.metadata.name or "", route_created(other),
                                      models=tuple((m.name, True) for m in table.models),
                                      content=tuple((c.name, True) for c in table.content_models),
                                      task=other.spec.engine.task))
    return resolve(route, mine, others=others)


def render(resources: list[Resource], settings: BuildSettings = BuildSettings()) -> list[Manifest]:
    """The children of every FineTuneJob and ModelRoute in `resources`. A ModelRoute's serving table is
    resolved against the Adapters among `resources` (the operator uses those of the namespace)."""
    adapters = [r for r in resources if isinstance(r, Adapter)]
    routes = [r for r in resources if isinstance(r, ModelRoute)]
    out: list[Manifest] = []
    for r in resources:
        if isinstance(r, FineTuneJob):
            out += finetunejob.children(r, settings)
        elif isinstance(r, ModelRoute):
            out += modelroute.children(r, route_resolution(r, adapters, routes).table, settings)
    return out


def route_warnings(resources: list[Resource],
                   invalid_jobs_produce: frozenset[tuple[str, str]] = frozenset()) -> list[str]:
    """What the operator would report about the ModelRoutes in `resources`, resolved against the Adapters among
    them (as `render` does), one line each, `ModelRoute NS/NAME: <message>`: public names published twice,
    backends left out of the table (an Adapter that is not in `resources` — it may exist in the cluster —, or
    one the route cannot serve, e.g. a rank over engine.maxLoraRank or another base model), with the reason, and
    spec.contentRouting names that no route among `resources` publishes (another route in the cluster may).
    `invalid_jobs_produce`: (namespace, adapterName) of the FineTuneJobs of the files that did not validate (their
    errors are reported): the Adapters they name are not reported missing on top of those errors."""
    adapters = [r for r in resources if isinstance(r, Adapter)]
    routes = [r for r in resources if isinstance(r, ModelRoute)]
    # Adapters a FineTuneJob among `resources` creates when it succeeds: not missing, only not trained yet, and
    # checked as the Adapter the job will create (finetunejob.produced_adapter: its base model, method.r as its
    # rank, its labels), so a job whose adapter no route of the files can serve (a rank over maxLoraRank,
    # another base model) is said before its GPU hours are spent. One the files define is checked as written.
    named = {(a.metadata.namespace or "default", a.metadata.name) for a in adapters}
    produced: dict[tuple[str, str], FineTuneJob] = {}
    for j in resources:
        key = (j.metadata.namespace or "default", j.spec.output.adapter_name) if isinstance(j, FineTuneJob) else None
        if key is None or key in named or key in produced:
            continue
        produced[key] = j
        try:
            adapters.append(Adapter.model_validate(finetunejob.produced_adapter(
                j, finetunejob.output_uri(j, BuildSettings()), None, None)))
        except ValueError:   # not expected for a valid job; then it is only not reported missing
            pass

    def made_by(ns: str, name: str) -> str:
        job = produced.get((ns, name))
        return f" (the Adapter FineTuneJob {job.metadata.name} creates)" if job is not None else ""

    out = []
    for r in resources:
        if not isinstance(r, ModelRoute):
            continue
        ns = r.metadata.namespace or "default"
        where = f"ModelRoute {ns}/{r.metadata.name}"
        resolution = route_resolution(r, adapters, routes)
        out += [f"{where}: {c.message}" for c in resolution.conflicts]
        if resolution.content.missing:
            # A wrong spec.engine.task is a mistake whatever the cluster holds; a name the files lack may be
            # published by a route that is not among them.
            content = resolution.content
            maybe = ("" if all(content.target(p, n).reason == Reason.ContentTargetWrongTask
                               for refs in content.missing.values() for p, n in refs)
                     else " (another in the cluster may publish what they lack)")
            out.append(f"{where}: spec.contentRouting names what no ModelRoute among these files can serve{maybe}: "
                       f"{resolution.content.missing_message()}")
        out += [f"{where}: contentRouting {c.name!r}: {line}" for c in r.spec.content_routing for line in c.unreachable()]
        out += [f"{where}: backend {adapter} of {public!r} is left out ({verdict.reason}): {verdict.message}"
                + made_by(ns, adapter)
                for (public, adapter), verdict in sorted(resolution.missing.items())
                if not (verdict.reason == Reason.AdapterNotFound
                        and ((ns, adapter) in produced or (ns, adapter) in invalid_jobs_produce))]
        # What a selector matches is no backend: an Adapter it selects and cannot serve is said too.
        backends = {a for (_, a) in resolution.missing}
        out += [f"{where}: Adapter {name}, which a selector of spec.routes matches, is not served ({verdict.reason}): "
                f"{verdict.message}{made_by(ns, name)}"
                for name, verdict in sorted(resolution.selected.items())
                if not verdict.compatible and name not in backends and verdict.reason != Reason.AdapterNotFound]
    return out


__all__ = ["BuildSettings", "Manifest", "Resolution", "render", "resolve",
           "route_resolution", "route_warnings"]
