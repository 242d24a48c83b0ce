"""A small async Kubernetes API client for the controllers: get, list, watch, server-side apply, status
patches, Events, on aiohttp (already a dependency), so handlers never block kopf's event loop the way the
synchronous `kubernetes` client would. kopf watches the loraplane kinds; the children (Jobs, Pods,
Deployments) are watched here because their watches need a server-side label selector, which kopf does not
send (it filters every Pod of the cluster client-side).

Credentials come from `kubernetes.config` (kubeconfig or in-cluster), the same sources kopf logs in with.
Every write is counted in `loraplane_operator_api_writes_total`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from typing import Any
from urllib.parse import quote

import aiohttp
from prometheus_client import Counter

from loraplane.api.keys import MANAGER

log = logging.getLogger("loraplane.operator")

API_WRITES = Counter("loraplane_operator_api_writes_total", "Write requests the operator sent to the API server",
                     ["verb", "resource"])

# Kinds the operator reads or writes -> plural resource name.
PLURALS = {
    "ConfigMap": "configmaps", "ServiceAccount": "serviceaccounts", "Service": "services", "Pod": "pods",
    "Event": "events", "Role": "roles", "RoleBinding": "rolebindings", "Job": "jobs",
    "Deployment": "deployments", "PodDisruptionBudget": "poddisruptionbudgets",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers", "ScaledObject": "scaledobjects",
    "FineTuneJob": "finetunejobs", "Adapter": "adapters", "ModelRoute": "modelroutes",
}


class WatchExpired(Exception):
    """HTTP 410 Gone: the resourceVersion is too old for a watch; LIST again."""


class ApiError(Exception):
    def __init__(self, status: int, body: Any, what: str):
        self.status = status
        self.body = body
        message = body.get("message") if isinstance(body, dict) else str(body)[:500]
        super().__init__(f"{what}: HTTP {status}: {message}")

    @property
    def message(self) -> str:
        return self.body.get("message", "") if isinstance(self.body, dict) else str(self.body)


def resource_path(api_version: str, kind: str, namespace: str | None, name: str | None = None,
                  subresource: str | None = None) -> str:
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = prefix + (f"/namespaces/{namespace}" if namespace else "") + f"/{PLURALS[kind]}"
    if name:
        path += f"/{quote(name)}"
    if subresource:
        path += f"/{subresource}"
    return path


class KubeClient:
    def __init__(self, host: str, ssl_context: ssl.SSLContext | bool, auth_header, concurrency: int = 32):
        self.host = host.rstrip("/")
        self._ssl = ssl_context
        self._auth_header = auth_header  # callable -> "Bearer ..." or None (refreshes expiring tokens)
        self._session: aiohttp.ClientSession | None = None
        # Bounds the operator's share of the API server: a burst of 1,000 objects queues here.
        self._gate = asyncio.Semaphore(concurrency)

    @classmethod
    def from_environment(cls, kubeconfig: str | None = None, context: str | None = None) -> "KubeClient":
        from kubernetes import client, config

        cfg = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException:
            config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
        if cfg.verify_ssl:
            ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
        else:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if cfg.cert_file:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
        cached: list = [None, 0.0]

        def auth_header(refresh: bool = False) -> str | None:
            # auth_settings() runs the client's refresh hook (expiring in-cluster tokens are re-read from
            # their file); it costs milliseconds, so the header is reused for a minute.
            now = time.monotonic()
            if refresh or now - cached[1] > 60:
                cached[:] = [None, now]
                for setting in cfg.auth_settings().values():
                    if setting.get("in") == "header" and setting.get("key", "").lower() == "authorization":
                        cached[0] = setting["value"]
            return cached[0]

        return cls(cfg.host, ctx, auth_header)

    async def close(self) -> None:
        if self._session:
            await self._session.close()
            self._session = None

    def _prepare(self) -> tuple[aiohttp.ClientSession, dict[str, str]]:
        """The shared session (created on first use) and the headers every call sends."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        headers = {"Accept": "application/json"}
        if (auth := self._auth_header()) is not None:
            headers["Authorization"] = auth
        return self._session, headers

    async def request(self, method: str, path: str, body: Any = None, params: dict | None = None,
                      content_type: str = "application/json", what: str = "") -> Any:
        session, headers = self._prepare()
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body, separators=(",", ":"))
        if method != "GET":
            resource = path.split("?")[0].rstrip("/").split("/")
            API_WRITES.labels(method, _resource_label(resource)).inc()
        async with self._gate:
            for attempt in range(5):
                async with session.request(method, self.host + path, data=data, params=params,
                                           headers=headers, ssl=self._ssl) as resp:
                    text = await resp.text()
                    if resp.status == 401 and attempt == 0:  # a rotated token: read it again, once
                        if (auth := self._auth_header(True)) is not None:
                            headers["Authorization"] = auth
                        continue
                    if resp.status == 429 or (resp.status >= 500 and attempt < 4):
                        await asyncio.sleep(float(resp.headers.get("Retry-After", 0.2 * 2 ** attempt)))
                        continue
                    try:
                        payload = json.loads(text) if text else None
                    except ValueError:
                        payload = text
                    if resp.status >= 400:
                        raise ApiError(resp.status, payload, what or f"{method} {path}")
                    return payload
        raise ApiError(503, "retries exhausted", what or f"{method} {path}")

    async def watch(self, api_version: str, kind: str, namespace: str | None, label_selector: str | None,
                    resource_version: str, timeout_seconds: int = 300):
        """Yield (type, object) from `resource_version` on (ADDED, MODIFIED, DELETED, BOOKMARK) until the server
        ends the watch. Raises WatchExpired when the version is too old, ApiError on other errors."""
        session, headers = self._prepare()
        params = {"watch": "true", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(timeout_seconds)}
        if label_selector:
            params["labelSelector"] = label_selector
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=timeout_seconds + 30)
        path = resource_path(api_version, kind, namespace)
        async with session.get(self.host + path, params=params, headers=headers, ssl=self._ssl,
                                     timeout=timeout) as resp:
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
                    event = json.loads(line)
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        if obj.get("code") == 410:
                            raise WatchExpired(path)
                        raise ApiError(obj.get("code") or 500, obj, f"watch {path}")
                    obj.setdefault("apiVersion", api_version)
                    obj.setdefault("kind", kind)
                    yield event.get("type"), obj

    async def list(self, api_version: str, kind: str, namespace: str | None = None,
                   label_selector: str | None = None) -> list[dict]:
        return (await self.list_with_version(api_version, kind, namespace, label_selector))[0]

    async def list_with_version(self, api_version: str, kind: str, namespace: str | None = None,
                                label_selector: str | None = None) -> tuple[list[dict], str]:
        """The items and the list's resourceVersion (the point in time it describes)."""
        params = {"labelSelector": label_selector} if label_selector else None
        out = await self.request("GET", resource_path(api_version, kind, namespace), params=params)
        items = out.get("items") or []
        for item in items:  # list items carry no apiVersion/kind
            item.setdefault("apiVersion", api_version)
            item.setdefault("kind", kind)
        return items, (out.get("metadata") or {}).get("resourceVersion") or ""

    async def apply(self, manifest: dict, force: bool = True) -> dict:
        """Server-side apply under the operator's field manager."""
        meta = manifest["metadata"]
        path = resource_path(manifest["apiVersion"], manifest["kind"], meta.get("namespace"), meta["name"])
        return await self.request("PATCH", path, manifest,
                                  params={"fieldManager": MANAGER, "force": "true" if force else "false"},
                                  content_type="application/apply-patch+yaml",
                                  what=f"apply {manifest['kind']} {meta.get('namespace')}/{meta['name']}")

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        try:
            await self.request("DELETE", resource_path(api_version, kind, namespace, name),
                               {"propagationPolicy": "Background"}, what=f"delete {kind} {namespace}/{name}")
        except ApiError as exc:
            if exc.status != 404:
                raise

    async def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict | None:
        try:
            return await self.request("GET", resource_path(api_version, kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:  # no such object, or no such kind (a KEDA CRD that is not installed)
                return None
            raise

    async def merge_patch(self, api_version: str, kind: str, namespace: str, name: str, patch: dict) -> dict:
        return await self.request("PATCH", resource_path(api_version, kind, namespace, name), patch,
                                  content_type="application/merge-patch+json",
                                  what=f"patch {kind} {namespace}/{name}")

    async def patch_status(self, api_version: str, kind: str, namespace: str, name: str, patch: dict) -> dict:
        """A JSON merge patch of the status subresource: only the keys in `patch` change."""
        return await self.request("PATCH", resource_path(api_version, kind, namespace, name, "status"),
                                  {"status": patch}, content_type="application/merge-patch+json",
                                  what=f"patch {kind} {namespace}/{name} status")

    async def post_event(self, obj: dict, type_: str, reason: str, message: str, now: str) -> None:
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
