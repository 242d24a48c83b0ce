"""The operator's report relay (issue 12 item 3): the engine pods' loaders no longer annotate their own Pod (that
needed `patch pods` on the whole namespace); the operator reads each loader's /status and writes the annotation.
What a loader answers is untrusted: size-bounded, validated, and bound to the pod it was read from."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from loraplane.api.wire.serving import REPORT_ANNOTATION, AdapterReport, ReplicaReport
from loraplane.controllers.reports import MAX_REPORT_BYTES, ReportRelay, pod_address, status_url
from loraplane.kube.informer import Store

T = "2026-01-01T00:00:00Z"


class FakeKube:
    def __init__(self):
        self.patches: list[tuple[str, str, dict]] = []

    async def merge_patch(self, api_version, kind, namespace, name, patch):
        assert (api_version, kind) == ("v1", "Pod")
        self.patches.append((namespace, name, patch))
        return {}


def pod(name: str, ip: str | None = "127.0.0.1", phase: str = "Running", annotation: str | None = None) -> dict:
    meta = {"name": name, "namespace": "ml", "labels": {"loraplane.io/route": "chat"}}
    if annotation:
        meta["annotations"] = {REPORT_ANNOTATION: annotation}
    return {"metadata": meta, "status": {"phase": phase, **({"podIP": ip} if ip else {})}}


async def loader_server(body: bytes) -> tuple[web.AppRunner, int]:
    app = web.Application()
    async def status(_):
        return web.Response(body=body, content_type="application/json")
    app.router.add_get("/status", status)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


async def relay_with(body: bytes, *pods: dict) -> FakeKube:
    runner, port = await loader_server(body)
    kube, store = FakeKube(), Store()
    for p in pods:
        store.put(p)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
            await ReportRelay(kube, store, port=port).relay_once(session)
    finally:
        await runner.cleanup()
    return kube


async def test_the_operator_writes_the_loaders_report_into_its_pod_bound_to_that_pod():
    # The loader claims to be another replica: the report is written for the pod it was read from.
    report = ReplicaReport(replica="someone-else", route="chat", generation=3, engine_ready=True, updated_at=T,
                           adapters={"a--1": AdapterReport(state="Ready", reason="Loaded", since=T)})
    kube = await relay_with(report.model_dump_json().encode(), pod("chat-engine-1"), pod("starting", ip=None),
                            pod("done", phase="Succeeded"))
    assert [(ns, name) for ns, name, _ in kube.patches] == [("ml", "chat-engine-1")]
    written = ReplicaReport.model_validate_json(kube.patches[0][2]["metadata"]["annotations"][REPORT_ANNOTATION])
    assert written.replica == "chat-engine-1" and written.adapters["a--1"].state == "Ready"
    # Unchanged: no second write.
    value = kube.patches[0][2]["metadata"]["annotations"][REPORT_ANNOTATION]
    assert (await relay_with(report.model_dump_json().encode(),
                             pod("chat-engine-1", annotation=value))).patches == []


async def test_an_oversized_or_invalid_answer_is_not_written():
    huge = b'{"replica": "x", "route": "chat", "pad": "' + b"x" * MAX_REPORT_BYTES + b'"}'
    assert (await relay_with(huge, pod("p"))).patches == []
    assert (await relay_with(b'{"not": "a report"}', pod("p"))).patches == []


def test_addresses():
    assert pod_address(pod("p")) == "127.0.0.1"
    assert pod_address({**pod("p"), "metadata": {"deletionTimestamp": T}}) is None
    assert status_url("fd00::1") == "http://[fd00::1]:8081/status"
