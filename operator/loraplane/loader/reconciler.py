"""The loader's control loop: make the engine's loaded adapters equal the serving table, and say so truthfully.

Each desired adapter version (a `Slot`) moves Pending -> Fetching -> Loading -> Ready, or ends in
Incompatible (the artifact itself is wrong: the gate refused it before vLLM saw it, or vLLM refused it for such
a reason) or Failed (bounded retries ran out, or the smoke test found it changes nothing or outputs NaN/Inf).
Which failures are retried is one table, `OUTCOMES`: a failure that cannot change on retry settles at once.
The loop runs on every table change and every `resync` seconds; each pass checks
vLLM's /health and /v1/models, so an engine restart (adapters gone) is noticed within one pass and every
desired adapter is loaded again from the local cache without anyone touching the CRs.

A replica counts as serving (`engine_ready` in its report, which the router and the operator act on) only
once vLLM answers /health *and* has completed one warm-up completion since it came up: vLLM compiles parts of
its sampler lazily (on the vLLM 0.32 CPU build, `torch.compile` of the log-probability ranks on the first
request that asks for log-probabilities: 2 s on a quiet 2-core box, up to 20 s on a busy one), and that first
request must not be a client's, nor the first adapter's smoke test. The warm-up starts as soon as /health
answers and runs while the first adapter is fetched and gated, which need no engine.

Only one completion at a time goes to the engine from here: the probes run in the loop (a single task), and
the warm-up, the only request outside it, is awaited before the first load. So base and adapter probes never
run concurrently, which matters on vLLM CPU builds whose mixed batches are wrong (see docs/loader.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import aiohttp

from loraplane.api.common import now_rfc3339
from loraplane.api.modelroute import ENGINE_TASK_EMBED, ENGINE_TASK_GENERATE
from loraplane.api.redaction import MAX_MESSAGE, redacted
from loraplane.api.reasons import Reason
from loraplane.api.wire.serving import (AdapterReport, AdapterState, DesiredAdapter, ReplicaReport,
                                        ServingTable)
from loraplane.loader import gate
from loraplane.loader.engine import PROBE_REFUSALS, EngineError, Probe, VllmClient, classify, classify_load_error
from loraplane.loader.metrics import LoaderMetrics
from loraplane.api.paths import ADAPTER_CREDENTIALS_ROOT
from loraplane.storage.cache import ArtifactCache, CachedArtifact, FetchError
from loraplane.storage.credentials import Credentials
from loraplane.storage.uri import try_parse_uri

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What a failure of bringing up an adapter means: whether another attempt can change it (`retry`: with
    exponential backoff, `max_attempts` in all) and the state the adapter settles in when it is not retried or
    the attempts ran out."""

    retry: bool
    settles: AdapterState


_ARTIFACT = Outcome(retry=False, settles=AdapterState.Incompatible)   # the files themselves are wrong
_BROKEN = Outcome(retry=False, settles=AdapterState.Failed)           # loaded, but the smoke test shows it broken
_TRANSIENT = Outcome(retry=True, settles=AdapterState.Failed)         # may change: retried, then Failed
_REFUSED = Outcome(retry=False, settles=AdapterState.Failed)          # the store or the policy refuses: ask again
#                                                                       only after the Adapter or Secret changed
# Every reason a bring-up failure is reported with -> its Outcome: the one place that decides retries. A
# failure that cannot change on retry is settled on its first attempt, with the reason that says what was
# checked and found. Reasons come from the gate's rules (gate.RULES), vLLM's refusals (engine.LOAD_REFUSALS,
# engine.PROBE_REFUSALS), the smoke test and the cache (storage.cache.FetchError and its subclasses).
OUTCOMES: dict[Reason, Outcome] = {
    **dict.fromkeys((Reason.InvalidAdapter, Reason.RankTooLarge, Reason.UnsupportedModulesToSave,
                     Reason.UnsupportedAdapterFeature, Reason.UnsupportedAdapterType, Reason.UnsupportedDtype,
                     Reason.UnsupportedQuantization, Reason.BaseModelMismatch, Reason.TargetModulesNotFound,
                     Reason.RankMismatch, Reason.NonFiniteWeights, Reason.UnsafeArtifact, Reason.ArtifactTooLarge,
                     Reason.InvalidTargetModules), _ARTIFACT),
    **dict.fromkeys((Reason.AccessDenied, Reason.InsecureSource), _REFUSED),
    Reason.EmbeddingRouteNoAdapters: _ARTIFACT,   # the engine itself cannot load any: no retry, never fetched
    **dict.fromkeys((Reason.NoEffect, Reason.NonFiniteOutput), _BROKEN),
    # the store or the engine may answer otherwise next time; an unforeseen error may be a passing one
    **dict.fromkeys((Reason.FetchFailed, Reason.ChecksumMismatch, Reason.AlreadyLoaded, Reason.AdapterNotFound,
                     Reason.LoadFailed, Reason.InternalError), _TRANSIENT),
}
# States a slot stays in until the table or the engine changes (no further work on it).
SETTLED_STATES = frozenset({AdapterState.Ready, AdapterState.Incompatible, AdapterState.Failed})
DEFAULT_PROBE_PROMPT = "what does the cat see?\n"
# The warm-up completion: the base model, greedy, one token, with log-probabilities (the probe request's shape:
# what vLLM compiles lazily is on that path). The prompt only needs to tokenize to something.
WARMUP_PROMPT = "hello"
WARMUP_TOKENS = 1
# Seconds between /health checks while vLLM is not up (instead of `resync`): the warm-up, and so the first
# adapter, should start soon after vLLM answers.
ENGINE_DOWN_POLL = 0.2
# Seconds an adapter that left the table while Ready stays loaded at least (loader --drain-seconds): the routers
# read the same table from the same ConfigMap about when the loader does, and stop choosing a replica for it
# once they poll its report (router --poll-interval, 1 s); a request routed just before is on its way to vLLM.
DRAIN_SECONDS = 5.0
# Seconds between the control loop's heartbeats (`Loader.heartbeat`, what /healthz reads): the loop beats at
# least this often while it waits for the next pass and while a long step (a download, the gate, a load) runs
# in its own task, so liveness never depends on how long a rollout takes.
HEARTBEAT_SECONDS = 1.0
T = TypeVar("T")


@dataclass
class Slot:
    """One desired adapter version on this replica, and where it stands."""

    desired: DesiredAdapter
    state: AdapterState = AdapterState.Pending
    reason: Reason = Reason.Desired
    message: str = "waiting for the engine"
    since: str = field(default_factory=now_rfc3339)
    attempts: int = 0
    next_try: float = 0.0
    artifact: CachedArtifact | None = None
    rank: int | None = None   # the LoRA rank the gate read from the artifact (reported; the Adapter records it)

    def move(self, state: AdapterState, reason: Reason, message: str = "") -> None:
        """Enter `state` for `reason`; `since` restarts only when the (state, reason) pair changes. The message
        goes into the pod annotation and the Adapter's status: credentials are redacted, its size bounded."""
        message = redacted(message, MAX_MESSAGE)
        if (state, reason) != (self.state, self.reason):
            self.since = now_rfc3339()
            log.info("%s: %s (%s) %s", self.desired.served_name, state, reason, message)
        self.state, self.reason, self.message = state, reason, message

    @property
    def settled(self) -> bool:
        """True in a state the loop leaves alone until something changes: Ready, Incompatible or Failed."""
        return self.state in SETTLED_STATES


ReportSink = Callable[[ReplicaReport], Awaitable[None]]


def _verified_digest(slot: Slot) -> str | None:
    """The digest this replica verified for the slot's artifact: the table's expected one (it matched), else the
    cached directory's sha256_dir; None before a fetch."""
    if slot.artifact is None:
        return None
    return slot.desired.sha256 or slot.artifact.sha256


def _only_pinned(slot: Slot, new: DesiredAdapter) -> bool:
    """True when `new` differs from the slot's entry only by a digest the slot's verified artifact has (the
    Adapter recorded what this replica reported): nothing to fetch or reload."""
    art = slot.artifact
    return (art is not None and slot.desired.sha256 is None and new.sha256 is not None
            and new.sha256 in (art.sha256, art.archive_sha256)
            and slot.desired.model_copy(update={"sha256": new.sha256}) == new)


def _same_served_artifact(slot: Slot, new: DesiredAdapter) -> bool:
    """True when a Ready slot's verified artifact is what `new` asks for (same URI, base model and version, and
    a digest that is unset, the same, or the one verified) and only metadata differ (declared rank, credentials
    Secret): a version that serves is never unloaded and reloaded for those. The serving version of an Adapter
    being updated is described from its status while spec describes the new one (make-before-break)."""
    art, old = slot.artifact, slot.desired
    if slot.state != AdapterState.Ready or art is None:
        return False
    digest_ok = new.sha256 is None or new.sha256 == old.sha256 or new.sha256 in (art.sha256, art.archive_sha256)
    return digest_ok and (new.uri, new.version, new.base_model, new.base_model_revision, new.adapter) == (
        old.uri, old.version, old.base_model, old.base_model_revision, old.adapter)


class Loader:
    """Makes one vLLM replica's loaded adapters equal the serving table (`set_table`), and reports each
    adapter's `AdapterState` with a `Reason` (`report`, pushed to `report_sinks` on change).

    `max_lora_rank` overrides the table's (the engine's real --max-lora-rank); `model_dir` is the base model's
    directory for the gate (default: the table's modelPath). Failed attempts back off exponentially from
    `backoff_base` to `backoff_max` seconds, `max_attempts` times; `resync` is the idle pass interval (seconds).
    `credentials_root`: where each adapter's credentials Secret is mounted (one folder per Secret); None: every
    adapter is fetched with the process environment (local runs, which have no Secrets).
    With `smoke_test`, each loaded adapter's greedy completion of `probe_prompt` (`probe_tokens` tokens) must
    differ from the base model's, else it is unloaded as NoEffect.
    An adapter that leaves the table while Ready drains first (`_drained`): it stays loaded at least
    `drain_seconds`, then until vLLM runs no request with it, at most the table's router.timeoutSeconds more.
    `engine_task` is the route's spec.engine.task: with `embed` (vLLM's pooling runner, no LoRA) the warm-up is
    one /v1/embeddings request instead of a completion, and every adapter in the table is refused
    (EmbeddingRouteNoAdapters) without being fetched.
    """

    def __init__(self, engine: VllmClient, cache: ArtifactCache, replica: str, *,
                 metrics: LoaderMetrics | None = None, model_dir: str | None = None,
                 max_lora_rank: int | None = None, smoke_test: bool = True,
                 probe_prompt: str = DEFAULT_PROBE_PROMPT, probe_tokens: int = 8, max_attempts: int = 5,
                 backoff_base: float = 1.0, backoff_max: float = 60.0, resync: float = 1.0,
                 engine_url: str | None = None, report_sinks: list[ReportSink] | None = None,
                 max_header_bytes: int = gate.MAX_ADAPTER_HEADER_BYTES,
                 credentials_root: str | Path | None = ADAPTER_CREDENTIALS_ROOT,
                 drain_seconds: float = DRAIN_SECONDS, engine_task: str = ENGINE_TASK_GENERATE):
        self.engine = engine
        self.cache = cache
        self.replica = replica
        self.metrics = metrics or LoaderMetrics()
        self.model_dir = model_dir
        self.max_lora_rank_override = max_lora_rank
        self.smoke_test = smoke_test
        self.probe_prompt = probe_prompt
        self.probe_tokens = probe_tokens
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.resync = resync
        self.engine_url = engine_url or engine.base_url
        self.report_sinks = list(report_sinks or [])
        self.max_header_bytes = max_header_bytes   # the gate's safetensors header limit (--max-header-bytes)
        self.credentials_root = Path(credentials_root) if credentials_root is not None else None
        if engine_task not in (ENGINE_TASK_GENERATE, ENGINE_TASK_EMBED):
            raise ValueError(f"engine_task must be {ENGINE_TASK_GENERATE} or {ENGINE_TASK_EMBED}, not {engine_task!r}")
        self.engine_task = engine_task
        self.table: ServingTable | None = None
        self.slots: dict[str, Slot] = {}
        self.unloading: dict[str, str] = {}   # served name -> since
        # served name -> time.monotonic() it left the table while Ready: loaded until drained (`_drained`)
        self.draining: dict[str, float] = {}
        self.drain_seconds = drain_seconds
        self.engine_ready = False     # vLLM answers /health
        self.engine_warm = False      # ...and has completed the warm-up completion since it came up
        self.applied_generation = 0
        self.last_pass: float = 0.0     # monotonic time the last pass ended (0: none yet)
        self.heartbeat: float = 0.0     # monotonic time the loop last ticked (0: not started)
        self.heartbeat_interval = HEARTBEAT_SECONDS
        self._loop_task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._base_probe: Probe | None = None
        self._base_facts: gate.BaseFacts | None = None
        self._last_published: str | None = None
        self._warmup: asyncio.Task | None = None
        self._warmup_error = ""
        self._warmup_not_before = 0.0
        self._engine_epoch = 0         # +1 each time the engine is lost or restarted: a stale warm-up is ignored

    # ---- desired state --------------------------------------------------------------------------------------
    def set_table(self, table: ServingTable) -> None:
        """Adopt a new serving table: new adapters get a slot, dropped ones (and changed artifacts under the
        same name) are queued for unloading, and the control loop wakes."""
        desired = {a.served_name: a for a in table.adapters}
        for name, slot in list(self.slots.items()):
            if name not in desired:
                del self.slots[name]
                self.unloading.setdefault(name, now_rfc3339())
                if slot.state == AdapterState.Ready:
                    # It served: routers may still send to it (their table or poll is a moment older), and
                    # requests routed to it run. It drains before it is unloaded (`_drained`).
                    self.draining.setdefault(name, time.monotonic())
            elif slot.desired != desired[name]:
                if _only_pinned(slot, desired[name]) or _same_served_artifact(slot, desired[name]):
                    # The Adapter recorded the digest this replica already verified: same artifact, no reload.
                    slot.desired = desired[name]
                    continue
                # Same served name, other artifact: reload it (the operator normally gives a new name instead).
                self.slots[name] = Slot(desired[name])
                self.unloading.setdefault(name, now_rfc3339())
        for name, want in desired.items():
            if name not in self.slots:
                self.slots[name] = Slot(want)
                self.unloading.pop(name, None)
                self.draining.pop(name, None)
        if self.table is None or (table.base_model, table.base_model_revision, table.model_path,
                                  table.served_model_name) != (self.table.base_model, self.table.base_model_revision,
                                                               self.table.model_path, self.table.served_model_name):
            self._base_facts = None
            self._base_probe = None
        self.table = table
        self.wake()

    def wake(self) -> None:
        """Start the next reconcile pass now instead of after `resync` seconds."""
        self._wake.set()

    @property
    def max_lora_rank(self) -> int:
        """vLLM's --max-lora-rank as the gate checks it: the override, else the table's, 0 without a table."""
        return self.max_lora_rank_override or (self.table.max_lora_rank if self.table else 0)

    # ---- the loop -------------------------------------------------------------------------------------------
    async def run(self) -> None:
        """The control loop: reconcile, then wait for a wake-up, the next due retry or `resync` seconds;
        an exception of a pass is logged and the next pass retries. Runs until cancelled. The loop beats
        (`heartbeat`) at every pass, every `heartbeat_interval` seconds while it waits, and while a long step
        of a pass runs (`_ticking`): `stalled` reads it for /healthz."""
        self._loop_task = asyncio.current_task()
        self.beat()
        while True:
            try:
                await self.reconcile_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must survive anything; the next pass retries
                log.exception("reconcile pass failed")
            self.last_pass = time.monotonic()
            self.beat()
            timeout = self.resync if self.engine_ready else min(self.resync, ENGINE_DOWN_POLL)
            retries = [s.next_try for s in self.slots.values() if not s.settled and s.next_try > time.monotonic()]
            if retries:
                timeout = max(0.05, min(timeout, min(retries) - time.monotonic()))
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                try:
                    await asyncio.wait_for(self._wake.wait(), min(left, self.heartbeat_interval))
                    break
                except asyncio.TimeoutError:
                    self.beat()   # a long resync must not look like a wedged loop
            self._wake.clear()

    def beat(self) -> None:
        """Record that the control loop is alive now (monotonic seconds in `heartbeat`)."""
        self.heartbeat = time.monotonic()

    def stalled(self, stall_seconds: float) -> str | None:
        """Why the control loop is not alive, or None when it is: its task ended (crashed or cancelled), or it
        has not ticked for `stall_seconds`. Before `run` started, None. A slow download or load is not a stall
        (`_ticking` beats while it runs); only a loop blocked outside those steps is."""
        task = self._loop_task
        if task is not None and task.done():
            return "the control loop stopped"
        if self.heartbeat and time.monotonic() - self.heartbeat > stall_seconds:
            return f"the control loop has not ticked for {time.monotonic() - self.heartbeat:.0f}s " \
                   f"(limit {stall_seconds:g}s)"
        return None

    async def _ticking(self, step: Awaitable[T]) -> T:
        """Await `step` in its own task, beating every `heartbeat_interval` seconds until it ends, and return
        its result (or raise its exception). Cancelling the caller cancels the step. The step's own timeouts
        (vLLM requests, the cache's download timeout) bound it; the heartbeat only says the loop is waiting on
        it rather than wedged."""
        task = asyncio.ensure_future(step)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.heartbeat_interval)
                self.beat()
                if done:
                    return task.result()
        finally:
            if not task.done():
                task.cancel()

    async def reconcile_once(self) -> None:
        """One pass: check vLLM's health and loaded adapters, reload adapters a restarted engine lost, unload
        what the table no longer has, bring up each due adapter (fetch, gate, load, smoke test) and publish."""
        if self.table is None:
            return
        try:
            healthy = await self.engine.healthy()
            loaded = await self.engine.loaded_adapters() if healthy else {}
        except (EngineError, aiohttp.ClientError, asyncio.TimeoutError, OSError):
            healthy, loaded = False, {}
        if not healthy:
            self._engine_lost("vLLM does not answer /health; every adapter is loaded again when it is back")
            await self.publish()
            return
        self.engine_ready = True

        lost = [s for n, s in self.slots.items() if s.state == AdapterState.Ready and n not in loaded]
        if lost:
            self.metrics.engine_restarts.inc()
            self._base_probe = None
            self._engine_cold()   # a restarted engine is cold again
            log.warning("engine lost %d adapter(s) (restarted?): reloading them", len(lost))
            for s in lost:
                s.attempts = 0
                s.next_try = 0.0
                s.move(AdapterState.Pending, Reason.EngineRestarted,
                       "vLLM no longer lists this adapter; loading it again")
        # What vLLM lists under a Ready adapter's name must be what this loader loaded (a model card's `root` is the
        # path it was loaded from): anyone who can reach vLLM's API could have unloaded it and loaded other
        # weights under the same name. Such an adapter is loaded again from its verified artifact (_load unloads
        # the impostor first, since the path differs). The replacement is published before the repair.
        replaced_by_others = False
        for name, s in self.slots.items():
            if (s.state == AdapterState.Ready and s.artifact is not None and name in loaded
                    and loaded[name] != str(s.artifact.path)):
                log.warning("vLLM serves %s from a path the loader did not load: loading its artifact again", name)
                s.attempts = 0
                s.next_try = 0.0
                s.move(AdapterState.Pending, Reason.AdapterReplaced,
                       f"vLLM served this name from {loaded[name]!r}, not from the verified artifact "
                       f"{str(s.artifact.path)!r}; loading the artifact again")
                replaced_by_others = True
        if replaced_by_others:
            await self.publish()
        self._start_warm_up()   # runs while the first adapter is fetched and gated (below)

        replaced = set(self.unloading) & set(loaded) & set(self.slots)   # same name, new artifact
        gone = sorted(set(loaded) - set(self.slots))
        keep = await self._draining_now([n for n in gone if n in self.draining])
        for name in [n for n in gone if n not in keep] + sorted(replaced):
            try:
                await self.engine.unload(name)
                self.metrics.unloads.inc()
                log.info("unloaded %s (not in the serving table)", name)
                loaded.pop(name, None)
            except (EngineError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                log.warning("unloading %s failed: %s (retrying next pass)", name, exc)
        self.unloading = {n: t for n, t in self.unloading.items() if n in loaded}
        self.draining = {n: t for n, t in self.draining.items() if n in loaded and n not in self.slots}

        table = self.table
        for name in sorted(self.slots):
            slot = self.slots.get(name)
            if slot is None or slot.settled or slot.next_try > time.monotonic():
                continue
            # Fetch, gate, load and smoke test can take minutes (a large download): the loop keeps beating.
            await self._ticking(self._bring_up(slot, loaded))
            await self.publish()
            if self.table is not table:   # a new table arrived meanwhile: start over with it
                return
        self.applied_generation = table.generation
        await self.publish()

    async def _draining_now(self, names: list[str]) -> set[str]:
        """Which of `names` (adapters that left the table while Ready, still loaded) keep draining this pass.

        One drains at least `drain_seconds` after it left (a router may have chosen it from its previous table
        or poll a moment ago; that request must find it loaded), then while vLLM runs or queues a request
        with it (`VllmClient.adapters_in_use`: vLLM counts every router's requests), and at most the table's
        router.timeoutSeconds after that (no request through a router lasts longer; also when vLLM's metrics
        cannot be read). vLLM's metrics are read once per pass, only when needed."""
        now = time.monotonic()
        cap = self.drain_seconds + (self.table.router.timeout_seconds if self.table else 0)
        keep, ask = set(), []
        for name in names:
            elapsed = now - self.draining[name]
            if elapsed < self.drain_seconds:
                keep.add(name)
            elif elapsed < cap:
                ask.append(name)
        if ask:
            in_use = await self.engine.adapters_in_use()
            keep |= {n for n in ask if in_use is None or n in in_use}
        return keep

    def _engine_lost(self, message: str) -> None:
        if self.engine_ready:
            log.warning("engine unavailable at %s", self.engine_url)
        self.engine_ready = False
        self._engine_cold()
        self._base_probe = None
        for s in self.slots.values():
            if s.state in (AdapterState.Ready, AdapterState.Loading, AdapterState.Fetching):
                s.attempts = 0
                s.move(AdapterState.Pending, Reason.EngineUnavailable, message)

    # ---- warm-up ----------------------------------------------------------------------------------------------
    @property
    def serving(self) -> bool:
        """True when the replica may get traffic: vLLM answers /health and has completed the warm-up."""
        return self.engine_ready and self.engine_warm

    def _engine_cold(self) -> None:
        """The engine went away or restarted: it must be warmed up again before the replica serves."""
        self._engine_epoch += 1
        self.engine_warm = False
        self.metrics.engine_ready.set(0)
        self._warmup_not_before = 0.0
        if self._warmup is not None and not self._warmup.done():
            self._warmup.cancel()
        self._warmup = None

    def _start_warm_up(self) -> None:
        """Start the warm-up completion in the background unless the engine is warm, one is running, or the
        last one failed less than `resync` seconds ago."""
        if self.engine_warm or self.table is None or time.monotonic() < self._warmup_not_before:
            return
        if self._warmup is None or self._warmup.done():
            self._warmup = asyncio.create_task(self._warm_up(self._engine_epoch), name="warm-up")

    async def _warm_up(self, epoch: int) -> None:
        """Send the warm-up completion (`WARMUP_PROMPT`, `WARMUP_TOKENS` greedy tokens with log-probabilities,
        to the base model) and mark the engine warm when it succeeds, unless the engine was lost meanwhile
        (`epoch` changed). A refusal of the request itself (HTTP 4xx: the engine is up) also counts as warm,
        with a warning. Other failures (5xx, connection errors, timeouts) are kept in `_warmup_error` for the
        adapters' messages and retried after `resync` seconds; it never raises."""
        started = time.monotonic()
        what = self._warmup_what
        try:
            if self.engine_task == ENGINE_TASK_EMBED:
                # A pooling engine has no completions endpoint: its first request is an embedding.
                await self.engine.embed(self.table.served_model_name, [WARMUP_PROMPT])
            else:
                await self.engine.probe(self.table.served_model_name, WARMUP_PROMPT, WARMUP_TOKENS)
        except asyncio.CancelledError:
            raise
        except EngineError as exc:
            if 400 <= exc.status < 500 and epoch == self._engine_epoch:
                # The engine is up and answered; it only refuses this request (e.g. extraArgs set
                # --max-logprobs 0). Keeping the replica out for that would wedge it: serve without the warm-up.
                log.warning("vLLM refused the warm-up %s (HTTP %d: %s); the replica serves without it "
                            "and its first request may be slow", what, exc.status, redacted(exc.message, MAX_MESSAGE))
                self.engine_warm = True
                self._warmup_error = ""
                self.metrics.engine_ready.set(1)
                self.wake()
                return
            self._warmup_error = f"vLLM answers /health but failed the warm-up {what}: {exc.message}"
        except Exception as exc:  # noqa: BLE001 - connection errors and anything else: retried, never raised
            self._warmup_error = f"the warm-up {what} failed: {type(exc).__name__}: {exc}".rstrip(": ")
        else:
            if epoch == self._engine_epoch:
                elapsed = time.monotonic() - started
                self.engine_warm = True
                self._warmup_error = ""
                self.metrics.engine_ready.set(1)
                self.metrics.load_seconds.labels("warmup").observe(elapsed)
                log.info("engine warm: its first %s took %.2fs; the replica serves now", what, elapsed)
            self.wake()
            return
        if epoch == self._engine_epoch:
            self._warmup_not_before = time.monotonic() + self.resync
            log.warning("%s (retrying in %.1fs)", redacted(self._warmup_error, MAX_MESSAGE), self.resync)
        self.wake()

    @property
    def _warmup_what(self) -> str:
        return "embedding" if self.engine_task == ENGINE_TASK_EMBED else "completion"

    async def _wait_warm(self) -> bool:
        """Wait for the warm-up (starting it when none runs); True when the engine is warm."""
        self._start_warm_up()
        if not self.engine_warm and self._warmup is not None:
            # asyncio.wait: neither cancels the warm-up when this pass is cancelled nor raises when the
            # warm-up itself was cancelled (the engine was lost meanwhile).
            await asyncio.wait({self._warmup})
        return self.engine_warm

    # ---- one adapter ----------------------------------------------------------------------------------------
    def _protected(self) -> set[Path]:
        return {s.artifact.path for s in self.slots.values() if s.artifact}

    async def _bring_up(self, slot: Slot, loaded: dict[str, str]) -> None:
        want = slot.desired
        name = want.served_name
        started = time.monotonic()
        steps: dict[str, float] = {}
        slot.attempts += 1
        if self.engine_task == ENGINE_TASK_EMBED:
            await self._failed(slot, Reason.EmbeddingRouteNoAdapters, "this route serves an embedding model "
                               "(spec.engine.task: embed, vLLM's pooling runner without LoRA): no adapter can be "
                               "loaded on it; serve the adapter from a route with engine.task generate", loaded)
            return
        try:
            slot.move(AdapterState.Fetching, Reason.Fetching, f"fetching {want.uri}")
            t = time.monotonic()
            art = await self.cache.fetch(want.uri, want.sha256, protect=self._protected(), version=want.version,
                                         credentials=self.credentials(want))
            slot.artifact = art
            steps["fetch"] = time.monotonic() - t
            self.metrics.load_seconds.labels("fetch").observe(steps["fetch"])
            self.metrics.cache_bytes.set(self.cache.total_bytes())

            t = time.monotonic()
            failures, note = await asyncio.to_thread(self._gate, want, art.path, slot)
            steps["gate"] = time.monotonic() - t
            self.metrics.load_seconds.labels("gate").observe(steps["gate"])
            if failures:
                for f in failures[1:]:
                    self.metrics.failures.labels(f.reason).inc()
                await self._failed(slot, failures[0].reason, " ".join(f"[{f.reason}] {f.message}." for f in failures),
                                   loaded)
                return

            if not self.engine_warm:
                # Fetch and gate ran during the warm-up; the load and the smoke test wait for it (its compile
                # would otherwise be paid by the probe, and a probe must not share a batch with it).
                slot.move(AdapterState.Loading, Reason.Loading, "waiting for vLLM's warm-up completion")
                if not await self._wait_warm():
                    slot.attempts -= 1   # not the adapter's fault
                    slot.next_try = self._warmup_not_before
                    slot.move(AdapterState.Pending, Reason.EngineUnavailable,
                              self._warmup_error or "vLLM is not warm yet; loading when it is")
                    return
            slot.move(AdapterState.Loading, Reason.Loading, f"loading {art.path} into vLLM")
            t = time.monotonic()
            path = str(art.path)
            if name in loaded and loaded[name] != path:
                await self.engine.unload(name)
                loaded.pop(name)
            if name not in loaded:
                await self.engine.load(name, path)
            now_loaded = await self.engine.loaded_adapters()
            if name not in now_loaded:
                raise EngineError(200, "vLLM accepted the load but does not list the adapter in /v1/models")
            loaded[name] = now_loaded[name]
            steps["load"] = time.monotonic() - t
            self.metrics.load_seconds.labels("load").observe(steps["load"])

            if self.smoke_test:
                t = time.monotonic()
                try:
                    base = await self._base_output()
                except EngineError as exc:
                    await self._failed(slot, Reason.LoadFailed, "the smoke-test completion through the base model "
                                       f"({self.table.served_model_name}) failed: vLLM answered {exc}", loaded)
                    return
                try:
                    probe = await self.engine.probe(name, self.probe_prompt, self.probe_tokens)
                except EngineError as exc:
                    await self._failed(slot, classify(exc, PROBE_REFUSALS), "the smoke-test completion through the "
                                       f"adapter failed: vLLM answered {exc}", loaded)
                    return
                steps["probe"] = time.monotonic() - t
                self.metrics.load_seconds.labels("probe").observe(steps["probe"])
                if not probe.finite:
                    await self._failed(slot, Reason.NonFiniteOutput,
                                       "the smoke-test completion through the adapter has NaN or infinite "
                                       f"log-probabilities ({list(probe.logprobs)[:4]}): its weights overflow in "
                                       "the engine's dtype; it was unloaded", loaded)
                    return
                if not probe.differs_from(base):
                    await self._failed(slot, Reason.NoEffect,
                                       f"a greedy probe through the adapter gave exactly the base model's output and "
                                       f"log-probabilities ({base.text!r}): it changes nothing, so it was unloaded. Its "
                                       "LoRA B matrices are probably zero (untrained or saved before training) or its "
                                       "target modules are not ones vLLM adapts; retrain it and check that the "
                                       "training loss decreased", loaded)
                    return
            elapsed = time.monotonic() - started
            self.metrics.load_seconds.labels("total").observe(elapsed)
            self.metrics.loads.inc()
            slot.next_try = 0.0
            breakdown = ", ".join(f"{k} {v:.2f}s" for k, v in steps.items())
            slot.move(AdapterState.Ready, Reason.Loaded,
                      f"loaded from {want.uri} (sha256 {art.sha256[:12]}) in {elapsed:.2f}s ({breakdown})"
                      + (f"; {note}" if note else ""))
        except FetchError as exc:
            await self._failed(slot, Reason(exc.reason), str(exc), loaded)   # the storage layer names it
        except EngineError as exc:   # from loading (the smoke test's errors are classified where it runs)
            reason = classify_load_error(exc)
            hint = ""
            if reason == Reason.AdapterNotFound:
                hint = (" (vLLM cannot read the loader's cache: mount the adapter cache volume in the vLLM "
                        "container at the same path as in the loader)")
            await self._failed(slot, reason, f"vLLM refused the load: {exc.message}{hint}", loaded)
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
            # The engine went away mid-load: not the adapter's fault, do not spend an attempt on it.
            slot.attempts -= 1
            self._engine_lost(f"vLLM went away while loading ({type(exc).__name__}); retrying when it is back")
            slot.move(AdapterState.Pending, Reason.EngineUnavailable,
                      "vLLM went away while loading; retrying when it is back")
        except Exception as exc:  # noqa: BLE001 - a bug must not wedge the adapter: bounded retries, then Failed
            log.exception("bringing up %s failed unexpectedly", name)
            await self._failed(slot, Reason.InternalError, f"{type(exc).__name__}: {exc}", loaded)

    def credentials(self, want: DesiredAdapter) -> Credentials | None:
        """The adapter's own credentials (its source.credentialsSecretRef, mounted under credentials_root), read
        for each fetch so a rotated Secret is used at the next one; None without a Secret, or without a
        credentials_root (then the environment's). Raises FetchError (retried) when the Secret's folder is not
        mounted in this replica: the table named the adapter before the Deployment rolled out a pod mounting
        it. An existing but empty folder is a missing Secret (an optional volume): the store refuses the fetch."""
        if not want.credentials_secret or self.credentials_root is None:
            return None
        parsed = try_parse_uri(want.uri)
        if parsed is None:
            return None   # the fetch reports the malformed URI
        folder = self.credentials_root / want.credentials_secret
        if not folder.is_dir():
            raise FetchError(f"Secret {want.credentials_secret} (source.credentialsSecretRef) is not mounted in this "
                             f"replica at {folder}: replicas that mount it are being rolled out")
        return Credentials.from_secret_dir(folder, want.credentials_secret, want.credentials_key, parsed)

    async def _failed(self, slot: Slot, reason: Reason, message: str, loaded: dict[str, str]) -> None:
        """Count a failed attempt and act on its `OUTCOMES` row: settle now (an outcome that cannot change), settle
        after the last attempt, or schedule a retry with backoff. A settled adapter that vLLM has loaded is
        unloaded: it must not keep a LoRA slot, nor serve a stale copy under its name."""
        self.metrics.failures.labels(reason).inc()
        outcome = OUTCOMES.get(reason, _TRANSIENT)
        if not outcome.retry:
            slot.move(outcome.settles, reason, message)
        elif slot.attempts >= self.max_attempts:
            slot.move(outcome.settles, reason, f"{message} (gave up after {slot.attempts} attempts; change the "
                                               "Adapter or restart the replica to try again)")
        else:
            delay = min(self.backoff_max, self.backoff_base * 2 ** (slot.attempts - 1))
            slot.next_try = time.monotonic() + delay
            slot.move(AdapterState.Pending, reason, f"{message} (attempt {slot.attempts}/{self.max_attempts}; "
                                         f"retrying in {delay:.1f}s)")
        name = slot.desired.served_name
        if slot.settled and name in loaded:
            try:
                await self.engine.unload(name)
                loaded.pop(name, None)
            except (EngineError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                log.warning("unloading %s after it failed did not work: %s", name, exc)

    async def _base_output(self) -> Probe:
        if self._base_probe is None:
            self._base_probe = await self.engine.probe(self.table.served_model_name, self.probe_prompt,
                                                       self.probe_tokens)
        return self._base_probe

    def _gate(self, want: DesiredAdapter, path: Path, slot: Slot | None = None) -> tuple[list[gate.GateFailure], str]:
        """(failures, note): the note says which checks could not run (base model files not readable). Sets
        `slot.rank` to the rank read from the artifact (None when it cannot be read)."""
        if slot is not None:
            slot.rank = None
        try:
            adapter = gate.read_adapter(path, self.max_header_bytes)
        except ValueError as exc:   # a GateError names its own reason (e.g. an oversized header)
            return [gate.GateFailure(getattr(exc, "reason", Reason.InvalidAdapter), str(exc))], ""
        if slot is not None:
            slot.rank = adapter.rank or None
        table = self.table
        model_path = self.model_dir or table.model_path
        if self._base_facts is None or not self._base_facts.weights:   # files may appear once vLLM fetched them
            where = gate.find_base_model_dir(table.base_model, table.base_model_revision, model_path)
            self._base_facts = gate.read_base(table.base_model, table.base_model_revision, where)
        base = self._base_facts
        failures = gate.check(adapter, base, max_lora_rank=self.max_lora_rank, declared_base=want.base_model,
                              declared_base_revision=want.base_model_revision, declared_rank=want.rank,
                              model_path=model_path)
        note = "" if base.weights else ("target modules and shapes were not checked: the base model's files "
                                        "are not readable by the loader (set the table's modelPath or mount "
                                        "the model cache)")
        return failures, note

    # ---- reporting ------------------------------------------------------------------------------------------
    def report(self) -> ReplicaReport:
        """This replica's ReplicaReport now: every slot's state, plus the adapters being unloaded."""
        adapters = {n: AdapterReport(state=s.state, reason=s.reason, message=s.message, since=s.since,
                                     attempts=s.attempts, sha256=_verified_digest(s), rank=s.rank)
                    for n, s in sorted(self.slots.items())}
        for name, since in sorted(self.unloading.items()):
            if name in self.slots:
                continue
            if name in self.draining:
                adapters[name] = AdapterReport(state=AdapterState.Draining, reason=Reason.Draining, since=since,
                                               message="no longer in the serving table; still loaded until vLLM "
                                                       "runs no request with it (then unloaded)")
                continue
            adapters[name] = AdapterReport(state=AdapterState.Unloading, reason=Reason.NotDesired, since=since,
                                           message="no longer in the serving table")
        return ReplicaReport(replica=self.replica, route=self.table.route if self.table else "",
                             generation=self.applied_generation, engine_ready=self.serving,
                             engine_url=self.engine_url, adapters=adapters, updated_at=now_rfc3339())

    async def publish(self) -> None:
        """Update the per-state gauges and push the report to every sink when it changed (updated_at aside);
        a failed sink is logged and retried on the next publish."""
        report = self.report()
        counts = {s: 0 for s in AdapterState}
        for a in report.adapters.values():
            counts[a.state] += 1
        for s, n in counts.items():
            self.metrics.adapters.labels(s).set(n)
        key = report.model_copy(update={"updated_at": ""}).model_dump_json()
        if key == self._last_published:
            return
        self._last_published = key
        for sink in self.report_sinks:
            try:
                await sink(report)
            except Exception as exc:  # noqa: BLE001 - a failed report is retried on the next change or pass
                log.warning("reporting to %s failed: %s", getattr(sink, "__name__", sink), exc)
                self._last_published = None
