"""The data plane's serving-table watcher (loraplane.kube.tablewatch): resume, 410, backoff, problems, dedup.

The apiserver tests (tests/integration/apiserver/test_loader_kube.py, tests/integration/apiserver/test_router_kube.py) show the watcher
against a real server; a 410 or a run of errors cannot be provoked there on demand, so the API client is
replaced here by a scripted one. FakeKube is a fake: it plays the API server's LIST and WATCH answers."""

from __future__ import annotations

import asyncio
import os

from loraplane.api.wire.serving import CONFIGMAP_KEY, ServingTable
from loraplane.kube.client import ApiError, WatchExpired
from loraplane.kube.tablewatch import BACKOFF_MAX, watch_configmap_table, watch_table_file


def table(generation: int) -> str:
    return ServingTable(route="r", generation=generation, base_model="org/base", served_model_name="base",
                        max_lora_rank=8, max_loras=4).to_json()


def configmap(rv: int, text: str | None) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "r-serving", "namespace": "ns", "resourceVersion": str(rv)},
            "data": {CONFIGMAP_KEY: text} if text is not None else {}}


class FakeKube:
    """A fake KubeClient: LIST answers and WATCH streams are scripted; each call is recorded."""

    def __init__(self, lists, watches):
        self.lists, self.watches = list(lists), list(watches)
        self.list_calls, self.watch_calls = [], []

    async def list_with_version(self, api, kind, namespace, label_selector=None, *, field_selector=None):
        self.list_calls.append((kind, namespace, field_selector))
        answer = self.lists.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def watch(self, api, kind, namespace, label_selector, rv, timeout_seconds=300, *, field_selector=None):
        self.watch_calls.append(rv)
        if not self.watches:
            await asyncio.Event().wait()  # a quiet watch
        for item in self.watches.pop(0):
            if isinstance(item, Exception):
                raise item
            yield item


async def take(source, n: int, timeout: float = 5) -> list:
    out = []

    async def collect():
        async for read in source:
            out.append(read)
            if len(out) == n:
                return
    await asyncio.wait_for(collect(), timeout)
    await source.aclose()
    return out


async def test_configmap_watch_resumes_from_bookmarks_relists_on_410_and_skips_unchanged_tables():
    kube = FakeKube(
        lists=[([configmap(10, table(1))], "10"), ([configmap(19, table(2))], "20")],
        watches=[
            [("MODIFIED", configmap(11, table(2))), ("BOOKMARK", {"metadata": {"resourceVersion": "12"}})],
            [WatchExpired("configmaps")],                 # too old: LIST again (same table: not yielded)
            [("MODIFIED", configmap(21, table(3)))],
        ])
    reads = await take(watch_configmap_table(kube, "ns", "r-serving"), 3)
    assert [r.table.generation for r in reads] == [1, 2, 3]
    assert {r.origin for r in reads} == {"ConfigMap ns/r-serving"}
    assert kube.list_calls == [("ConfigMap", "ns", "metadata.name=r-serving")] * 2   # one object, by name
    assert kube.watch_calls == ["10", "12", "20"]    # from the list; the bookmark kept the place; re-list's


async def test_configmap_watch_reports_problems_and_backs_off_boundedly_on_errors():
    sleeps = []

    async def fake_sleep(seconds):
        sleeps.append(seconds)

    forbidden = ApiError(403, {"message": "configmaps is forbidden"}, "list")
    kube = FakeKube(
        lists=[forbidden, forbidden, ([], "5"), ([configmap(9, "{not json")], "9")],
        watches=[[("ADDED", configmap(6, None)), ("MODIFIED", configmap(7, table(1))),
                  ("DELETED", configmap(8, table(1)))]]
        + [[ConnectionResetError("apiserver restarting")]] * 6 + [[WatchExpired("configmaps")]])
    reads = await take(watch_configmap_table(kube, "ns", "r-serving", sleep=fake_sleep), 6)
    problems = [r.problem for r in reads]
    assert problems[0] == "cannot be watched: HTTP 403 configmaps is forbidden"   # the same error once
    assert problems[1:3] == ["does not exist (yet)", f"has no key {CONFIGMAP_KEY}"]
    assert reads[3].table.generation == 1 and reads[3].problem is None
    assert problems[4] == "was deleted"
    assert reads[5].invalid and problems[5].startswith("not a valid serving table: <object>: Invalid JSON")
    # 403 twice (doubling); the watch's events reset it and its normal end needs no pause; network errors
    # double up to the cap and resume from the last version; the 410 re-lists at once.
    assert sleeps == [1.0, 2.0, 1.0, 2.0, 4.0, 8.0, 16.0, BACKOFF_MAX]
    assert kube.watch_calls == ["5"] + ["8"] * 7


async def test_file_source_yields_changes_and_problems_once(tmp_path):
    path = tmp_path / "serving.json"
    source = watch_table_file(path, interval=0.01)
    first = await anext(source)
    assert first.problem == "does not exist (yet)" and not first.invalid
    path.write_text(table(1))
    assert (await anext(source)).table.generation == 1
    os.utime(path)                                   # touched, same text: nothing new
    path.write_text('{"route": 5}')
    bad = await anext(source)
    assert bad.invalid and "route: Input should be a valid string" in bad.problem
    path.write_text(table(2))
    assert (await anext(source)).table.generation == 2
    await source.aclose()
