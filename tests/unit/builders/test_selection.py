"""Which routes select an Adapter: the indexed lookup (builders.resolution.SelectionIndex) the controllers use on every
Adapter change gives exactly what matching every route gives (route_selects), in route order (issue 17)."""

from __future__ import annotations

import itertools

from loraplane.api.modelroute import ModelRoute
from loraplane.builders.resolution import SelectionIndex, route_selects, selection_index

SELECTORS = [
    {"matchLabels": {"g": "a"}},
    {"matchLabels": {"g": "a", "team": "x"}},
    {"matchLabels": {"team": "x", "g": "b"}},
    {},                                                                    # matches every Adapter
    {"matchExpressions": [{"key": "g", "operator": "In", "values": ["a", "b"]}]},
    {"matchExpressions": [{"key": "team", "operator": "DoesNotExist"}]},
    {"matchLabels": {"g": "b"}, "matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["x"]}]},
]


def route(i: int, selector: dict | None, backend: str | None) -> ModelRoute:
    routes = []
    if backend:
        routes.append({"name": f"pinned-{i}", "backends": [{"adapter": backend}]})
    if selector is not None:
        routes.append({"selector": selector, "prefix": f"r{i}/"})
    return ModelRoute.model_validate({"kind": "ModelRoute", "metadata": {"name": f"route-{i}", "namespace": "ns"},
                                      "spec": {"baseModel": {"name": "o/m"}, "routes": routes}})


ROUTES = [route(i, sel, backend) for i, (sel, backend) in
          enumerate(itertools.product([None, *SELECTORS], [None, "a1", "b2"]))]
ADAPTERS = [(name, labels) for name in ("a1", "b2", "c3", None)
            for labels in ({}, {"g": "a"}, {"g": "b"}, {"g": "a", "team": "x"}, {"g": "b", "team": "x"},
                           {"team": "y"}, {"g": "c", "other": "1"})]


def test_the_index_selects_what_matching_every_route_selects():
    index = SelectionIndex(ROUTES)
    for name, labels in ADAPTERS:
        want = [r for r in ROUTES if route_selects(r, name, labels)]
        assert index.selecting(name, labels) == want, (name, labels)
    # Each kind of selection occurs, so the comparison above is not vacuous.
    assert index.selecting("a1", {}) and index.selecting("c3", {"team": "x", "g": "b"})
    assert len(index.selecting("c3", {"g": "c"})) < len(ROUTES)


def test_the_index_is_built_once_per_list_object():
    routes = list(ROUTES)
    assert selection_index(routes) is selection_index(routes)
    assert selection_index(list(routes)) is not selection_index(routes)


def test_what_a_spec_selects_is_forgotten_with_the_spec():
    import gc

    from loraplane.builders import resolution

    spec_route = route(999, {"matchLabels": {"g": "a"}}, "a1")
    assert route_selects(spec_route, "a1", {}) and id(spec_route.spec) in resolution._SELECTIONS
    key = id(spec_route.spec)
    del spec_route
    gc.collect()
    assert key not in resolution._SELECTIONS
