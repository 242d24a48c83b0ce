"""The operator's own label-selected watches (kube.informer.Informer.run): resume, bookmarks, 410 and errors.

The apiserver test shows the selector reaches a real server; a 410 cannot be provoked there on demand (etcd
compaction is not under the test's control), so the API client is replaced here by a scripted one. MOCK:
FakeKube plays the API server's LIST and WATCH answers."""

from __future__ import annotations

import asyncio

from loraplane.kube.client import WatchExpired
from loraplane.kube.informer import Store
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


# --- issue 13, item 8: a relist brings every changed object up to date; watches time out and resume ----------

async def test_relist_after_a_missed_modification_updates_the_store():
    """A MODIFIED event lost on a half-open watch: the periodic relist must bring the object up to date and report
    it, as a watch event would have (before, it refreshed only added and removed objects)."""
    from loraplane.kube.informer import Informer, Source, Store

    changes = []
    listed = [pod("a", 15), pod("b", 20), pod("c", 30)]
    listed[0]["metadata"]["annotations"] = {"loraplane.io/adapters": "{}"}  # what the lost event carried
    kube = FakeKube(lists=[(listed, "30")], watches=[])
    store = Store()
    informer = Informer(kube, Source("EnginePod", "v1", "Pod"), store, lambda *c: changes.append(c))
    for obj in (pod("a", 10), pod("b", 25), pod("c", 30)):
        informer.on_event("ADDED", obj)
    informer.active = True
    assert await informer.relist(None) == 0
    assert store.get(("ns", "a"))["metadata"]["resourceVersion"] == "15"      # the missed modification
    assert store.get(("ns", "a"))["metadata"]["annotations"] == {"loraplane.io/adapters": "{}"}
    assert store.get(("ns", "b"))["metadata"]["resourceVersion"] == "25"      # the watch was ahead: kept
    assert [(source, obj["metadata"]["name"], old["metadata"]["resourceVersion"])
            for source, obj, old in changes] == [("EnginePod", "a", "10")]   # reported once, with the old state


def test_kopf_watches_time_out_on_the_client_side():
    """kopf's watches end on the server (timeoutSeconds) and on the client (a total timeout a little later, and
    a connect timeout), so a half-open stream is resumed instead of hanging until a restart."""
    import kopf

    from loraplane.controllers.handlers import configure_kopf

    settings = kopf.OperatorSettings()
    configure_kopf(settings)
    w = settings.watching
    assert w.server_timeout and w.client_timeout and w.connect_timeout
    assert w.server_timeout < w.client_timeout <= settings.networking.request_timeout
    assert settings.posting.enabled is False


def test_kopf_keeps_no_diff_base_because_only_event_handlers_are_registered():
    """The operator tells kopf to keep no diff base (a deep copy of every object on every event). That is safe
    only while loraplane registers no change handler (on.create/update/delete/resume/field), which would get an
    empty diff: this test fails the day one is added."""
    import kopf

    from loraplane.controllers import handlers

    settings = kopf.OperatorSettings()
    handlers.configure_kopf(settings)
    storage = settings.persistence.diffbase_storage
    assert isinstance(storage, handlers.WatchOnlyDiffBase)
    body = kopf.Body({"metadata": {"name": "a"}, "spec": {"x": [1, 2]}, "status": {"y": 1}})
    assert storage.build(body=body) == storage.fetch(body=body) == {}
    registry = kopf.get_default_registry()
    kinds = [r for r in registry._watching.get_all_handlers()]
    assert kinds, "the operator feeds its informers from kopf's on.event handlers"
    assert not list(registry._changing.get_all_handlers()), "a change handler needs kopf's diff base back"
    assert not list(registry._spawning.get_all_handlers())


async def test_own_watch_has_a_client_side_read_timeout():
    """The operator's own informer watch (KubeClient.watch) bounds the silence between reads as well."""
    from loraplane.kube.client import KubeClient

    seen = {}

    class Resp:
        status = 200

        class content:
            @staticmethod
            async def iter_any():
                return
                yield

        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return False

    async def send(method, path, params, data, content_type, timeout):
        seen.update(params=params, timeout=timeout)
        return Resp()

    client = KubeClient.__new__(KubeClient)
    client._send = send
    assert [e async for e in client.watch("v1", "Pod", "ns", None, "5", timeout_seconds=300)] == []
    assert seen["params"]["timeoutSeconds"] == "300"
    assert seen["timeout"].sock_read and seen["timeout"].sock_read > 300 and seen["timeout"].sock_connect
    assert seen["timeout"].connect   # waiting for a pooled connection is bounded too


def test_valid_in_is_shared_until_the_namespace_changes_and_follows_every_change():
    """Store.valid_in: the parsed, valid objects of one namespace, built once and reused until a put/remove in that
    namespace; a change elsewhere keeps it; updates, deletions and newly invalid objects show at once."""
    from pydantic import BaseModel, ConfigDict

    class M(BaseModel):
        model_config = ConfigDict(extra="allow")
        spec: dict[str, int]
        status: dict | None = None

    def obj(ns, name, x, rv="1"):
        return {"metadata": {"namespace": ns, "name": name, "uid": name, "generation": 1, "resourceVersion": rv},
                "spec": {"x": x}}

    store = Store()
    store.put(obj("a", "one", 1))
    store.put(obj("a", "two", "not a number"))
    store.put(obj("b", "three", 3))
    first = store.valid_in("a", M)
    assert [m.spec["x"] for m in first] == [1]
    assert store.valid_in("a", M) is first                     # no change: the same list
    store.put(obj("b", "four", 4))
    assert store.valid_in("a", M) is first                     # another namespace changed
    store.put({**obj("a", "two", 2, rv="2"), "metadata": {**obj("a", "two", 2, rv="2")["metadata"], "generation": 2}})
    assert [m.spec["x"] for m in store.valid_in("a", M)] == [1, 2]
    store.remove(obj("a", "one", 1))
    assert [m.spec["x"] for m in store.valid_in("a", M)] == [2]
    assert store.keys_in("a") == [("a", "two")] and store.keys_in("b") == [("b", "three"), ("b", "four")]
    store.remove(obj("a", "two", 2))
    assert store.valid_in("a", M) == [] and store.keys_in("a") == []


def test_replica_reports_are_parsed_once_per_distinct_annotation():
    """Every Adapter's reconcile reads the reports of its routes' replicas: one parse per distinct report, and an
    unreadable or non-string annotation is no report (never an exception in a reconcile)."""
    from loraplane.api.wire.serving import REPORT_ANNOTATION, ReplicaReport
    from loraplane.controllers.pods import _parse_report, replica_report

    _parse_report.cache_clear()
    raw = ReplicaReport(replica="p-0", route="r", generation=1, engine_ready=True, updated_at="t").to_annotation()
    pods = [{"metadata": {"name": f"p-{i}", "annotations": {REPORT_ANNOTATION: raw}}} for i in range(50)]
    reports = [replica_report(p) for p in pods for _ in range(20)]
    assert reports[0] is not None and all(r is reports[0] for r in reports)
    assert _parse_report.cache_info().misses == 1
    for bad in ("{", "[]", 7, None, ""):
        assert replica_report({"metadata": {"annotations": {REPORT_ANNOTATION: bad}}}) is None


async def test_a_malformed_or_huge_retry_after_never_raises_nor_stalls_a_request(monkeypatch):
    """Issue 12 (also): a Retry-After from the API server (or a proxy in front of it) that is an HTTP date or
    garbage used to raise ValueError out of every request; a huge one slept for as long as it said."""
    from loraplane.kube import client as kc

    slept = []

    async def sleep(seconds):
        slept.append(seconds)

    monkeypatch.setattr(kc.asyncio, "sleep", sleep)
    answers = [(429, {"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"}), (503, {"Retry-After": "86400"}),
               (429, {"Retry-After": "nan"}), (200, {})]

    class Resp:
        def __init__(self, status, headers):
            self.status, self.headers = status, headers

        async def read(self):
            return b'{"ok": true}' if self.status == 200 else b""

        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return False

    async def send(method, path, params, data, content_type, timeout):
        assert timeout.total and timeout.total <= 60
        return Resp(*answers.pop(0))

    client = kc.KubeClient.__new__(kc.KubeClient)
    client._gate = asyncio.Semaphore(1)
    client._send = send
    assert await client.request("GET", "/api/v1/namespaces/ns/pods/p") == {"ok": True}
    assert slept == [0.2, 30.0, 0.8]   # the default backoff, MAX_RETRY_AFTER, the default backoff
    assert kc.MAX_RETRY_AFTER == 30.0


def test_the_label_index_follows_puts_relabels_and_removes():
    store = Store(index_labels=True)

    def obj(name, labels, ns="ns"):
        return {"metadata": {"name": name, "namespace": ns, "labels": labels}}

    store.put(obj("a", {"g": "x"}))
    store.put(obj("b", {"g": "x", "t": "1"}))
    store.put(obj("c", {"g": "x"}, ns="other"))
    store.put(obj("d", {"g": ["not", "a", "string"]}))   # malformed: not indexed, no error
    assert store.with_label("ns", "g", "x") == {"a", "b"} and store.with_label("ns", "t", "1") == {"b"}
    store.put(obj("a", {"g": "y"}))                        # relabelled
    assert store.with_label("ns", "g", "x") == {"b"} and store.with_label("ns", "g", "y") == {"a"}
    store.remove(obj("b", {}))
    assert store.with_label("ns", "g", "x") == set() and store.with_label("ns", "t", "1") == set()
    assert Store().with_label("ns", "g", "x") == set()    # not an indexing store
