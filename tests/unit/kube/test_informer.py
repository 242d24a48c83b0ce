"""The operator's own label-selected watches (kube.informer.Informer.run): resume, bookmarks, 410 and errors.

The apiserver test shows the selector reaches a real server; a 410 cannot be provoked there on demand (etcd
compaction is not under the test's control), so the API client is replaced here by a scripted one. MOCK:
FakeKube plays the API server's LIST and WATCH answers."""

from __future__ import annotations

import asyncio

from loraplane.kube.client import WatchExpired
from loraplane.controllers.manager import Manager
from loraplane.controllers.settings import OperatorSettings


def pod(name: str, rv: int) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": str(rv),
                         "labels": {"loraplane.io/route": "r", "loraplane.io/component": "engine"}}}


class FakeKube:
    def __init__(self, lists, watches):
        self.lists, self.watches = list(lists), list(watches)
        self.list_calls, self.watch_calls = [], []
        self.done = asyncio.Event()

    async def list_with_version(self, api, kind, namespace, selector):
        self.list_calls.append(selector)
        return self.lists.pop(0)

    async def watch(self, api, kind, namespace, selector, rv):
        self.watch_calls.append(rv)
        if not self.watches:
            self.done.set()
            await asyncio.Event().wait()  # a quiet watch
        for item in self.watches.pop(0):
            if isinstance(item, Exception):
                raise item
            yield item


async def test_watch_resumes_from_bookmarks_relists_on_410_and_retries_errors(monkeypatch):
    sleeps = []

    async def no_sleep(seconds):
        sleeps.append(seconds)

    kube = FakeKube(
        lists=[([pod("a", 10)], "10"), ([pod("b", 19)], "20")],
        watches=[
            [("MODIFIED", pod("a", 11)), ("BOOKMARK", {"metadata": {"resourceVersion": "12"}})],  # server timeout
            [("DELETED", pod("a", 13)), WatchExpired("pods")],   # too old: LIST again
            [ConnectionResetError("apiserver restarting")],       # network: retry from the same version
        ])
    op = Manager(OperatorSettings(), kube)
    store = op.stores.EnginePod
    task = asyncio.create_task(op.informers["EnginePod"].run(None))
    try:
        monkeypatch.setattr("loraplane.kube.informer.asyncio.sleep", no_sleep)
        await asyncio.wait_for(kube.done.wait(), 10)
    finally:
        task.cancel()
    assert kube.list_calls == ["loraplane.io/route,loraplane.io/component=engine"] * 2  # server-side selector
    assert kube.watch_calls == ["10", "12", "20", "20"]  # bookmark kept the place; re-list after 410; same after error
    assert list(store.objects) == [("ns", "b")]           # a's deletion applied, b found by the re-list
    assert sleeps == [1.0]                                 # one backoff, for the network error only
