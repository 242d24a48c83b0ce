"""Gateway mode (issue 15): the table synthesised from a namespace's ModelRoutes (router/gateway.py), pure parts.
The watch against a real kube-apiserver is in tests/integration/apiserver/test_gateway_apiserver.py."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from loraplane.api.modelroute import ModelRoute
from loraplane.api.orchestration import router_url
from loraplane.builders.modelroute import endpoint
from loraplane.router.gateway import parse_route_selector, route_names, synthesize_table
from loraplane.router.table import RoutingTable


def route_obj(name: str, created: str, models: list[str], content: list[str] = (), **status) -> dict:
    return {"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute",
            "metadata": {"name": name, "namespace": "team", "creationTimestamp": created},
            "spec": {}, "status": {"models": [{"name": m, "ready": True} for m in models],
                                   "contentModels": [{"name": c, "default": "x"} for c in content], **status}}


def test_every_public_name_of_every_route_is_forwarded_to_its_router():
    table, conflicts = synthesize_table([
        route_obj("support", "2026-01-02T00:00:00Z", ["support-bot", "llama"], content=["auto"]),
        route_obj("sql", "2026-01-01T00:00:00Z", ["sql-gen"]),
    ], "team", generation=3)
    assert conflicts == {} and table.generation == 3 and table.namespace == "team"
    assert [(e.name, e.route, e.url) for e in table.external_models] == [
        ("sql-gen", "sql", "http://sql-router.team.svc:8080"),
        ("auto", "support", "http://support-router.team.svc:8080"),
        ("llama", "support", "http://support-router.team.svc:8080"),
        ("support-bot", "support", "http://support-router.team.svc:8080")]
    compiled = RoutingTable.compile(table)
    assert compiled.dropped == [] and compiled.models == {}
    listing = json.loads(compiled.models_json)["data"]
    assert {m["id"]: m["owned_by"] for m in listing} == {"sql-gen": "sql", "auto": "support", "llama": "support",
                                                        "support-bot": "support"}


def test_a_conflicting_name_is_left_out_of_the_later_route_only():
    table, conflicts = synthesize_table([
        route_obj("newer", "2026-03-01T00:00:00Z", ["shared", "own-b"]),
        route_obj("older", "2026-01-01T00:00:00Z", ["shared", "own-a"]),
    ], "team")
    assert conflicts == {"newer": [("shared", "older")]}
    assert {e.name: e.route for e in table.external_models} == {"shared": "older", "own-a": "older",
                                                                "own-b": "newer"}


def test_status_is_read_not_trusted_and_urls_come_from_names_only():
    """A status a pod could influence (status.endpoint) never becomes a URL; malformed entries are skipped, a
    route name that is not a route name is skipped, and the URL is the router Service builders name."""
    evil = route_obj("ok", "2026-01-01T00:00:00Z", ["good", "bad name", "x" * 300], endpoint="http://evil:1/v1")
    evil["status"]["models"].append("not-a-dict")
    evil["status"]["contentModels"] = "not-a-list"
    table, _ = synthesize_table([evil, route_obj("Bad_Name", "2026-01-01T00:00:00Z", ["z"]),
                                 {"metadata": {"name": "nostatus"}}], "team")
    assert [(e.name, e.url) for e in table.external_models] == [("good", "http://ok-router.team.svc:8080")]
    assert route_names({"metadata": {}}) is None
    # The same Service name and port as the operator's builders, for the longest route name there is.
    name = "r" * 50
    route = ModelRoute.model_validate({"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute",
                                       "metadata": {"name": name, "namespace": "team"},
                                       "spec": {"baseModel": {"uri": "/models/tiny"}}})
    assert endpoint(route) == router_url(name, "team") + "/v1"


@pytest.mark.parametrize("text,ok", [("team=search", True), ("a=b, c=d", True), ("loraplane.io/tier=prod", True),
                                     ("k=", True), ("k", False), ("k!=v", False), ("k in (a)", False),
                                     ("k=v=w", False), ("=v", False), ("k=" + "v" * 64, False)])
def test_route_selector(text, ok):
    if ok:
        assert parse_route_selector(text) == ",".join(t.strip() for t in text.split(","))
    else:
        with pytest.raises(ValueError, match="--route-selector"):
            parse_route_selector(text)


async def test_cli_gateway_argument_rules():
    for args, fragment in [(["--gateway", "--table", "t.json"], b"--gateway takes its table"),
                           (["--gateway", "--replica", "http://x:8000"], b"--gateway takes its table"),
                           (["--table", "t.json", "--replica", "http://x:8000", "--route-selector", "a=b"],
                            b"--route-selector needs --gateway"),
                           (["--gateway", "--route-selector", "a in (b)", "--kubeconfig", "/nonexistent"],
                            b"--route-selector")]:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "loraplane.router", *args,
                                                    stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        assert proc.returncode == 2 and fragment in err, err


class FakeKube:
    """Stands in for KubeClient: LIST answers from `lists` in turn (an exception is raised), WATCH yields the
    events put in `events` and then waits."""

    def __init__(self, lists: list):
        self.lists = lists
        self.events: asyncio.Queue = asyncio.Queue()
        self.selectors: list = []

    async def list_with_version(self, api_version, kind, namespace, label_selector=None, **_):
        self.selectors.append((kind, namespace, label_selector))
        item = self.lists.pop(0) if len(self.lists) > 1 else self.lists[0]
        if isinstance(item, Exception):
            raise item
        return [dict(o) for o in item], "7"

    async def watch(self, api_version, kind, namespace, label_selector, resource_version, timeout_seconds=300, **_):
        while True:
            yield await self.events.get()


async def test_the_watch_says_what_rbac_is_missing_then_follows_changes(monkeypatch):
    from loraplane.kube.client import ApiError
    from loraplane.router import gateway

    sleeps = []
    real_sleep = asyncio.sleep

    async def no_sleep(seconds):
        sleeps.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(gateway.asyncio, "sleep", no_sleep)
    a = route_obj("a", "2026-01-01T00:00:00Z", ["x"])
    a["metadata"]["resourceVersion"] = "5"
    kube = FakeKube([ApiError(403, {"message": "modelroutes is forbidden"}, "list"), [a]])
    reads = gateway.watch_gateway_table(kube, "team", "tier=prod")
    first = await asyncio.wait_for(anext(reads), 5)
    assert first.table is None and "HTTP 403" in first.problem and "get/list/watch on modelroutes" in first.problem
    second = await asyncio.wait_for(anext(reads), 5)
    assert [e.name for e in second.table.external_models] == ["x"] and second.table.generation == 1
    assert kube.selectors[0] == ("ModelRoute", "team", "tier=prod") and sleeps[0] == 1.0
    # A status-only change that keeps the names yields nothing; a new name yields generation 2.
    b = route_obj("a", "2026-01-01T00:00:00Z", ["x"], phase="Ready")
    b["metadata"]["resourceVersion"] = "8"
    await kube.events.put(("MODIFIED", b))
    c = route_obj("a", "2026-01-01T00:00:00Z", ["x", "y"])
    c["metadata"]["resourceVersion"] = "9"
    await kube.events.put(("MODIFIED", c))
    third = await asyncio.wait_for(anext(reads), 5)
    assert [e.name for e in third.table.external_models] == ["x", "y"] and third.table.generation == 2
    await reads.aclose()


async def test_an_event_costs_reading_its_own_route_only(monkeypatch):
    """Most events are status updates of one route (replicas, conditions). The table used to be rebuilt from every
    route on each (~0.35 s per event at 50,000 names, the gateway's one event loop busy): now an event reads its
    own route only and the table is rebuilt only when some route's names changed."""
    from loraplane.router import gateway

    routes = [route_obj(f"r{i}", f"2026-01-01T00:00:{i:02d}Z", [f"m{i}-{j}" for j in range(3)]) for i in range(40)]
    for r in routes:
        r["metadata"]["resourceVersion"] = "5"
    kube = FakeKube([routes])
    reads = gateway.watch_gateway_table(kube, "team")
    first = await asyncio.wait_for(anext(reads), 5)
    assert len(first.table.external_models) == 120
    calls = []
    real = gateway.route_names
    monkeypatch.setattr(gateway, "route_names", lambda obj: calls.append(obj["metadata"]["name"]) or real(obj))
    for v in range(6, 16):   # ten status-only updates of r7
        b = route_obj("r7", "2026-01-01T00:00:07Z", [f"m7-{j}" for j in range(3)], phase="Ready")
        b["metadata"]["resourceVersion"] = str(v)
        await kube.events.put(("MODIFIED", b))
    c = route_obj("r7", "2026-01-01T00:00:07Z", ["m7-0", "new"])
    c["metadata"]["resourceVersion"] = "20"
    await kube.events.put(("MODIFIED", c))
    second = await asyncio.wait_for(anext(reads), 5)
    assert second.table.generation == 2 and "new" in [e.name for e in second.table.external_models]
    assert len(second.table.external_models) == 119
    assert set(calls) == {"r7"} and len(calls) == 11
    # A deleted route takes its names with it.
    await kube.events.put(("DELETED", c))
    third = await asyncio.wait_for(anext(reads), 5)
    assert len(third.table.external_models) == 117 and third.table.generation == 3
    await reads.aclose()


def test_the_gateway_is_no_stricter_than_its_routes_and_bounded_itself():
    """A route whose router allows hour-long streams (timeoutSeconds 3600) or large bodies (maxRequestBytes) used
    to be cut at the gateway's defaults (600 s: a truncated stream; 4 MiB: 413). The gateway takes the largest
    timeout and body limit of its routes, the body limit at most GATEWAY_MAX_REQUEST_BYTES (a route's has no upper
    bound, and the gateway holds each body); fields of another shape count as the defaults."""
    from loraplane.router.gateway import GATEWAY_MAX_REQUEST_BYTES

    long = route_obj("long", "2026-01-01T00:00:00Z", ["story"])
    long["spec"] = {"router": {"timeoutSeconds": 3600, "maxRequestBytes": 16 << 20}}
    huge = route_obj("huge", "2026-01-02T00:00:00Z", ["big"])
    huge["spec"] = {"router": {"maxRequestBytes": 10 << 30, "timeoutSeconds": "forever"}}
    bad = route_obj("Not.A.Route", "2026-01-03T00:00:00Z", ["x"])
    bad["spec"] = {"router": {"timeoutSeconds": 86400}}
    table, _ = synthesize_table([long, huge, bad], "team")
    assert table.router.timeout_seconds == 3600
    assert table.router.max_request_bytes == GATEWAY_MAX_REQUEST_BYTES == 64 << 20
    plain, _ = synthesize_table([route_obj("a", "2026-01-01T00:00:00Z", ["x"])], "team")
    assert plain.router.timeout_seconds == 600 and plain.router.max_request_bytes == 4 << 20
