"""Starting a real router (RouterService on a free port) in front of stub or real replicas, in-process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from loraplane.router.replicas import ReplicaPool, parse_replica_arg
from loraplane.router.auth import ApiKeys
from loraplane.router.server import Router
from loraplane.router.service import RouterService


def table_json(models: dict[str, list[tuple[str, int]]], base: str = "base", generation: int = 1,
               **router) -> str:
    """A ServingTable: public name -> [(served name, weight)]; the served name `base` is the base model."""
    return json.dumps({
        "route": "r", "generation": generation, "base_model": "tiny", "served_model_name": base,
        "max_lora_rank": 16, "max_loras": 4,
        "models": [{"name": name, "backends": [{"served_name": s, "adapter": None if s == base else s, "weight": w}
                                               for s, w in backends]}
                   for name, backends in models.items()],
        "router": router})


@contextlib.asynccontextmanager
async def running_router(tmp_path: Path, replica_specs: list[str], table: str, *, api_keys: Path | None = None,
                         seed: int = 7, poll_interval: float = 0.1, access_log: bool = True, **limits):
    """Yields (service, client session). The table is a real file, so hot reload is the real code path.
    `limits` are the Router's client connection limits (max_connections, header_timeout, ...)."""
    table_path = tmp_path / "serving.json"
    table_path.write_text(table)
    pool = ReplicaPool(poll_interval=poll_interval)
    pool.set_replicas([parse_replica_arg(s) for s in replica_specs])
    router = Router(pool, api_keys=ApiKeys(api_keys) if api_keys else None, connect_timeout=1.0,
                    access_log=access_log, rng=random.Random(seed), **limits)
    service = RouterService(router, table_path=table_path, host="127.0.0.1", port=0, reload_interval=0.05,
                            drain_seconds=5)
    await service.start()
    try:
        async with aiohttp.ClientSession(base_url=service.url) as client:
            yield service, client
    finally:
        await service.stop()


async def metric_samples(client) -> dict[tuple, float]:
    """The router's /metrics (through `client`, an aiohttp session on it) as {(sample name, labels): value}, the
    labels as `labels(...)` spells them."""
    async with client.get("/metrics") as resp:
        text = await resp.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def labels(**kw) -> tuple:
    """A sample's labels as `metric_samples` keys them."""
    return tuple(sorted(kw.items()))


async def wait_for(predicate, timeout=15.0):  # generous: CI machines are busy
    """Poll `predicate` every 20 ms until it is true; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


def keys_dir(tmp_path: Path, key: str) -> Path:
    """A --api-keys-file directory under `tmp_path` holding one key (the router reads every file in it)."""
    d = tmp_path / "keys"
    d.mkdir()
    (d / "k").write_text(key + "\n")
    return d
