"""The router's ConfigMap source against the real kube-apiserver: table changes arrive through a watch."""

from __future__ import annotations

import asyncio
import random
import time

import aiohttp
import pytest

from loraplane.router.replicas import ReplicaPool, parse_replica_arg
from loraplane.router.server import Router
from loraplane.router.service import RouterService
from loraplane.api.wire.serving import CONFIGMAP_KEY, configmap_name
from support.router_running import table_json
from support.router_stubs import StubReplica

pytestmark = [pytest.mark.apiserver, pytest.mark.timeout(120)]


async def test_configmap_watch_reloads_within_seconds(kube_cluster, kube_api):
    from kubernetes import client

    core = client.CoreV1Api(kube_api)
    name = configmap_name("watched")
    body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name),
                              data={CONFIGMAP_KEY: table_json({"chat": [("v1", 100)]})})
    core.create_namespaced_config_map("default", body)
    stub = await StubReplica("a", adapters={"v1", "v2"}).start()
    pool = ReplicaPool(poll_interval=0.2)
    pool.set_replicas([parse_replica_arg(stub.spec)])
    service = RouterService(Router(pool, rng=random.Random(1)), configmap=("default", name),
                            kubeconfig=kube_cluster.kubeconfig, host="127.0.0.1", port=0)
    try:
        await service.start()
        async with aiohttp.ClientSession(base_url=service.url) as c:
            deadline = time.monotonic() + 20
            while service.router.table is None:  # the first list arrives through the watch thread
                assert time.monotonic() < deadline, "table never arrived from the ConfigMap"
                await asyncio.sleep(0.05)
            async with c.post("/v1/completions", json={"model": "chat", "prompt": "p"}) as resp:
                assert resp.headers["X-Loraplane-Backend"] == "v1"
            changed = time.monotonic()
            core.patch_namespaced_config_map(name, "default", {"data": {
                CONFIGMAP_KEY: table_json({"chat": [("v2", 100)]}, generation=2)}})
            while service.router.table.source.generation != 2:
                assert time.monotonic() - changed < 10, "ConfigMap change not seen"
                await asyncio.sleep(0.02)
            print(f"\nConfigMap change reached the router in {time.monotonic() - changed:.2f}s")
            async with c.post("/v1/completions", json={"model": "chat", "prompt": "p"}) as resp:
                assert resp.headers["X-Loraplane-Backend"] == "v2"
            # A broken table in the ConfigMap is refused; the working one stays.
            core.patch_namespaced_config_map(name, "default", {"data": {CONFIGMAP_KEY: '{"route": 1}'}})
            await asyncio.sleep(1.0)
            assert service.router.table.source.generation == 2
    finally:
        await service.stop()
        await stub.stop()
        core.delete_namespaced_config_map(name, "default")
