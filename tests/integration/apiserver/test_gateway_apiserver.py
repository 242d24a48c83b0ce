"""The gateway (issue 15, `loraplane router --gateway`) against the real kube-apiserver, with exactly the RBAC the
chart grants it (its Role: get/list/watch modelroutes in its namespace): two ModelRoutes' status lists public
names; the gateway lists both routes' names in /v1/models (a conflicting name owned by the older route) and
forwards requests to the route's router with the client's Authorization.

Stand-ins: `StandInRouteRouter`, a tiny aiohttp server standing in for a route's router (it records what it
receives). The route routers' Service DNS names do not resolve outside a cluster, so the in-process gateway's URL
function is pointed at the stand-ins; the URLs it builds in a cluster are checked in
tests/unit/router/test_gateway.py against the operator's builders. The `loraplane router --gateway` process
itself (with the chart's RBAC) serves /v1/models.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import sys
import time

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from loraplane.router.replicas import ReplicaPool
from loraplane.router.server import Router
from loraplane.router.service import RouterService
from support.chart_rendering import objects
from support.kube import rbac_token

pytestmark = [pytest.mark.apiserver, pytest.mark.timeout(180)]

G, V = "loraplane.io", "v1alpha1"


class StandInRouteRouter:
    """Stands in for one route's router: answers completions with its route's name and records each request."""

    def __init__(self, route: str):
        self.route = route
        self.received: list[tuple[bytes, dict]] = []
        self.server: TestServer | None = None

    async def complete(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append((body, dict(request.headers)))
        return web.json_response({"id": "x", "route": self.route, "choices": [{"text": "ok"}]},
                                 headers={"X-Loraplane-Backend": f"{self.route}-served"})

    async def start(self) -> "StandInRouteRouter":
        app = web.Application()
        app.router.add_post("/v1/completions", self.complete)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return self

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


def gateway_kubeconfig(kube_cluster, kube_api, namespace: str, tmp_path):
    """The chart's gateway ServiceAccount, Role and RoleBinding, created in `namespace`; a kubeconfig of its token."""
    manifests = [o for o in objects({"gateway": {"enabled": True, "namespace": namespace}})
                 if (o["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "gateway"
                 and o["kind"] in ("ServiceAccount", "Role", "RoleBinding")]
    token = rbac_token(kube_api, namespace, manifests)
    return kube_cluster.kubeconfig_for_token(token, tmp_path / "gateway.kubeconfig")


def route_doc(name: str) -> dict:
    return {"apiVersion": f"{G}/{V}", "kind": "ModelRoute", "metadata": {"name": name},
            "spec": {"baseModel": {"name": "org/tiny"}}}


async def wait_until(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not reached"
        await asyncio.sleep(0.1)


async def listing(client: aiohttp.ClientSession, url: str) -> dict[str, str] | None:
    try:
        async with client.get(url + "/v1/models") as resp:
            if resp.status != 200:
                return None
            return {m["id"]: m["owned_by"] for m in (await resp.json())["data"]}
    except aiohttp.ClientError:
        return None


async def test_gateway_serves_every_routes_names_and_forwards_with_the_clients_key(
        kube_cluster, kube_api, namespace, tmp_path, monkeypatch):
    from kubernetes import client

    custom = client.CustomObjectsApi(kube_api)
    kubeconfig = gateway_kubeconfig(kube_cluster, kube_api, namespace, tmp_path)

    # The chart's Role reads ModelRoutes and nothing else.
    from kubernetes import config
    with config.new_client_from_config(config_file=str(kubeconfig)) as gw_api:
        with pytest.raises(client.ApiException) as err:
            client.CoreV1Api(gw_api).list_namespaced_config_map(namespace)
        assert err.value.status == 403
        with pytest.raises(client.ApiException) as err:
            client.CustomObjectsApi(gw_api).patch_namespaced_custom_object_status(
                G, V, namespace, "modelroutes", "support", {"status": {}})
        assert err.value.status == 403
        with pytest.raises(client.ApiException) as err:   # not another namespace's routes
            client.CustomObjectsApi(gw_api).list_namespaced_custom_object(G, V, "default", "modelroutes")
        assert err.value.status == 403

    # Two routes; `support` is the older, so it owns `shared`. Status as the operator writes it.
    custom.create_namespaced_custom_object(G, V, namespace, "modelroutes", route_doc("support"))
    await asyncio.sleep(1.1)   # creationTimestamp has one-second resolution
    custom.create_namespaced_custom_object(G, V, namespace, "modelroutes", route_doc("sql"))
    custom.patch_namespaced_custom_object_status(G, V, namespace, "modelroutes", "support", {"status": {
        "models": [{"name": "support-bot", "ready": True}, {"name": "shared", "ready": True}],
        "contentModels": [{"name": "auto", "default": "support-bot"}]}})
    custom.patch_namespaced_custom_object_status(G, V, namespace, "modelroutes", "sql", {"status": {
        "models": [{"name": "sql-gen", "ready": True}, {"name": "shared", "ready": True}]}})

    # 1. The `loraplane router --gateway` process, with the chart's RBAC: /v1/models lists both routes' names.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loraplane.router", "--gateway", "--namespace", namespace, "--kubeconfig",
        str(kubeconfig), "--host", "127.0.0.1", "--port", str(port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env={**os.environ})
    try:
        async with aiohttp.ClientSession() as c:
            expected = {"support-bot": "support", "shared": "support", "auto": "support", "sql-gen": "sql"}
            got = await wait_until(lambda: listing(c, f"http://127.0.0.1:{port}"), what="the gateway's listing")
            assert got == expected
            async with c.get(f"http://127.0.0.1:{port}/readyz") as resp:
                assert resp.status == 200
    finally:
        proc.terminate()
        out = (await asyncio.wait_for(proc.communicate(), 20))[0].decode()
    assert proc.returncode == 0, out
    assert "'shared' of ModelRoute" in out and "older route support" in out, out   # the conflict is logged

    # 2. In process, with the route routers' URLs pointed at stand-ins: forwarding, and changes through the watch.
    stand_ins = {r: await StandInRouteRouter(r).start() for r in ("support", "sql")}
    monkeypatch.setattr("loraplane.router.gateway.router_url", lambda route, ns: stand_ins[route].url)
    from loraplane.router.forward import ForwardingConnection
    router = Router(ReplicaPool(), rng=random.Random(1), connection_class=ForwardingConnection)
    service = RouterService(router, gateway=(namespace, None), kubeconfig=kubeconfig, host="127.0.0.1", port=0)
    await service.start()
    try:
        async with aiohttp.ClientSession(base_url=service.url) as c:
            await wait_until(lambda: listing(c, ""), what="the in-process gateway's table")
            body = b'{"model": "sql-gen", "prompt": "select 1", "max_tokens": 2}'
            async with c.post("/v1/completions", data=body, headers={
                    "Authorization": "Bearer client-key", "X-User": "u1", "Content-Type": "application/json"}) as r:
                assert r.status == 200 and (await r.json())["route"] == "sql"
                assert r.headers["X-Loraplane-Backend"] == "sql-served"
            sent, headers = stand_ins["sql"].received[-1]
            assert sent == body and headers["Authorization"] == "Bearer client-key" and headers["X-User"] == "u1"
            async with c.post("/v1/completions", json={"model": "shared", "prompt": "p"}) as r:
                assert (await r.json())["route"] == "support"       # the older route's
            assert "Authorization" not in stand_ins["support"].received[-1][1]

            # A new name on a route arrives through the watch; a deleted route's names go, and `shared` passes
            # to the route that still publishes it.
            custom.patch_namespaced_custom_object_status(G, V, namespace, "modelroutes", "sql", {"status": {
                "models": [{"name": "sql-gen"}, {"name": "shared"}, {"name": "sql-explain"}]}})
            await wait_until(lambda: _has(c, "sql-explain"), what="a new public name")
            custom.delete_namespaced_custom_object(G, V, namespace, "modelroutes", "support")
            got = await wait_until(lambda: _without(c, "support-bot"), what="a deleted route's names to go")
            assert got == {"sql-gen": "sql", "shared": "sql", "sql-explain": "sql"}
            async with c.post("/v1/completions", json={"model": "shared", "prompt": "p"}) as r:
                assert (await r.json())["route"] == "sql"
            async with c.post("/v1/completions", json={"model": "support-bot", "prompt": "p"}) as r:
                assert r.status == 404
    finally:
        await service.stop()
        for s in stand_ins.values():
            await s.server.close()


async def _has(c, name):
    got = await listing(c, "")
    return got if got and name in got else None


async def _without(c, name):
    got = await listing(c, "")
    return got if got is not None and name not in got else None
