"""The operator's report relay (issue 12 item 3): the engine pods' loaders no longer annotate their own Pod (that
needed `patch pods` on the whole namespace); the operator reads each loader's /status and writes the annotation.
What a loader answers is untrusted: size-bounded, validated, and bound to the pod it was read from."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import web

from loraplane.api.wire.serving import (
    REPORT_ANNOTATION,
    REPORT_MAX_BYTES,
    STATUS_BOUNDED_QUERY,
    AdapterReport,
    ReplicaReport,
)
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
    assert status_url("fd00::1") == f"http://[fd00::1]:8081/status?{STATUS_BOUNDED_QUERY}"


def test_only_an_ip_address_in_pod_status_becomes_a_url():
    """Issue 12 review: status.podIP went into the relay's URL as written; whoever may patch pods/status could
    make the operator fetch a host name, a path or another port (`metadata.google.internal/x#`)."""
    def at(ip):
        p = pod("p")
        return pod_address({**p, "status": {**p["status"], "podIP": ip}})

    assert at("fd00::1") == "fd00::1" and at("10.1.2.3") == "10.1.2.3"
    for bad in ("metadata.google.internal", "10.0.0.1:9000", "10.0.0.1/x#", "u@10.0.0.1", " 10.0.0.1", 7, None):
        assert at(bad) is None, bad


def many(n: int, message: str = "loaded from s3://bucket/adapters/team/adapter/v1/ in 3.21s (fetch 2.10s)") -> ReplicaReport:
    ads = {f"team-adapter-{i:05d}--v1": AdapterReport(state="Ready", reason="Loaded", message=message, since=T,
                                                      attempts=1, sha256="ab" * 32) for i in range(n)}
    return ReplicaReport(replica="p", route="chat", generation=3, engine_ready=True, adapters=ads, updated_at=T)


async def piecewise_server(body: bytes, piece: int = 8192, content_length: bool = True):
    """A loader whose answer arrives in several network reads (pieces written a few ms apart), as on a pod
    network where a body larger than the TCP window takes more than one round trip."""
    app = web.Application()
    async def status(request):
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        if content_length:
            resp.content_length = len(body)
        await resp.prepare(request)
        for i in range(0, len(body), piece):
            await resp.write(body[i:i + piece])
            await asyncio.sleep(0.003)
        await resp.write_eof()
        return resp
    app.router.add_get("/status", status)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


async def relay_from(runner_port, *pods: dict, relay: ReportRelay | None = None) -> FakeKube:
    runner, port = runner_port
    kube, store = FakeKube(), Store()
    for p in pods:
        store.put(p)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
            r = relay or ReportRelay(kube, store, port=port)
            r.kube, r.pods, r.port = kube, store, port
            await r.relay_once(session)
    finally:
        await runner.cleanup()
    return kube


async def test_a_report_that_arrives_in_several_network_reads_is_relayed_whole():
    # Before: one content.read() returned only the first piece, and 22 KB and larger reports were refused as
    # "not a replica report" on any real network.
    for n in (30, 120, 600):
        for content_length in (True, False):
            body = many(n).model_dump_json(exclude_none=True).encode()
            kube = await relay_from(await piecewise_server(body, content_length=content_length), pod("p"))
            assert len(kube.patches) == 1, (n, content_length, len(body))
            written = ReplicaReport.model_validate_json(kube.patches[0][2]["metadata"]["annotations"][REPORT_ANNOTATION])
            assert len(written.adapters) == n


async def test_a_full_report_larger_than_an_annotation_is_relayed_trimmed():
    # An older loader answers its full report: 1,000 Ready adapters are ~400 KB, over the old 256 KiB cap; the
    # relay reads it (in pieces) and writes the bounded annotation.
    report = many(1000, message="m" * 300)
    body = report.model_dump_json(exclude_none=True).encode()
    assert REPORT_MAX_BYTES < len(body) < MAX_REPORT_BYTES
    kube = await relay_from(await piecewise_server(body, piece=16384), pod("p"))
    value = kube.patches[0][2]["metadata"]["annotations"][REPORT_ANNOTATION]
    assert len(value.encode()) <= REPORT_MAX_BYTES
    assert len(ReplicaReport.model_validate_json(value).adapters) == 1000


async def test_a_body_over_the_cap_without_content_length_is_refused_while_streaming():
    huge = b'{"replica": "x", "pad": "' + b"x" * MAX_REPORT_BYTES + b'"}'
    kube = await relay_from(await piecewise_server(huge, piece=1 << 20, content_length=False), pod("p"))
    assert kube.patches == []


async def test_the_loader_serves_the_bounded_form_when_the_relay_asks():
    from loraplane.loader import server

    class FakeLoader:
        def report(self):
            return many(3000)
    app = web.Application()
    app[server.LOADER_KEY] = FakeLoader()
    app.router.add_get("/status", server.status)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/status") as resp:
                full = await resp.read()
            async with session.get(status_url("127.0.0.1", port)) as resp:
                bounded = await resp.read()
    finally:
        await runner.cleanup()
    assert len(ReplicaReport.model_validate_json(full).adapters) == 3000     # the router's view: everything
    assert len(bounded) <= REPORT_MAX_BYTES < len(full)
    ReplicaReport.model_validate_json(bounded)


async def test_a_refused_report_is_logged_at_warning_once_per_interval(caplog):
    relay = ReportRelay(FakeKube(), Store())
    with caplog.at_level(logging.DEBUG, logger="loraplane.operator.reports"):
        for _ in range(3):
            await relay_from(await piecewise_server(b'{"not": "a report"}'), pod("p"), relay=relay)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "ml/p" in warnings[0].getMessage()
