"""The operator's in-memory view of the cluster: a Store per kind, and the Informer that keeps it current.

An informer (client-go's name for the same thing) LISTs one kind, then WATCHes it from the list's
resourceVersion, and hands every change to a callback after the store holds it. Ours sends a server-side
label selector, so the API server streams only the operator's own children, not every pod of a shared
cluster (kopf filters labels client-side, which is why the children are not watched through kopf). The
loraplane kinds themselves are fed by kopf's watches through `Informer.on_event`; their LIST at start and
resync goes through the same `Informer.relist`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from loraplane.kube.client import KubeClient, WatchExpired

log = logging.getLogger("loraplane.operator")

Key = tuple[str, str]  # (namespace, name)


def key_of(obj: dict) -> Key:
    """(namespace, name) of an object ("" for a missing part)."""
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "", meta.get("name") or ""


def label_getter(name: str) -> Callable[[dict], str | None]:
    """A `Store` group_by that indexes objects by the value of label `name`."""
    return lambda obj: ((obj.get("metadata") or {}).get("labels") or {}).get(name)


class Store:
    """Objects of one kind by (namespace, name), with an optional secondary index (e.g. an owner label)."""

    def __init__(self, group_by: Callable[[dict], str | None] | None = None, index_labels: bool = False):
        self.objects: dict[Key, dict] = {}
        self._group_by = group_by
        self._groups: dict[Key, set[str]] = defaultdict(set)
        # (namespace, label key, label value) -> names, when index_labels: `with_label` answers a selector's
        # matchLabels pair without walking the namespace.
        self._index_labels = index_labels
        self._labelled: dict[tuple[str, str, str], set[str]] = defaultdict(set)
        self._parsed: dict[Key, tuple[str, Any]] = {}
        self._spec_parsed: dict[Key, tuple[str, Any]] = {}
        # Names per namespace (insertion-ordered), and a counter per namespace that moves on every put/remove:
        # keys_in and valid_in are O(objects in the namespace), and valid_in's list is reused until it moves.
        self._names: dict[str, dict[str, None]] = defaultdict(dict)
        self._ns_version: dict[str, int] = defaultdict(int)
        self._valid: dict[tuple[str, type], tuple[int, list]] = {}

    def put(self, obj: dict) -> dict | None:
        """Store `obj`; returns the object it replaced, or None."""
        key = key_of(obj)
        old = self.objects.get(key)
        if old is not None:
            self._ungroup(key, old)
        self.objects[key] = obj
        self._names[key[0]][key[1]] = None
        self._ns_version[key[0]] += 1
        if self._group_by and (g := self._group_by(obj)):
            self._groups[(key[0], g)].add(key[1])
        for k, v in self._labels(obj):
            self._labelled[(key[0], k, v)].add(key[1])
        return old

    def remove(self, obj: dict) -> dict | None:
        """Drop the object with `obj`'s key; returns what was stored, or None."""
        key = key_of(obj)
        old = self.objects.pop(key, None)
        self._parsed.pop(key, None)
        self._spec_parsed.pop(key, None)
        if old is not None:
            self._ungroup(key, old)
            names = self._names.get(key[0])
            if names is not None:
                names.pop(key[1], None)
                if not names:
                    del self._names[key[0]]
            self._ns_version[key[0]] += 1
        return old

    def _ungroup(self, key: Key, obj: dict) -> None:
        if self._group_by and (g := self._group_by(obj)):
            names = self._groups.get((key[0], g))
            if names:
                names.discard(key[1])
                if not names:
                    del self._groups[(key[0], g)]
        for k, v in self._labels(obj):
            names = self._labelled.get((key[0], k, v))
            if names:
                names.discard(key[1])
                if not names:
                    del self._labelled[(key[0], k, v)]

    def _labels(self, obj: dict) -> list[tuple[str, str]]:
        if not self._index_labels:
            return []
        labels = (obj.get("metadata") or {}).get("labels")
        if not isinstance(labels, dict):
            return []
        return [(k, v) for k, v in labels.items() if isinstance(k, str) and isinstance(v, str)]

    def with_label(self, namespace: str, key: str, value: str) -> set[str]:
        """The names of the objects of `namespace` labelled `key=value` (a store made with index_labels; else
        always empty)."""
        return set(self._labelled.get((namespace, key, value), ()))

    def get(self, key: Key) -> dict | None:
        """The stored object with `key` (namespace, name), or None."""
        return self.objects.get(key)

    def keys_in(self, namespace: str) -> list[Key]:
        """The keys of the objects in `namespace` (a snapshot: safe to iterate while the store changes)."""
        return [(namespace, n) for n in self._names.get(namespace, ())]

    def version(self, namespace: str) -> int:
        """A counter that moves on every put/remove in `namespace`: equal values mean nothing there changed."""
        return self._ns_version.get(namespace, 0)

    def valid_in(self, namespace: str, model: type[BaseModel]) -> list[Any]:
        """The objects of `namespace` that parse as `model` (`parsed`), in store order; invalid ones left out.

        Every route of a namespace reads every Adapter of it on each reconcile (and every Adapter every route):
        the list is built once per change in the namespace and shared until the next put/remove there, instead
        of walking the namespace once per reconcile (quadratic in a burst). Callers must not mutate it."""
        version = self._ns_version.get(namespace, 0)
        hit = self._valid.get((namespace, model))
        if hit is not None and hit[0] == version:
            return hit[1]
        out = [v for k in self.keys_in(namespace) if isinstance(v := self.parsed(k, model), model)]
        self._valid[(namespace, model)] = (version, out)
        return out

    def group(self, namespace: str, group: str) -> list[dict]:
        """The objects of `namespace` whose group_by value is `group`, by name."""
        return [self.objects[(namespace, n)] for n in sorted(self._groups.get((namespace, group), ()))
                if (namespace, n) in self.objects]

    def parsed(self, key: Key, model: type[BaseModel]) -> Any:
        """The object validated as `model` (a pydantic model with an optional `status`), the ValidationError
        of its spec, or None when the store has no such object.

        Validating a spec runs its field and cross-field rules (~0.1 ms for a ModelRoute), so the spec part is
        cached per (uid, generation, labels) and only the status, which our own patches change, is re-read."""
        obj = self.objects.get(key)
        if obj is None:
            return None
        meta = obj.get("metadata") or {}
        rv = meta.get("resourceVersion") or ""
        hit = self._parsed.get(key)
        if hit and hit[0] == rv:
            return hit[1]
        spec_key = json.dumps([meta.get("uid"), meta.get("generation"), meta.get("labels") or {}], sort_keys=True)
        spec_hit = self._spec_parsed.get(key)
        if spec_hit and spec_hit[0] == spec_key:
            base = spec_hit[1]
        else:
            try:
                base = model.model_validate(without_status_extras({**obj, "status": None}, model))
            except ValidationError as exc:
                base = exc
            self._spec_parsed[key] = (spec_key, base)
        value = with_parsed_status(base, obj, model)
        self._parsed[key] = (rv, value)
        return value


def with_parsed_status(base: Any, obj: dict, model: type[BaseModel]) -> Any:
    """`base` (`obj` parsed as `model` without its status, or that parse's ValidationError) with `obj`'s status
    parsed into it, as `Store.parsed` returns it: an unreadable status (another writer's, or an older version's)
    leaves it without one, and a ValidationError is returned as it is."""
    if isinstance(base, ValidationError) or not isinstance(obj.get("status"), dict):
        return base
    try:
        status = _status_model(model).model_validate(without_status_extras(obj, model)["status"])
    except ValidationError:
        return base
    return base.model_copy(update={"status": status})


def _status_model(model: type[BaseModel]) -> type[BaseModel]:
    return model.model_fields["status"].annotation.__args__[0]  # Optional[XStatus]


def without_status_extras(obj: dict, model: type[BaseModel]) -> dict:
    """The object minus what the API model does not describe (another writer's status keys, server noise)."""
    out = {k: v for k, v in obj.items() if k in ("apiVersion", "kind", "metadata", "spec", "status")}
    status = out.get("status")
    if status is None:
        out.pop("status", None)
    if isinstance(status, dict):
        status_model = _status_model(model)
        allowed = {f.alias or n for n, f in status_model.model_fields.items()}
        out["status"] = {k: v for k, v in status.items() if k in allowed}
    return out


@dataclass(frozen=True)
class Source:
    """What one informer lists and watches: `name` names its store (two informers may read the same kind
    with different selectors, e.g. trainer pods and engine pods)."""

    name: str
    api_version: str
    kind: str
    label_selector: str | None = None


# Called after the store changed: (source name, the object, its previous state). The previous state is None
# when the object appeared or disappeared (then everything that may depend on it must be looked at again).
ChangeHandler = Callable[[str, dict, dict | None], None]


class Informer:
    """Keeps one Store equal to the API server's objects of one Source and reports each change.

    `on_event` takes watch events from anywhere (kopf's streams, or `run`'s own watch); `relist` makes the store
    match a LIST; `run` is a label-selected LIST + WATCH that resumes from the last resourceVersion it saw
    (bookmarks keep it fresh across quiet periods) and LISTs again when the server answers 410 Gone.
    Changes are reported only once `active` is set: the startup LIST fills the stores silently, then the
    owner schedules everything once.
    """

    def __init__(self, kube: KubeClient, source: Source, store: Store, on_change: ChangeHandler,
                 namespaces: tuple[str, ...] = ()):
        self.kube = kube
        self.source = source
        self.store = store
        self.on_change = on_change
        self.namespaces = namespaces  # empty: every namespace
        self.active = False

    def in_scope(self, obj: dict) -> bool:
        """True when `obj`'s namespace is one this informer watches (every namespace when none are set)."""
        return not self.namespaces or key_of(obj)[0] in self.namespaces

    def on_event(self, event_type: str | None, obj: dict) -> None:
        """Apply one watch event (ADDED/MODIFIED/DELETED; None for a listed object) to the store."""
        if not self.in_scope(obj):
            return
        deleted = event_type == "DELETED"
        old = self.store.remove(obj) if deleted else self.store.put(obj)
        if self.active:
            self.on_change(self.source.name, obj, None if deleted else old)

    def sync_listed(self, namespace: str | None, items: list[dict], list_rv: str) -> int:
        """Make the store match a LIST of `namespace` (None: all): add what is missing, refresh what changed
        (a listed object newer than the stored one: a MODIFIED event that was lost, e.g. on a half-open watch),
        drop what the server no longer has. Every change is reported like a watch event. Returns how many
        objects were dropped.

        A stored object newer than the listed one is kept: the watch (ours or kopf's) may already be ahead of
        the LIST, and going back to the listed state would undo a change the watch delivered."""
        seen, dropped = set(), 0
        for item in items:
            key = key_of(item)
            seen.add(key)
            stored = self.store.objects.get(key)
            if stored is None or _newer(item, stored):
                self.on_event(None, item)
        for key, obj in list(self.store.objects.items()):
            if (namespace is None or key[0] == namespace) and key not in seen and _older(obj, list_rv):
                self.store.remove(obj)
                dropped += 1
                if self.active:
                    self.on_change(self.source.name, obj, None)
        return dropped

    async def list(self, namespace: str | None) -> tuple[list[dict], str]:
        """One LIST of the source (label-selected) in `namespace`: the items and the list's resourceVersion."""
        s = self.source
        return await self.kube.list_with_version(s.api_version, s.kind, namespace, s.label_selector)

    async def relist(self, namespace: str | None) -> int:
        """LIST into the store: objects whose ADDED or MODIFIED event was lost are brought up to date (and
        reported), objects whose deletion event was lost are dropped. Returns how many were dropped."""
        items, list_rv = await self.list(namespace)
        return self.sync_listed(namespace, items, list_rv)

    async def run(self, namespace: str | None) -> None:
        """LIST + WATCH `namespace` (None: all) into the store until cancelled; API server restarts and network
        errors are retried with backoff (1 s doubling to 30 s) from the same resourceVersion."""
        s = self.source
        rv, backoff = None, 1.0
        while True:
            try:
                if rv is None:
                    items, rv = await self.list(namespace)
                    self.sync_listed(namespace, items, rv)
                async for event_type, obj in self.kube.watch(s.api_version, s.kind, namespace, s.label_selector,
                                                             rv):
                    rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                    if event_type != "BOOKMARK":
                        self.on_event(event_type, obj)
                backoff = 1.0  # the server ended the watch (timeoutSeconds): resume from rv
            except asyncio.CancelledError:
                raise
            except WatchExpired:
                rv = None
            except Exception as exc:  # API server restarts, network: retry with backoff, from the same rv
                log.warning("watching %s failed (%s); retrying in %.0f s", s.name, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)


def _rv(obj: dict) -> str:
    return (obj.get("metadata") or {}).get("resourceVersion") or ""


def _newer(listed: dict, stored: dict) -> bool:
    """Whether a listed object is a later state than the stored one: a greater resourceVersion (etcd revisions in
    practice); when they are not numbers (Kubernetes calls them opaque), any different one."""
    try:
        return int(_rv(listed)) > int(_rv(stored))
    except ValueError:
        return _rv(listed) != _rv(stored)


def _older(obj: dict, list_rv: str) -> bool:
    """Whether the stored object predates a LIST (resourceVersions are etcd revisions in practice; when
    they are not numbers, assume older)."""
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0) <= int(list_rv)
    except ValueError:
        return True


__all__ = ["ChangeHandler", "Informer", "Key", "Source", "Store", "key_of", "label_getter", "with_parsed_status",
           "without_status_extras"]
