"""Live figures for rollout analysis: the operator reads each router pod's Prometheus `/metrics` and keeps, per
served name (an adapter version), the requests answered, the 5xx answers and the duration and time-to-first-token
histograms (router/metrics.py exports them per public model and backend; the figures are summed over public
models). builders.rollout turns two readings into a window and judges it.

Routers are read directly, not through a Prometheus server: rollouts then work in every cluster the operator
runs in, and the window is exactly the one the decision asks for. The router's port serves /metrics without an
API key (router/dispatch.py) and router pods have no NetworkPolicy of ours (builders.modelroute renders one for
the engine pods only), so the operator reaches it. What a router answers is untrusted: at most MAX_METRICS_BYTES
within TIMEOUT_SECONDS, parsed by prometheus-client's text parser; a router that cannot be read is left out of
the reading (its counters join the next window whole, as a restarted router's would).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from loraplane.api.paths import ROUTER_PORT
from loraplane.builders.rollout import Counts, Window
from loraplane.controllers.reports import pod_address
from loraplane.storage.httpbody import read_bounded

log = logging.getLogger("loraplane.operator.rollout")

MAX_METRICS_BYTES = 8 * 1024 * 1024
TIMEOUT_SECONDS = 3.0
REQUESTS = "loraplane_router_requests"
DURATION = "loraplane_router_request_duration_seconds"
TTFT = "loraplane_router_time_to_first_token_seconds"

# One router's reading: served name -> Counts. A reading of several routers: router pod name -> that.
Reading = dict[str, Counts]


def parse_router_metrics(text: str, served_names: Iterable[str]) -> Reading:
    """The Counts of each of `served_names` in one router's /metrics text (summed over public models); a name
    the router has not counted is left out. Raises ValueError when the text is not Prometheus exposition."""
    wanted = set(served_names)
    requests: dict[str, float] = {}
    errors: dict[str, float] = {}
    buckets: dict[tuple[str, str], dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in (REQUESTS, DURATION, TTFT):
            continue
        for sample in family.samples:
            backend = sample.labels.get("backend", "")
            if backend not in wanted:
                continue
            if family.name == REQUESTS:
                if not sample.name.endswith("_total"):
                    continue
                requests[backend] = requests.get(backend, 0) + sample.value
                code = sample.labels.get("code", "")
                if code.isdigit() and 500 <= int(code) <= 599:
                    errors[backend] = errors.get(backend, 0) + sample.value
            elif sample.name.endswith("_bucket"):
                le = float(sample.labels.get("le", "nan"))
                per = buckets.setdefault((family.name, backend), {})
                per[le] = per.get(le, 0) + sample.value
    out: Reading = {}
    for name in wanted:
        if name not in requests and (DURATION, name) not in buckets:
            continue
        out[name] = Counts(requests.get(name, 0), errors.get(name, 0),
                           tuple(sorted(buckets.get((DURATION, name), {}).items())),
                           tuple(sorted(buckets.get((TTFT, name), {}).items())))
    return out


def window_between(earlier: dict[str, Reading], later: dict[str, Reading], candidate: str, stable: str | None,
                   seconds: float) -> Window:
    """The window between two readings of the routers (router pod -> Reading): per router the later counts less
    the earlier ones (`Counts.minus`: a router that restarted or appeared counts whole), summed over routers."""
    def total(name: str) -> Counts:
        acc = Counts()
        for pod, reading in later.items():
            now = reading.get(name)
            if now is not None:
                acc = acc.plus(now.minus(earlier.get(pod, {}).get(name)))
        return acc
    return Window(candidate=total(candidate), stable=total(stable) if stable else None, seconds=seconds)


async def read_metrics(session: aiohttp.ClientSession, url: str) -> str:
    """GET a router's /metrics, at most MAX_METRICS_BYTES. Raises aiohttp.ClientError / asyncio.TimeoutError
    (unreachable), storage.httpbody.BodyTooLarge (a ValueError)."""
    async with session.get(url, allow_redirects=False) as resp:
        resp.raise_for_status()
        body = await read_bounded(resp, MAX_METRICS_BYTES, url)
    return body.decode("utf-8", errors="replace")


def metrics_url(ip: str, port: int = ROUTER_PORT) -> str:
    """The router's /metrics URL at `ip` (IPv6 literals bracketed)."""
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}/metrics"


class RouterMetricsReader:
    """Reads the routers' metrics for rollouts. `port`: the router's port (tests use another)."""

    def __init__(self, port: int = ROUTER_PORT, timeout: float = TIMEOUT_SECONDS):
        self.port = port
        self.timeout = timeout

    async def read(self, pods: list[dict], served_names: list[str]) -> dict[str, Reading]:
        """Router pod name -> Reading of `served_names`, for each running pod of `pods` that answered."""
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
            results = await asyncio.gather(*(self._one(session, pod, served_names) for pod in pods))
        return {name: reading for name, reading in results if reading is not None}

    async def _one(self, session: aiohttp.ClientSession, pod: dict, served_names: list[str]):
        name = (pod.get("metadata") or {}).get("name") or ""
        ip = pod_address(pod)
        if not ip:
            return name, None
        try:
            text = await read_metrics(session, metrics_url(ip, self.port))
            return name, parse_router_metrics(text, served_names)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            log.info("router pod %s: metrics not read for rollout analysis: %s", name, exc)
            return name, None


__all__ = ["MAX_METRICS_BYTES", "RouterMetricsReader", "metrics_url", "parse_router_metrics", "window_between"]
