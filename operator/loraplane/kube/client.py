"""The project's async Kubernetes API client: get, list, watch, server-side apply, status patches, Events, as
raw JSON dicts, used by the operator's controllers, the loader, the router and the trainer (through
`BlockingKubeClient`).

Credentials and connection settings come from kubernetes_asyncio's config loaders (`loraplane.kube.config`,
the same source kopf logs in with); the requests go over one aiohttp session of this class. The library's own
transport (its ApiClient) was measured against this one with tests/bench/bench_operator.py and cost more
than 10% of settle time (docs/operator.md, "Kubernetes client"): it walks every body to sanitise it and reads
the proxy environment and ~/.netrc on every request. What this class adds: JSON dicts end to end (no model
(de)serialisation per object), label- and field-selected watches with bookmarks resumed from a
resourceVersion, server-side apply under one field manager, retries of 429/5xx, a token re-read after a 401,
and a count of every write in `loraplane_operator_api_writes_total`.

kopf watches the loraplane kinds; the children (Jobs, Pods, Deployments) are watched here because their
watches need a server-side label selector, which kopf does not send (it filters every Pod of the cluster
client-side).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import ssl
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import aiohttp
import orjson
from yarl import URL
from prometheus_client import Counter

from loraplane.api.keys import MANAGER
from loraplane.kube.config import KubeConfig

log = logging.getLogger("loraplane.kube")

API_WRITES = Counter("loraplane_operator_api_writes_total", "Write requests the operator sent to the API server",
                     ["verb", "resource"])

# Kinds the project reads or writes -> plural resource name.
PLURALS = {
    "ConfigMap": "configmaps", "ServiceAccount": "serviceaccounts", "Service": "services", "Pod": "pods",
    "Event": "events", "Role": "roles", "RoleBinding": "rolebindings", "Job": "jobs",
    "Deployment": "deployments", "PodDisruptionBudget": "poddisruptionbudgets",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers", "ScaledObject": "scaledobjects",
    "Secret": "secrets", "NetworkPolicy": "networkpolicies", "PersistentVolumeClaim": "persistentvolumeclaims",
    "FineTuneJob": "finetunejobs", "Adapter": "adapters", "ModelRoute": "modelroutes",
}

T = TypeVar("T")
# Client-side bounds of every API call (seconds). A request: the whole exchange, per attempt. A watch: getting a
# connection (pool wait, TCP and TLS) and the silence between two reads, which the server breaks at least every
# `timeoutSeconds` by ending the watch (so a dead connection is noticed and the watch restarted by its caller).
REQUEST_TIMEOUT = 60.0
WATCH_CONNECT_TIMEOUT = 30.0
WATCH_READ_GRACE = 30.0
# A Retry-After the server sends (429/5xx) is honoured up to this many seconds; one that is not a number of
# seconds (an HTTP date, garbage) counts as the default backoff.
MAX_RETRY_AFTER = 30.0


def retry_after(value: str | None, default: float) -> float:
    """Seconds to wait before a retry from a Retry-After header: its delay-seconds, capped at MAX_RETRY_AFTER
    and never negative; `default` when absent or not a number (an HTTP-date, garbage)."""
    try:
        seconds = float(value) if value is not None else default
    except ValueError:
        return default
    if seconds != seconds:   # NaN
        return default
    return max(0.0, min(MAX_RETRY_AFTER, seconds))


class WatchExpired(Exception):
    """HTTP 410 Gone: the resourceVersion is too old for a watch; LIST again."""


class ApiError(Exception):
    """An HTTP error answer of the API server: `status`, the decoded `body` (a Status object when JSON) and
    its `message`."""

    def __init__(self, status: int, body: Any, what: str):
        self.status = status
        self.body = body
        message = body.get("message") if isinstance(body, dict) else str(body)[:500]
        super().__init__(f"{what}: HTTP {status}: {message}")

    @property
    def message(self) -> str:
        """The API server's message: the Status object's `message`, else the raw body as text."""
        return self.body.get("message", "") if isinstance(self.body, dict) else str(self.body)


def resource_path(api_version: str, kind: str, namespace: str | None, name: str | None = None,
                  subresource: str | None = None) -> str:
    """The REST path of a kind's collection, or of one object (and its subresource): `/api/v1/...` for the
    core group, `/apis/<group>/<version>/...` otherwise. Raises KeyError for a kind not in PLURALS."""
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = prefix + (f"/namespaces/{namespace}" if namespace else "") + f"/{PLURALS[kind]}"
    if name:
        path += f"/{quote(name)}"
    if subresource:
        path += f"/{subresource}"
    return path


class KubeClient:
    """Async client of one API server. Objects are JSON dicts as the server sends them; list items and watch
    objects get their `apiVersion`/`kind` filled in (the server leaves them out of list items).

    Errors: `ApiError` (HTTP status >= 400 after retries; `.status`, `.message`), `WatchExpired` (HTTP 410 on
    a watch), aiohttp's ClientError/OSError for the network. Up to `concurrency` requests run at once (watches
    are not counted): a burst of 1,000 objects queues here instead of at the API server's priority and
    fairness.
    """

    def __init__(self, config: KubeConfig, concurrency: int = 32):
        self.config = config
        self._session: aiohttp.ClientSession | None = None  # created in the event loop on first use
        self._gate = asyncio.Semaphore(concurrency)

    @classmethod
    def from_environment(cls, kubeconfig: str | None = None, context: str | None = None) -> "KubeClient":
        """A client with `KubeConfig.from_environment`'s credentials (explicit kubeconfig, else in-cluster,
        else $KUBECONFIG / ~/.kube/config). Raises kubernetes_asyncio's ConfigException when none exists."""
        return cls(KubeConfig.from_environment(kubeconfig, context))

    async def close(self) -> None:
        """Close the connection pool; the client opens a new one if used again."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _send(self, method: str, path: str, params: dict | None, data: str | None, content_type: str,
                    timeout: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
        """One HTTP exchange with the API server; the caller reads and releases the response. The connection
        settings (server, CA, client certificate, TLS server name, proxy) and the Authorization header come
        from the library's Configuration."""
        cfg = await self.config.configuration()
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_ssl_context(cfg)))
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        if (auth := await self.config.authorization()) is not None:
            headers["Authorization"] = auth
        extra = {"server_hostname": cfg.tls_server_name} if cfg.tls_server_name else {}
        # The query is encoded here, once, and the URL marked as encoded: aiohttp's `params=` merges a query
        # through yarl on every request (~4% of the operator's CPU under load). Paths are built by resource_path
        # from DNS names, which need no escaping.
        url = cfg.host + path + ("?" + urlencode(params) if params else "")
        return await self._session.request(method, URL(url, encoded=True), data=data, headers=headers,
                                           timeout=timeout, proxy=cfg.proxy or None, **extra)

    async def request(self, method: str, path: str, body: Any = None, params: dict | None = None,
                      content_type: str = "application/json", what: str = "", result: bool = True) -> Any:
        """Send one request, retrying HTTP 429 and 5xx (honouring Retry-After, else 0.2 s doubling, 5 tries) and
        a 401 once after re-reading the credentials. Returns the decoded JSON body (None when empty, and always
        None with `result=False`: a write whose answer, the whole stored object with its managedFields, nobody
        reads is not decoded). Every non-GET is counted in API_WRITES. Raises ApiError."""
        data = None if body is None else orjson.dumps(body)
        if method != "GET":
            resource = path.split("?")[0].rstrip("/").split("/")
            API_WRITES.labels(method, _resource_label(resource)).inc()
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        async with self._gate:
            for attempt in range(5):
                resp = await self._send(method, path, params, data, content_type, timeout)
                async with resp:
                    raw = await resp.read()
                if resp.status == 401 and attempt == 0:  # a rotated token: read it again, once
                    await self.config.reload()
                    continue
                if resp.status == 429 or (resp.status >= 500 and attempt < 4):
                    await asyncio.sleep(retry_after(resp.headers.get("Retry-After"), 0.2 * 2 ** attempt))
                    continue
                if resp.status < 400 and not result:
                    return None
                try:
                    payload = orjson.loads(raw) if raw else None
                except ValueError:  # orjson.JSONDecodeError is a ValueError
                    payload = raw.decode(errors="replace")
                if resp.status >= 400:
                    raise ApiError(resp.status, payload, what or f"{method} {path}")
                return payload
        raise ApiError(503, "retries exhausted", what or f"{method} {path}")

    async def watch(self, api_version: str, kind: str, namespace: str | None, label_selector: str | None,
                    resource_version: str, timeout_seconds: int = 300, *, field_selector: str | None = None):
        """Yield (type, object) from `resource_version` on (ADDED, MODIFIED, DELETED, BOOKMARK) until the server
        ends the watch after `timeout_seconds`. Raises WatchExpired when the version is too old, ApiError on
        other errors."""
        params = {"watch": "true", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(timeout_seconds)}
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        timeout = aiohttp.ClientTimeout(total=None, connect=WATCH_CONNECT_TIMEOUT, sock_connect=WATCH_CONNECT_TIMEOUT,
                                        sock_read=timeout_seconds + WATCH_READ_GRACE)
        path = resource_path(api_version, kind, namespace)
        resp = await self._send("GET", path, params, None, "application/json", timeout)
        async with resp:
            if resp.status == 410:
                raise WatchExpired(path)
            if resp.status >= 400:
                raise ApiError(resp.status, await resp.text(), f"watch {path}")
            buffer = b""
            # Lines can be longer than aiohttp's readline limit (pods with large annotations): split by hand.
            async for chunk in resp.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    event = orjson.loads(line)
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        if obj.get("code") == 410:
                            raise WatchExpired(path)
                        raise ApiError(obj.get("code") or 500, obj, f"watch {path}")
                    obj.setdefault("apiVersion", api_version)
                    obj.setdefault("kind", kind)
                    yield event.get("type"), obj

    async def list(self, api_version: str, kind: str, namespace: str | None = None,
                   label_selector: str | None = None, *, field_selector: str | None = None) -> list[dict]:
        """The items of a kind (all namespaces when `namespace` is None), optionally selected."""
        return (await self.list_with_version(api_version, kind, namespace, label_selector,
                                             field_selector=field_selector))[0]

    async def list_with_version(self, api_version: str, kind: str, namespace: str | None = None,
                                label_selector: str | None = None, *,
                                field_selector: str | None = None) -> tuple[list[dict], str]:
        """The items and the list's resourceVersion (the point in time it describes, where a watch resumes)."""
        params = {}
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        out = await self.request("GET", resource_path(api_version, kind, namespace), params=params or None)
        items = out.get("items") or []
        for item in items:  # list items carry no apiVersion/kind
            item.setdefault("apiVersion", api_version)
            item.setdefault("kind", kind)
        return items, (out.get("metadata") or {}).get("resourceVersion") or ""

    async def apply(self, manifest: dict, force: bool = True, result: bool = True) -> dict | None:
        """Server-side apply under the operator's field manager; returns the stored object (None with
        `result=False`: not decoded)."""
        meta = manifest["metadata"]
        path = resource_path(manifest["apiVersion"], manifest["kind"], meta.get("namespace"), meta["name"])
        return await self.request("PATCH", path, manifest,
                                  params={"fieldManager": MANAGER, "force": "true" if force else "false"},
                                  content_type="application/apply-patch+yaml", result=result,
                                  what=f"apply {manifest['kind']} {meta.get('namespace')}/{meta['name']}")

    async def create_if_absent(self, manifest: dict) -> bool:
        """POST the object; True when it was created, False when one of that name exists already (HTTP 409, left
        unchanged). Needs only the `create` verb. The server's answer is not returned (a created Secret's
        answer holds its data). Raises ApiError otherwise."""
        meta = manifest["metadata"]
        try:
            await self.request("POST", resource_path(manifest["apiVersion"], manifest["kind"], meta.get("namespace")),
                               manifest, what=f"create {manifest['kind']} {meta.get('namespace')}/{meta['name']}")
        except ApiError as exc:
            if exc.status == 409:
                return False
            raise
        return True

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        """Delete an object with background propagation (dependents are garbage-collected afterwards); a
        404 is not an error. Raises ApiError otherwise."""
        try:
            await self.request("DELETE", resource_path(api_version, kind, namespace, name),
                               {"propagationPolicy": "Background"}, what=f"delete {kind} {namespace}/{name}")
        except ApiError as exc:
            if exc.status != 404:
                raise

    async def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict | None:
        """The object, or None on 404 (no such object, or the kind is not served); raises ApiError otherwise."""
        try:
            return await self.request("GET", resource_path(api_version, kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:  # no such object, or no such kind (a KEDA CRD that is not installed)
                return None
            raise

    async def merge_patch(self, api_version: str, kind: str, namespace: str, name: str, patch: dict,
                          result: bool = True) -> dict | None:
        """A JSON merge patch (RFC 7386) of the object; returns the object as the server stored it (None with
        `result=False`). Raises ApiError."""
        return await self.request("PATCH", resource_path(api_version, kind, namespace, name), patch,
                                  content_type="application/merge-patch+json", result=result,
                                  what=f"patch {kind} {namespace}/{name}")

    async def patch_status(self, api_version: str, kind: str, namespace: str, name: str, patch: dict) -> None:
        """A JSON merge patch of the status subresource: only the keys in `patch` change. The stored object the
        server answers with is not decoded (nobody reads it; the watch delivers it)."""
        await self.request("PATCH", resource_path(api_version, kind, namespace, name, "status"),
                           {"status": patch}, content_type="application/merge-patch+json", result=False,
                           what=f"patch {kind} {namespace}/{name} status")

    async def post_event(self, obj: dict, type_: str, reason: str, message: str, now: str) -> None:
        """Post a core/v1 Event about `obj` (message cut to 1024 characters); a failure is logged, not raised:
        an Event is informative."""
        meta = obj.get("metadata", {})
        ns = meta.get("namespace") or "default"
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name')}.", "namespace": ns},
            "involvedObject": {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"),
                               "name": meta.get("name"), "namespace": ns, "uid": meta.get("uid"),
                               "resourceVersion": meta.get("resourceVersion")},
            "type": type_, "reason": reason, "message": message[:1024],
            "source": {"component": "loraplane-operator"},
            "reportingComponent": "loraplane.io/operator", "reportingInstance": "loraplane-operator",
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        try:
            await self.request("POST", resource_path("v1", "Event", ns), event, what="post Event")
        except ApiError as exc:  # an Event is informative: losing one must not fail a reconcile
            log.warning("could not post Event %s for %s/%s: %s", reason, ns, meta.get("name"), exc)


class BlockingKubeClient:
    """A KubeClient for synchronous code (the trainer's Trainer callbacks): the async client runs on a private
    event loop in a daemon thread, and each call blocks until its coroutine is done.

        kube = BlockingKubeClient()                  # KubeClient.from_environment() credentials
        kube.patch_status(api_version, kind, ns, name, {"progress": ...})   # any KubeClient coroutine method
        kube.close()

    `watch` (an async generator) is not offered. Errors are the async client's (ApiError, WatchExpired,
    aiohttp's), raised in the calling thread; `timeout` seconds bound each call (TimeoutError).
    """

    def __init__(self, client: KubeClient | None = None, timeout: float | None = 120):
        self.client = client or KubeClient.from_environment()
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kube-client", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run one coroutine on the client's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self.timeout)

    def __getattr__(self, name: str):
        method = getattr(self.client, name)
        if not inspect.iscoroutinefunction(method):
            raise AttributeError(f"{name} is not a coroutine method of KubeClient")
        return lambda *args, **kwargs: self.run(method(*args, **kwargs))

    def close(self) -> None:
        """Close the client and stop its loop thread (idempotent)."""
        if self._loop.is_closed():
            return
        self.run(self.client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def _ssl_context(cfg) -> ssl.SSLContext:
    """TLS settings of a kubernetes_asyncio Configuration, as its own REST client builds them."""
    context = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
    if cfg.cert_file:
        context.load_cert_chain(cfg.cert_file, keyfile=cfg.key_file)
    if not cfg.verify_ssl:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _resource_label(parts: list[str]) -> str:
    # .../namespaces/NS/PLURAL[/NAME[/SUBRESOURCE]]
    if "namespaces" in parts:
        i = parts.index("namespaces")
        rest = parts[i + 2:]
    else:
        rest = parts[3:]
    if not rest:
        return "unknown"
    return rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
