"""The report relay: the operator reads each engine pod's ReplicaReport from its loader's `/status` and writes it
into that pod's `loraplane.io/adapters` annotation (REPORT_ANNOTATION), where the controllers read it.

Why the operator writes the annotation and not the loader: a pod can only annotate its own Pod through RBAC that
grants `patch pods` on the whole namespace (a Role cannot name pods whose names are generated), and that token
would let code running in an engine pod (vLLM executes model code) rewrite every other pod of the namespace. With
the relay the engine pods' ServiceAccount may only read its route's ConfigMap (docs/security.md, "What the
operator grants").

What a loader answers is untrusted: at most MAX_REPORT_BYTES are read within TIMEOUT_SECONDS, the body must be
a valid ReplicaReport, and its `replica` is replaced by the name of the pod it was read from (a loader cannot
report for another pod). The address is the pod's `status.podIP` from the operator's own watch.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from pydantic import ValidationError

from loraplane.api.wire.serving import LOADER_PORT, REPORT_ANNOTATION, ReplicaReport
from loraplane.kube.client import ApiError, KubeClient
from loraplane.kube.informer import Store

log = logging.getLogger("loraplane.operator.reports")

# Bounds on what one loader can make the operator read or wait for. A report lists a replica's adapters with
# bounded messages; 256 KiB is also the API server's limit on all annotations of an object together.
MAX_REPORT_BYTES = 256 * 1024
TIMEOUT_SECONDS = 3.0
# Seconds between two reads of the same pod: how late the operator's status may be behind a loader.
DEFAULT_INTERVAL_SECONDS = 5.0
CONCURRENCY = 16
POD_RUNNING = "Running"  # core/v1 PodPhase


class ReportTooLarge(ValueError):
    """A loader answered more than MAX_REPORT_BYTES."""


def pod_address(pod: dict) -> str | None:
    """The pod's IP while it runs and is not being deleted (status.podIP), else None."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp") or status.get("phase") != POD_RUNNING:
        return None
    ip = status.get("podIP")
    return ip if isinstance(ip, str) and ip else None


def status_url(ip: str, port: int = LOADER_PORT) -> str:
    """The loader's /status URL at `ip` (IPv6 literals bracketed)."""
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}/status"


async def read_report(session: aiohttp.ClientSession, url: str, replica: str) -> ReplicaReport:
    """GET a loader's /status; the report with `replica` set to the pod it was read from. Raises
    aiohttp.ClientError / asyncio.TimeoutError (unreachable), ReportTooLarge, or ValueError (not a report)."""
    async with session.get(url, allow_redirects=False) as resp:
        resp.raise_for_status()
        if (resp.content_length or 0) > MAX_REPORT_BYTES:
            raise ReportTooLarge(f"{url}: {resp.content_length} bytes")
        body = await resp.content.read(MAX_REPORT_BYTES + 1)
    if len(body) > MAX_REPORT_BYTES:
        raise ReportTooLarge(f"{url}: more than {MAX_REPORT_BYTES} bytes")
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
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                # A loader still starting, or one that answers nonsense: the pod keeps its last report.
                log.debug("no report from pod %s/%s: %s", ns, name, exc)
                return False
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
