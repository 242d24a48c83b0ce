"""The serving-table watcher of the data plane: one implementation for the loader and the router.

A route's serving table (`loraplane.api.wire.serving.ServingTable`) lives in the ConfigMap `<route>-serving`,
key `serving.json`, written by the operator. Two sources, both async generators of `TableRead`:

- `watch_configmap_table`: LIST + WATCH of that one ConfigMap (field selector `metadata.name`, so the RBAC
  the operator grants, get/list/watch on it, suffices), resumed from the last resourceVersion seen
  (bookmarks keep it current), LISTed again after HTTP 410 Gone, retried with a bounded backoff after
  errors. A change reaches the consumer within about a second of the operator's write.
- `watch_table_file`: a file (`--table FILE`, local runs, or a mounted ConfigMap volume), one stat per tick and
  a read only when the stat changes.

Both yield the first state at once and then only changes (a read whose text or problem differs from the last
one yielded), so a watch that restarts does not re-apply the same table. A consumer keeps its previous table
when a read carries no table.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from loraplane.api.validation import format_validation_error
from loraplane.api.wire.serving import CONFIGMAP_KEY, ServingTable
from loraplane.kube.client import ApiError, KubeClient, WatchExpired
from loraplane.kube.mounted import file_stamp

log = logging.getLogger("loraplane.kube.tablewatch")

# First retry after an error, doubling per further error up to the cap (seconds); reset by a watch that the
# server ended normally or that delivered an event.
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0


@dataclass(frozen=True)
class TableRead:
    """One observation of the table source.

    `table` is the parsed table, or None; then `problem` says why: the source is missing (`text` None: no
    file, no ConfigMap, no key, an API error) or its text is not a valid table (`invalid`, fields named).
    """

    origin: str                        # "ConfigMap NS/NAME" or the file's path
    text: str | None = None            # the serving.json text read, when there was one
    table: ServingTable | None = None
    problem: str | None = None

    @property
    def invalid(self) -> bool:
        """The source has text, and it is not a valid serving table."""
        return self.text is not None and self.table is None

    def describe(self) -> str:
        """`<origin>: <problem>`, for logs."""
        return f"{self.origin}: {self.problem}"


def parse_table(text: str, origin: str) -> TableRead:
    """A read of `text`: the table, or the validation problems on one line (`field.path: message; ...`)."""
    try:
        return TableRead(origin, text, ServingTable.model_validate_json(text))
    except ValidationError as exc:
        problems = "; ".join(format_validation_error(exc).splitlines())
        return TableRead(origin, text, None, f"not a valid serving table: {problems}")


async def watch_table_file(path: Path, interval: float = 0.1) -> AsyncIterator[TableRead]:
    """Yield the file's table now and again whenever the file changes, checked every `interval` seconds.

    A change is any change of (inode, mtime, size): a kubelet's atomic swap of a ConfigMap volume replaces the
    file under the same name. A missing or unreadable file yields a read with a problem, once per problem.
    """
    path = Path(path)
    stamp: tuple | None = None
    last: tuple | None = None
    while True:
        read = None
        try:
            now = file_stamp(path)
            if now is None:
                raise FileNotFoundError(path)
            if now != stamp:
                text = path.read_text()
                stamp = now
                read = parse_table(text, str(path))
        except FileNotFoundError:
            stamp, read = None, TableRead(str(path), problem="does not exist (yet)")
        except OSError as exc:
            stamp, read = None, TableRead(str(path), problem=f"unreadable: {exc}")
        if read is not None and (read.text, read.problem) != last:
            last = (read.text, read.problem)
            yield read
        await asyncio.sleep(interval)


async def watch_configmap_table(kube: KubeClient, namespace: str, name: str, *, timeout_seconds: int = 60,
                                sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
                                ) -> AsyncIterator[TableRead]:
    """Yield the table of ConfigMap `namespace/name` (key serving.json) now and on every change.

    LIST once, then WATCH from the list's resourceVersion; a watch the server ends (`timeout_seconds`) resumes
    from the last version seen (bookmarks included); HTTP 410 Gone LISTs again. An API error (e.g. 403: the
    Role is missing) yields a read with the problem, then the next try waits BACKOFF_FIRST doubling to
    BACKOFF_MAX seconds; network errors are logged and retried the same way. A deleted ConfigMap, or one
    without the key, yields a read with the problem (the route is going away: its pods follow).
    """
    origin = f"ConfigMap {namespace}/{name}"
    selector = f"metadata.name={name}"
    version: str | None = None
    backoff = BACKOFF_FIRST
    last: tuple | None = None

    def read_of(event_type: str | None, obj: dict | None) -> TableRead:
        if obj is None:
            return TableRead(origin, problem="does not exist (yet)")
        if event_type == "DELETED":
            return TableRead(origin, problem="was deleted")
        text = (obj.get("data") or {}).get(CONFIGMAP_KEY)
        if text is None:
            return TableRead(origin, problem=f"has no key {CONFIGMAP_KEY}")
        return parse_table(text, origin)

    def changed(read: TableRead) -> bool:
        nonlocal last
        if (read.text, read.problem) == last:
            return False
        last = (read.text, read.problem)
        return True

    while True:
        try:
            if version is None:
                items, version = await kube.list_with_version("v1", "ConfigMap", namespace,
                                                              field_selector=selector)
                if changed(read := read_of("ADDED", items[0] if items else None)):
                    yield read
            async for event_type, obj in kube.watch("v1", "ConfigMap", namespace, None, version,
                                                    timeout_seconds, field_selector=selector):
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                backoff = BACKOFF_FIRST
                if event_type != "BOOKMARK" and changed(read := read_of(event_type, obj)):
                    yield read
            backoff = BACKOFF_FIRST  # the server ended the watch: resume from `version`
            continue
        except WatchExpired:
            version = None  # too old to resume from: LIST again, at once
            continue
        except ApiError as exc:
            problem = f"cannot be watched: HTTP {exc.status} {exc.message}"
            if changed(read := TableRead(origin, problem=problem)):
                yield read
        except Exception as exc:  # noqa: BLE001 - API server restarts, network: retry from the same version
            log.warning("watching ConfigMap %s/%s interrupted (%s); retrying in %.0f s", namespace, name, exc,
                        backoff)
        await sleep(backoff)
        backoff = min(BACKOFF_MAX, backoff * 2)
