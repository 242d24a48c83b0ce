"""The report relay: the operator reads each engine pod's ReplicaReport from its loader's `/status` and writes it
into that pod's `loraplane.io/adapters` annotation (REPORT_ANNOTATION), where the controllers read it.

Why the operator writes the annotation and not the loader: a pod can only annotate its own Pod through RBAC that
grants `patch pods` on the whole namespace (a Role cannot name pods whose names are generated), and that token
would let code running in an engine pod (vLLM executes model code) rewrite every other pod of the namespace. With
the relay the engine pods' ServiceAccount may only read its route's ConfigMap (docs/security.md, "What the
operator grants").

What a loader answers is untrusted: at most MAX_REPORT_BYTES are read (to the end of the stream, over as many
network reads as it takes) within TIMEOUT_SECONDS, the body must be a valid ReplicaReport, and its `replica` is replaced by the name of the pod it was read from (a loader cannot
report for another pod). The address is the pod's `status.podIP` from the operator's own watch.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time

import aiohttp
from pydantic import ValidationError

from loraplane.api.wire.serving import (
    LOADER_PORT,
    REPORT_ANNOTATION,
    REPORT_MAX_BYTES,
    STATUS_BOUNDED_QUERY,
    STATUS_MAX_BYTES,
    ReplicaReport,
)
from loraplane.kube.client import ApiError, KubeClient
from loraplane.kube.informer import Store
from loraplane.storage.httpbody import read_bounded

log = logging.getLogger("loraplane.operator.reports")

# Bounds on what one loader can make the operator read or wait for. The relay asks for the bounded form of the
# report (STATUS_BOUNDED_QUERY: ReplicaReport.to_annotation, at most REPORT_MAX_BYTES = 192 KiB); a loader of an
# older version answers its full report, whose size grows with its adapters (about 370 bytes per Ready adapter,
# up to ~4.2 KB per adapter with a REPORT_MESSAGE_CHARS message). 4 MiB covers 1,000 adapters with the longest
# messages, or ~11,000 Ready ones, and bounds the relay's memory to CONCURRENCY x 4 MiB = 64 MiB.
MAX_REPORT_BYTES = STATUS_MAX_BYTES
assert MAX_REPORT_BYTES > REPORT_MAX_BYTES
TIMEOUT_SECONDS = 3.0
# Seconds between two reads of the same pod: how late the operator's status may be behind a loader.
DEFAULT_INTERVAL_SECONDS = 5.0
CONCURRENCY = 16
POD_RUNNING = "Running"  # core/v1 PodPhase
# A pod whose loader answers something that is not a report is logged at warning at most this often (seconds).
REFUSED_LOG_INTERVAL_SECONDS = 300.0


def pod_address(pod: dict) -> str | None:
    """The pod's IP while it runs and is not being deleted (status.podIP, which must be an IP address), else
    None."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp") or status.get("phase") != POD_RUNNING:
        return None
    ip = status.get("podIP")
    # status.podIP is written by the kubelet, but whoever may patch pods/status can write anything there: only
    # an IP address becomes part of the URL the operator fetches (never a host name, path or userinfo).
    try:
        return str(ipaddress.ip_address(ip)) if isinstance(ip, str) and ip else None
    except ValueError:
        return None


def status_url(ip: str, port: int = LOADER_PORT) -> str:
    """The loader's /status URL at `ip` (IPv6 literals bracketed), asking for the bounded report
    (STATUS_BOUNDED_QUERY); a loader that does not know the query answers its full report."""
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}/status?{STATUS_BOUNDED_QUERY}"


async def read_report(session: aiohttp.ClientSession, url: str, replica: str) -> ReplicaReport:
    """GET a loader's /status; the report with `replica` set to the pod it was read from. Raises
    aiohttp.ClientError / asyncio.TimeoutError (unreachable), storage.httpbody.BodyTooLarge (a ValueError), or ValueError (not a report)."""
    async with session.get(url, allow_redirects=False) as resp:
        resp.raise_for_status()
        body = await read_bounded(resp, MAX_REPORT_BYTES, url)
    try:
        report = ReplicaReport.model_validate_json(body)
    except ValidationError as exc:
        raise ValueError(f"{url}: not a replica report: {exc.error_count()} errors") from exc
    return report.model_copy(update={"replica": replica})


class ReportRelay:
    """Copies every engine pod's loader report into the pod's REPORT_ANNOTATION, every `interval` seconds.

    `pods` is the operator's EnginePod store (read only); `port` is the loader's port (tests use another)."""

    def __init__(self, kube: KubeClient, pods: Store, interval: float = DEFAULT_INTERVAL_SECONDS,
                 port: int = LOADER_PORT):
        self.kube = kube
        self.pods = pods
        self.interval = interval
        self.port = port
        self._limit = asyncio.Semaphore(CONCURRENCY)
        # (namespace, pod) -> monotonic time its refused report was last logged at warning.
        self._refused_logged: dict[tuple[str, str], float] = {}

    async def relay_once(self, session: aiohttp.ClientSession) -> int:
        """Read every running engine pod's report once; returns how many annotations were written."""
        results = await asyncio.gather(*(self._relay(session, pod) for pod in list(self.pods.objects.values())))
        return sum(results)

    async def _relay(self, session: aiohttp.ClientSession, pod: dict) -> bool:
        ip = pod_address(pod)
        meta = pod.get("metadata") or {}
        ns, name = meta.get("namespace"), meta.get("name")
        if not ip or not ns or not name:
            return False
        async with self._limit:
            try:
                report = await read_report(session, status_url(ip, self.port), name)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                # A loader still starting: the pod keeps its last report.
                log.debug("no report from pod %s/%s: %s", ns, name, exc)
                return False
            except ValueError as exc:
                # An answer that is too large or not a report: the pod keeps its last report, and its adapters'
                # status goes stale, so say so (once per REFUSED_LOG_INTERVAL_SECONDS per pod).
                self._log_refused(ns, name, exc)
                return False
            self._refused_logged.pop((ns, name), None)
            value = report.to_annotation()
            if (meta.get("annotations") or {}).get(REPORT_ANNOTATION) == value:
                return False
            try:
                await self.kube.merge_patch("v1", "Pod", ns, name,
                                            {"metadata": {"annotations": {REPORT_ANNOTATION: value}}})
            except ApiError as exc:   # the pod is gone, or the server refused: the next pass tries again
                log.info("could not annotate pod %s/%s with its report: %s", ns, name, exc)
                return False
            return True

    def _log_refused(self, ns: str, name: str, exc: Exception) -> None:
        now = time.monotonic()
        last = self._refused_logged.get((ns, name))
        if last is not None and now - last < REFUSED_LOG_INTERVAL_SECONDS:
            log.debug("report of pod %s/%s refused: %s", ns, name, exc)
            return
        if len(self._refused_logged) > 4 * CONCURRENCY * 64:   # forget pods long gone (bounded memory)
            self._refused_logged.clear()
        self._refused_logged[(ns, name)] = now
        log.warning("report of pod %s/%s refused, its adapters' status is not updated: %s", ns, name, exc)

    async def run(self) -> None:
        """Relay forever (until cancelled)."""
        timeout = aiohttp.ClientTimeout(total=TIMEOUT_SECONDS)
        # No proxy from the environment: pod IPs are reached directly.
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
            while True:
                try:
                    await self.relay_once(session)
                except Exception as exc:  # noqa: BLE001 - one failed pass must not end the relay
                    log.warning("report relay pass failed: %s", exc)
                await asyncio.sleep(self.interval)


__all__ = ["MAX_REPORT_BYTES", "ReportRelay", "pod_address", "read_report", "status_url"]
