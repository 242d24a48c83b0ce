"""Pure builders of the Kubernetes objects the operator creates: no I/O, deterministic output.

`render(resources)` is what `loraplane render` prints and what the controllers apply.
"""

from __future__ import annotations

from loraplane.api import Adapter, FineTuneJob, ModelRoute, Resource
from loraplane.builders import finetunejob, modelroute
from loraplane.builders.common import Manifest
from loraplane.builders.settings import BuildSettings
from loraplane.builders.resolution import Resolution, resolve


def route_resolution(route: ModelRoute, adapters: list[Adapter]) -> Resolution:
    """`resolve` against only the Adapters in the route's namespace (a route never serves another's)."""
    ns = route.metadata.namespace or "default"
    return resolve(route, [a for a in adapters if (a.metadata.namespace or "default") == ns])


def render(resources: list[Resource], settings: BuildSettings = BuildSettings()) -> list[Manifest]:
    """The children of every FineTuneJob and ModelRoute in `resources`. A ModelRoute's serving table is
    resolved against the Adapters among `resources` (the operator uses those of the namespace)."""
    adapters = [r for r in resources if isinstance(r, Adapter)]
    out: list[Manifest] = []
    for r in resources:
        if isinstance(r, FineTuneJob):
            out += finetunejob.children(r, settings)
        elif isinstance(r, ModelRoute):
            out += modelroute.children(r, route_resolution(r, adapters).table, settings)
    return out


def public_name_conflicts(resources: list[Resource]) -> list[str]:
    """One line per public model name two sources of a ModelRoute in `resources` publish (resolved against the
    Adapters among `resources`, as `render` does): `ModelRoute NS/NAME: <message>`."""
    adapters = [r for r in resources if isinstance(r, Adapter)]
    return [f"ModelRoute {r.metadata.namespace or 'default'}/{r.metadata.name}: {c.message}"
            for r in resources if isinstance(r, ModelRoute) for c in route_resolution(r, adapters).conflicts]


__all__ = ["BuildSettings", "Manifest", "Resolution", "public_name_conflicts", "render", "resolve",
           "route_resolution"]
