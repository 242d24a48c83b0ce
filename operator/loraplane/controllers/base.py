"""What every controller is built from: the shared read-only view of the cluster (Stores), the shared writers
(Context), and the Controller base class that owns a work queue.

A controller reconciles one kind in three steps (KubeAI's calculatePodPlan / plan.execute shape):
`observe(key)` gathers facts from the stores (and, where memory does not know, one GET) into a dataclass;
`plan(facts)` decides the children, the status patch and the Events without I/O (unit-tested without a
cluster); `execute(plan)` writes what differs. Each controller keeps its own memory (accepted specs, rejected
adapters) and says in `on_change` which of its keys a change of a watched object affects; controllers reach
each other only through the explicit methods their constructor or `connect` is given.
"""

from __future__ import annotations

import asyncio

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from loraplane.api.common import API_VERSION as API
from loraplane.api.reasons import Reason
from loraplane.api.keys import COMPONENT_LABEL, FINETUNEJOB_LABEL, ROUTE_LABEL, ROUTER_LABEL
from loraplane.builders.settings import BuildSettings
from loraplane.controllers.status import invalid_spec
from loraplane.kube.apply import Applier, NameTaken
from loraplane.kube.client import ApiError, KubeClient
from loraplane.kube.events import EventRecorder
from loraplane.kube.informer import Key, Source, Store, label_getter
from loraplane.kube.workqueue import WorkQueue

ENGINE_SELECTOR = f"{ROUTE_LABEL},{COMPONENT_LABEL}=engine"
# The router's Deployment and pods carry loraplane.io/router (not loraplane.io/route: that marks the replicas).
ROUTER_SELECTOR = f"{ROUTER_LABEL},{COMPONENT_LABEL}=router"


@dataclass
class Stores:
    """The informers' stores, one per source (SOURCES); controllers only read them. Children are grouped by
    their owner's label, so "the pods of job X" is one lookup."""

    FineTuneJob: Store = field(default_factory=Store)
    Adapter: Store = field(default_factory=lambda: Store(index_labels=True))   # routes select Adapters by label
    ModelRoute: Store = field(default_factory=Store)
    Job: Store = field(default_factory=lambda: Store(group_by=label_getter(FINETUNEJOB_LABEL)))
    TrainPod: Store = field(default_factory=lambda: Store(group_by=label_getter(FINETUNEJOB_LABEL)))
    EnginePod: Store = field(default_factory=lambda: Store(group_by=label_getter(ROUTE_LABEL)))
    Deployment: Store = field(default_factory=lambda: Store(group_by=label_getter(ROUTE_LABEL)))
    RouterDeployment: Store = field(default_factory=lambda: Store(group_by=label_getter(ROUTER_LABEL)))
    RouterPod: Store = field(default_factory=lambda: Store(group_by=label_getter(ROUTER_LABEL)))

    def of(self, source: str) -> Store:
        """The store named `source` (a SOURCES name, e.g. "EnginePod"); AttributeError for an unknown name."""
        return getattr(self, source)


# What the operator lists and watches, by store name. The three loraplane kinds arrive through kopf's watches;
# the children are label-selected on the server (CHILD_SOURCES, watched by the operator's own informers).
SOURCES: tuple[Source, ...] = (
    Source("FineTuneJob", API, "FineTuneJob"), Source("Adapter", API, "Adapter"),
    Source("ModelRoute", API, "ModelRoute"), Source("Job", "batch/v1", "Job", FINETUNEJOB_LABEL),
    Source("TrainPod", "v1", "Pod", FINETUNEJOB_LABEL), Source("EnginePod", "v1", "Pod", ENGINE_SELECTOR),
    Source("Deployment", "apps/v1", "Deployment", ENGINE_SELECTOR),
    # A route is Ready only when its router serves too (ModelRoute Ready reads both).
    Source("RouterDeployment", "apps/v1", "Deployment", ROUTER_SELECTOR),
    Source("RouterPod", "v1", "Pod", ROUTER_SELECTOR),
)
CHILD_SOURCES = ("Job", "TrainPod", "EnginePod", "Deployment", "RouterDeployment", "RouterPod")


@dataclass
class Context:
    """What the controllers share: the API client, the applier of children, the Event recorder, the builders'
    settings, the stores and how long a scheduled key waits for more events (seconds)."""

    kube: KubeClient
    applier: Applier
    events: EventRecorder
    build: BuildSettings
    stores: Stores
    coalesce_seconds: float = 0.05


class Controller(ABC):
    """One kind's controller: its work queue, its memory, and its reconcile."""

    kind: ClassVar[str]

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.kube = ctx.kube
        self.stores = ctx.stores
        self.queue = WorkQueue(self.kind, self.reconcile, ctx.coalesce_seconds)
        self._timers: dict[Key, asyncio.TimerHandle] = {}

    @property
    def store(self) -> Store:
        """The store of this controller's own kind."""
        return self.stores.of(self.kind)

    def schedule(self, key: Key, delay: float | None = None) -> None:
        """Reconcile `key` soon (after `delay` seconds, default the queue's coalescing delay)."""
        self.queue.schedule(key, delay)

    def schedule_later(self, key: Key, delay: float) -> None:
        """Look at `key` again in `delay` seconds, for a change no watch reports (an Event). Safe to call from
        the key's own reconcile: `schedule` there would run it again at once (the queue re-runs a key scheduled
        while it runs), a hot loop; this sets one timer per key, and a timer already set is kept."""
        timer = self._timers.get(key)
        if timer is not None and not timer.cancelled() and timer.when() > asyncio.get_running_loop().time():
            return

        def fire() -> None:
            self._timers.pop(key, None)
            self.schedule(key)

        self._timers[key] = asyncio.get_running_loop().call_later(delay, fire)

    def schedule_namespace(self, namespace: str, delay: float | None = None) -> None:
        """Reconcile every object of this kind in `namespace`."""
        for key in self.store.keys_in(namespace):
            self.queue.schedule(key, delay)

    def schedule_all(self) -> None:
        """Reconcile every object of this kind the store holds (startup and periodic resync)."""
        for key in list(self.store.objects):
            self.queue.schedule(key)

    async def apply_children(self, body: dict, stages: list[list[dict]], fresh: bool) -> int | None:
        """Apply the owner's children (Applier.ensure); the number written, or None when refused. A child the API
        server refuses as invalid (HTTP 400/422: a spec the builders turned into something it does not accept) is shown
        on the owner as Ready=False InvalidSpec with the server's message, which names the child and the field,
        and None is returned: retrying cannot help until the spec changes, so it is not raised into the work
        queue's retry loop (the next change of the owner reconciles it again). A child name held by another
        owner's object (kube.apply.NameTaken) is shown the same way with reason NameConflict."""
        reason = Reason.InvalidSpec
        try:
            return await self.ctx.applier.ensure(stages, fresh=fresh)
        except NameTaken as exc:
            # Never adopted nor overwritten: the other owner keeps it, this one waits for the name to be free.
            reason, refused = Reason.NameConflict, (
                f"{exc}: its name is what this {self.kind}'s name gives; rename or delete one of the two")
        except ApiError as exc:
            if exc.status not in (400, 422):
                raise
            refused = f"the API server refused a child: {exc}"
        meta = body["metadata"]
        patch, event = invalid_spec(body.get("status") or {}, meta.get("generation"), refused, reason)
        if patch:
            await self.kube.patch_status(API, self.kind, meta.get("namespace"), meta["name"], patch)
        if event:
            await self.ctx.events.post(body, event)
        return None

    @abstractmethod
    def on_change(self, source: str, obj: dict, old: dict | None) -> None:
        """Schedule the keys a change of `obj` (from store `source`) affects; `old` is its previous state,
        None when it appeared or disappeared."""

    @abstractmethod
    async def reconcile(self, key: Key) -> None:
        """observe -> plan -> execute for one object; raising retries it with backoff (WorkQueue)."""


__all__ = ["API", "CHILD_SOURCES", "Context", "Controller", "SOURCES", "Stores"]
