"""Content routing, the decision (issue 15): which destination a request for a content-routed public model goes
to, by the methods of its `ContentModel` in order, each within its budget, with the default when none decides.

- rules (content.py's compiled rules): destinations in order, the first whose conditions all hold; the token
  count (only when a rule sets bounds) from this route's vLLM `/tokenize`, within TOKENIZE_TIMEOUT_MS;
- classifier: one short greedy `/v1/completions` request to `classifier.model` with
  `api.orchestration.classifier_prompt(text)`; the first word of the answer must be a destination's label;
- semantic: the request's embedding from `semantic.embedding_model` (`/v1/embeddings`), compared by
  `router/semantic.py`'s `SemanticIndex` (built once per table from the destinations' examples, through the same
  embedding sub-request) with the best example's cosine similarity at least `min_similarity`.

A method that does not choose is counted with why (`Fallback`: no-match, timeout, unavailable, invalid-answer)
and the next one runs; when none chooses, the default serves and the decision's fallback is the first reason
that is not no-match (else no-match): `api.orchestration.FALLBACK_HEADER` says it.

A chosen destination that cannot serve is not sent to: the default serves instead (fallback `unavailable`,
counted for the method that chose it), unless the default cannot serve either (then the destination gets it and
answers as it would). A public model of this route cannot serve when no usable replica has any of its weighted
backends Ready (`ReplicaPool.serves`); an external model cannot while it is marked unavailable: for
EXTERNAL_DOWN_DEFAULT_S (or its answer's Retry-After, at most EXTERNAL_DOWN_MAX_S) after a forward to it failed
before any byte reached the client (503, 502, or its router could not be reached: exchange.py calls
`mark_unavailable`). The check runs only when a method chose (never for a request naming a public model).

Sub-requests (classifier, embeddings, /tokenize) go to a public model: one this route serves goes to a usable
replica that has it Ready (its backend chosen by weight), with this route's engine key; one in the table's
`external_models` goes to that route's router URL with the client's own `Authorization` (never the engine key).
They use aiohttp (off the hot path; the proxy's own code is for the proxied request only) and read answers with
the bounded reader (`storage.httpbody.read_bounded`).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import math
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Callable

import aiohttp

from loraplane.api.orchestration import (DEFAULT_METHOD, DESTINATION_HEADER, FALLBACK_HEADER, METHOD_HEADER,
                                         classifier_max_tokens, classifier_prompt, parse_label)
from loraplane.router.content import CompiledContentModel
from loraplane.router.table import BackendRoute
from loraplane.storage.httpbody import read_bounded

if TYPE_CHECKING:
    from loraplane.router.server import Router

log = logging.getLogger("loraplane.router")


class Fallback(StrEnum):
    """Why a method did not choose a destination (FALLBACK_HEADER values; the fallback metric's `reason`)."""

    NoMatch = "no-match"
    """The method ran and chose nothing (no rule held; similarity below min_similarity)."""
    Timeout = "timeout"
    """The method's budget passed before its sub-request answered."""
    Unavailable = "unavailable"
    """Its model has no usable replica or route, the sub-request failed, or the semantic index is not built."""
    InvalidAnswer = "invalid-answer"
    """The classifier's answer does not start with a destination's label."""


# Budget of the /tokenize round trip for rules with token bounds (the API has no field for it: it is one
# tokenizer call, milliseconds on a replica).
TOKENIZE_TIMEOUT_MS = 500
# The most read of a sub-request's answer (a completion of a few tokens, one embedding, a token list).
SUB_BODY_MAX_BYTES = 4 * 1024 * 1024
# Building a semantic index: examples per /v1/embeddings request, the time the whole build may take, the bytes of
# one batch's answer, and how long after a failed build the next request may start another.
EMBED_BATCH = 32
INDEX_BUILD_TIMEOUT_S = 120.0
INDEX_BODY_MAX_BYTES = 64 * 1024 * 1024
INDEX_RETRY_S = 5.0
# A method's failures are logged at most this often (seconds) per (content model, method, reason).
WARN_INTERVAL_S = 10.0
# How long an external model stays marked unavailable after a forward to it failed (seconds): its answer's
# Retry-After when it has one (a route's router sends 2 with its 503), else the default; never over the cap, so a
# route that comes back gets content-routed traffic again within seconds.
EXTERNAL_DOWN_DEFAULT_S = 2.0
EXTERNAL_DOWN_MAX_S = 10.0


class MethodFailed(Exception):
    """A method did not choose a destination; `reason` says why."""

    def __init__(self, reason: Fallback, detail: str = ""):
        super().__init__(detail or reason.value)
        self.reason = reason


def decision_head(destination: str, method: str, fallback: Fallback | None) -> bytes:
    """The response header lines (each with CRLF) of a decision: DESTINATION_HEADER and METHOD_HEADER, and
    FALLBACK_HEADER when the default served. The name is JSON-escaped like X-Loraplane-Backend's value: a table
    cannot put a line break into an answer's head."""
    name = json.dumps(destination)[1:-1].encode()
    out = b"%s: %s\r\n%s: %s\r\n" % (DESTINATION_HEADER.encode(), name, METHOD_HEADER.encode(), method.encode())
    if fallback is not None:
        out += b"%s: %s\r\n" % (FALLBACK_HEADER.encode(), fallback.value.encode())
    return out


@dataclass(slots=True)   # not frozen: a frozen dataclass's __init__ costs ~1 us, once per request here
class Decision:
    """Where one request goes: the destination public model, the method that chose it (or DEFAULT_METHOD), why
    the default served (None when a method chose), how long the decision took (seconds), and the response header
    lines that say it (`head`: decision_head's); `rewrite`: the destination in the form table.rewrite_model
    takes (its name as the new `model`)."""

    destination: str
    method: str
    fallback: Fallback | None
    seconds: float
    head: bytes
    rewrite: BackendRoute


@dataclass(frozen=True, slots=True)
class Pending:
    """What `Orchestrator.decide_now` leaves to `decide`: resume at method `index`, with the first failure so far
    and the decision's start (time.perf_counter())."""

    index: int
    first_failure: Fallback | None
    started: float


# `_rules_now`: a matching rule has token bounds (the count needs a /tokenize round trip).
_NEEDS_TOKENS = object()


@dataclass(frozen=True, slots=True)
class Target:
    """Where a sub-request for a public model goes: base URL, the `model` to send, the headers, and the replica
    (None for an external model) whose in-flight count it holds while it runs."""

    url: str
    model: str
    headers: dict[str, str]
    replica: Any = None


class _IndexState:
    __slots__ = ("index", "task", "failed_at", "error")

    def __init__(self):
        self.index = None
        self.task: asyncio.Task | None = None
        self.failed_at = 0.0
        self.error = ""


def semantic_index_class():
    """`router.semantic.SemanticIndex` (orch-semantic's module), imported when first needed; None when this
    build has no such module (the method is then `unavailable`)."""
    try:
        return importlib.import_module("loraplane.router.semantic").SemanticIndex
    except (ImportError, AttributeError):
        return None


class Orchestrator:
    """Runs content-routing decisions for one router: its aiohttp session for sub-requests, the semantic indexes
    (per content model's destinations and embedding model, kept while the table keeps them) and the metrics.
    `index_class` is the SemanticIndex implementation (default: router/semantic.py's, imported lazily)."""

    def __init__(self, router: Router, index_class: Callable[[], Any] | None = None):
        self.router = router
        self._session: aiohttp.ClientSession | None = None
        self._indexes: dict[str, _IndexState] = {}
        self._index_class = index_class or semantic_index_class
        self._warned: dict[tuple[str, str, Fallback], float] = {}
        # External model name -> time.monotonic() until which it is unavailable (mark_unavailable).
        self._down: dict[str, float] = {}

    # ---- destinations' availability ----

    def available(self, name: str) -> bool:
        """Whether the destination `name` can serve a request now: a public model of this route when some usable
        replica has one of its backends (weight > 0) Ready; an external model unless it is marked unavailable;
        any other name True (the named-model path answers it, e.g. 404). O(backends x replicas), run only for a
        content-routed request."""
        table = self.router.table
        route = table.models.get(name) if table is not None else None
        if route is not None:
            serves = self.router.pool.serves
            return any(b.weight > 0 and serves(b.served_name) for b in route.backends)
        until = self._down.get(name)
        if until is None:
            return True
        if time.monotonic() < until:
            return False
        del self._down[name]
        return True

    def mark_unavailable(self, name: str, retry_after: bytes | None = None) -> float:
        """Mark the external model `name` unavailable (a forward to it failed before answering the client): for
        `retry_after` seconds (its answer's Retry-After value, delta-seconds) within [0, EXTERNAL_DOWN_MAX_S],
        else EXTERNAL_DOWN_DEFAULT_S. Returns the seconds marked. Kept for names the current table has."""
        seconds = EXTERNAL_DOWN_DEFAULT_S
        if retry_after is not None:
            try:
                seconds = min(max(float(int(retry_after.strip())), 0.0), EXTERNAL_DOWN_MAX_S)
            except ValueError:   # an HTTP-date or garbage: the default
                pass
        if len(self._down) >= 4096:
            self._down.clear()
        self._down[name] = time.monotonic() + seconds
        return seconds

    def fall_back(self, content: CompiledContentModel, decision: Decision) -> Decision | None:
        """The decision to serve `decision`'s request by the default instead, because its destination turned
        out unavailable after it was sent there (nothing reached the client; exchange.py): counted as fallback
        `unavailable` of the method that chose, not as a second decision. None when a method did not choose
        (the default already served) or the default is unavailable too."""
        src = content.source
        if decision.fallback is not None or decision.destination == src.default or not self.available(src.default):
            return None
        self.router.metrics.count_fallback(src.name, decision.method, Fallback.Unavailable.value)
        head, rewrite, _count = self._rendered(content, src.default, DEFAULT_METHOD, Fallback.Unavailable)
        return Decision(src.default, DEFAULT_METHOD, Fallback.Unavailable, decision.seconds, head, rewrite)

    # ---- the decision ----

    def decide_now(self, content: CompiledContentModel, text: bytes,
                   headers: dict[bytes, bytes] | None) -> Decision | Pending:
        """The decision, when it needs no I/O: the methods in order while they are `rules` whose matching rule
        has no token bounds (pure CPU, no task: the common case costs no event-loop round trip). Otherwise a
        `Pending` for `decide`, which goes on from there. Counts what it decides, as `decide` does."""
        started = time.perf_counter()
        src = content.source
        for i, method in enumerate(src.methods):
            if method != "rules":
                return Pending(i, None, started)
            destination = self._rules_now(content, text, headers)
            if destination is _NEEDS_TOKENS:
                return Pending(i, None, started)
            if destination is not None:
                return self._decided(content, destination, method, None, started)
            self.router.metrics.count_fallback(src.name, method, Fallback.NoMatch.value)
        return self._decided(content, src.default, DEFAULT_METHOD, Fallback.NoMatch, started)

    @staticmethod
    def _rules_now(content: CompiledContentModel, text: bytes, headers: dict[bytes, bytes] | None):
        for rule in content.rules:
            if rule.match_text(text, headers):
                return _NEEDS_TOKENS if rule.needs_tokens else rule.destination
        return None

    async def decide(self, content: CompiledContentModel, text: bytes, headers: dict[bytes, bytes] | None,
                     authorization: bytes | None, pending: Pending | None = None) -> Decision:
        """Run the content model's methods in order (from `pending.index` when `decide_now` started) on the
        decision text (content.decision_text), the request's rule headers (lower-cased name -> value) and the
        client's Authorization (for external models); never raises for a method's failure (counted, next
        method). Counts the decision and its latency."""
        started = pending.started if pending is not None else time.perf_counter()
        src = content.source
        metrics = self.router.metrics
        first_failure: Fallback | None = pending.first_failure if pending is not None else None
        tokens: list[int] = []   # the token count, once counted (rules)
        for method in src.methods[pending.index if pending is not None else 0:]:
            try:
                destination = await self._run(method, content, text, headers, authorization, tokens)
            except MethodFailed as failed:
                reason = failed.reason
                if reason is not Fallback.NoMatch:
                    self._warn(src.name, method, reason, str(failed))
            except asyncio.TimeoutError:
                reason = Fallback.Timeout
                self._warn(src.name, method, reason, "past its budget")
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                reason = Fallback.Unavailable
                self._warn(src.name, method, reason, f"{type(exc).__name__}: {exc}")
            except asyncio.CancelledError:
                raise
            except Exception:   # a bug in one method must not fail the request: the default serves
                reason = Fallback.Unavailable
                log.exception("content model %s: method %s failed", src.name, method)
            else:
                return self._decided(content, destination, method, None, started)
            metrics.count_fallback(src.name, method, reason.value)
            if first_failure is None and reason is not Fallback.NoMatch:
                first_failure = reason
        return self._decided(content, src.default, DEFAULT_METHOD, first_failure or Fallback.NoMatch, started)

    def _warn(self, model: str, method: str, reason: Fallback, detail: str) -> None:
        """Log why a method failed, at most once per WARN_INTERVAL_S per (model, method, reason): an outage of a
        classifier's route must not write a line per request (the fallback counter counts every one)."""
        key = (model, method, reason)
        now = time.monotonic()
        if now - self._warned.get(key, -WARN_INTERVAL_S) >= WARN_INTERVAL_S:
            self._warned[key] = now
            log.warning("content model %s: method %s fell back (%s): %s; the default or the next method serves "
                        "(logged at most every %g s)", model, method, reason.value, detail[:300], WARN_INTERVAL_S)

    def _decided(self, content: CompiledContentModel, destination: str, method: str, fallback: Fallback | None,
                 started: float) -> Decision:
        if fallback is None:
            src = content.source
            if destination != src.default and not self.available(destination) and self.available(src.default):
                # The chosen destination cannot serve: the default does (said by the header and the counter).
                self.router.metrics.count_fallback(src.name, method, Fallback.Unavailable.value)
                destination, method, fallback = src.default, DEFAULT_METHOD, Fallback.Unavailable
        head, rewrite, count = self._rendered(content, destination, method, fallback)
        d = Decision(destination, method, fallback, time.perf_counter() - started, head, rewrite)
        count.count(d.seconds)
        if content.source.log_decisions:
            # Never the prompt (nor the client's headers): what was decided, how, and how long it took.
            log.info("content routing: model=%s destination=%s method=%s%s %.1fms", content.name, destination,
                     method, f" fallback={fallback.value}" if fallback else "", d.seconds * 1000)
        return d

    def _rendered(self, content: CompiledContentModel, destination: str, method: str,
                  fallback: Fallback | None) -> tuple[bytes, BackendRoute, Any]:
        """(the decision's response header lines, the rewrite target, its DecisionCount): made once per content
        model of a table and possible decision (bounded by the table), not per request."""
        key = (destination, method, fallback)
        rendered = content.decided.get(key)
        if rendered is None:
            rendered = content.decided[key] = (
                decision_head(destination, method, fallback), BackendRoute(destination, None, 0),
                self.router.metrics.decision_count(content.name, destination, method))
        return rendered

    async def _run(self, method: str, content: CompiledContentModel, text: bytes,
                   headers: dict[bytes, bytes] | None, authorization: bytes | None, tokens: list[int]) -> str:
        src = content.source
        if method == "rules":
            return await self._rules(content, text, headers, tokens)
        if method == "classifier":
            if src.classifier is None:
                raise MethodFailed(Fallback.Unavailable, "no classifier is set")
            return await asyncio.wait_for(self._classify(content, text, authorization),
                                          src.classifier.timeout_ms / 1000)
        if method == "semantic":
            if src.semantic is None:
                raise MethodFailed(Fallback.Unavailable, "no semantic settings are set")
            return await self._semantic(content, text, authorization, src.semantic.timeout_ms / 1000)
        raise MethodFailed(Fallback.Unavailable, f"unknown method {method!r}")

    # ---- rules ----

    async def _rules(self, content: CompiledContentModel, text: bytes, headers: dict[bytes, bytes] | None,
                     tokens: list[int]) -> str:
        for rule in content.rules:
            if not rule.match_text(text, headers):
                continue
            if rule.needs_tokens:
                if not tokens:
                    tokens.append(await asyncio.wait_for(self._count_tokens(text), TOKENIZE_TIMEOUT_MS / 1000))
                if not rule.match_tokens(tokens[0]):
                    continue
            return rule.destination
        raise MethodFailed(Fallback.NoMatch)

    async def _count_tokens(self, text: bytes) -> int:
        """The decision text's token count by this route's vLLM (`/tokenize` of the base model: adapters share
        its tokenizer)."""
        router = self.router
        base = router.table.base_served_name if router.table is not None else ""
        replica = router.pool.choose(base) if base else None
        if replica is None:
            raise MethodFailed(Fallback.Unavailable, "no replica of this route is ready to count tokens")
        target = Target(replica.engine_url, base, dict(router.pool.engine_headers), replica)
        answer = await self._post(target, "/tokenize", {"model": base, "prompt": text.decode("utf-8"),
                                                        "add_special_tokens": False})
        count = answer.get("count") if isinstance(answer, dict) else None
        if type(count) is not int or count < 0:
            raise ValueError("/tokenize answered without a token count")
        return count

    # ---- classifier ----

    async def _classify(self, content: CompiledContentModel, text: bytes, authorization: bytes | None) -> str:
        classifier = content.source.classifier
        target = self.target(classifier.model, authorization)
        if target is None:
            raise MethodFailed(Fallback.Unavailable, f"the classifier `{classifier.model}` has no usable replica "
                                                     "or route")
        max_tokens = classifier_max_tokens(content.max_label_chars)
        answer = await self._post(target, "/v1/completions", {
            "model": target.model, "prompt": classifier_prompt(text.decode("utf-8")), "max_tokens": max_tokens,
            "temperature": 0, "stream": False})
        try:
            completion = answer["choices"][0]["text"]
        except (KeyError, IndexError, TypeError):
            raise MethodFailed(Fallback.InvalidAnswer, "the classifier's answer has no choices[0].text") from None
        label = parse_label(completion)
        destination = content.labels.get(label) if label is not None else None
        if destination is None:
            raise MethodFailed(Fallback.InvalidAnswer,
                               f"the classifier answered {str(completion)[:40]!r}, not a destination's label")
        return destination

    # ---- semantic ----

    async def _semantic(self, content: CompiledContentModel, text: bytes, authorization: bytes | None,
                        budget: float) -> str:
        deadline = time.monotonic() + budget
        index = await self._index(content, authorization, budget)
        semantic = content.source.semantic
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise asyncio.TimeoutError
        vectors = await asyncio.wait_for(self._embed(semantic.embedding_model, [text.decode("utf-8")],
                                                     authorization, SUB_BODY_MAX_BYTES), remaining)
        best = index.nearest(vectors[0])
        if best is None:
            raise MethodFailed(Fallback.NoMatch)
        model, similarity = best
        if not similarity >= semantic.min_similarity:
            raise MethodFailed(Fallback.NoMatch)
        return model

    async def _index(self, content: CompiledContentModel, authorization: bytes | None, budget: float):
        """The content model's SemanticIndex, built on first use (and again INDEX_RETRY_S after a failed build),
        waited for up to `budget` seconds; the build goes on after a request stops waiting for it."""
        key = content.semantic_key
        state = self._indexes.get(key)
        if state is None:
            state = self._indexes[key] = _IndexState()
        if state.index is not None:
            return state.index
        if state.task is None:
            if state.failed_at and time.monotonic() - state.failed_at < INDEX_RETRY_S:
                raise MethodFailed(Fallback.Unavailable, f"the semantic index could not be built: {state.error}")
            index_class = self._index_class()
            if index_class is None:
                raise MethodFailed(Fallback.Unavailable, "this router has no semantic index (router/semantic.py)")
            state.task = asyncio.get_running_loop().create_task(
                self._build(state, index_class, content, authorization))
        await asyncio.wait_for(asyncio.shield(state.task), budget)
        if state.index is None:
            raise MethodFailed(Fallback.Unavailable, f"the semantic index could not be built: {state.error}")
        return state.index

    async def _build(self, state: _IndexState, index_class, content: CompiledContentModel,
                     authorization: bytes | None) -> None:
        model = content.source.semantic.embedding_model

        async def embed(texts: list[str]) -> list[list[float]]:
            out: list[list[float]] = []
            for i in range(0, len(texts), EMBED_BATCH):
                out += await self._embed(model, list(texts[i:i + EMBED_BATCH]), authorization, INDEX_BODY_MAX_BYTES)
            return out

        try:
            state.index = await asyncio.wait_for(index_class.build(list(content.source.destinations), embed),
                                                 INDEX_BUILD_TIMEOUT_S)
            log.info("content model %s: semantic index built (embedding model %s)", content.name, model)
        except asyncio.CancelledError:
            raise
        except Exception as exc:   # any failure: the method is unavailable until a later request retries
            state.failed_at = time.monotonic()
            state.error = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("content model %s: building the semantic index failed: %s", content.name, state.error)
        finally:
            state.task = None

    async def _embed(self, model: str, texts: list[str], authorization: bytes | None, limit: int) -> list[list[float]]:
        """Embeddings of `texts` from the public model `model` (`/v1/embeddings`), one finite vector per text."""
        target = self.target(model, authorization)
        if target is None:
            raise MethodFailed(Fallback.Unavailable, f"the embedding model `{model}` has no usable replica or route")
        answer = await self._post(target, "/v1/embeddings", {"model": target.model, "input": texts}, limit)
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list) or len(data) != len(texts):
            raise ValueError(f"/v1/embeddings of `{model}` answered {len(data) if isinstance(data, list) else 'no'} "
                             f"embeddings for {len(texts)} inputs")
        vectors: list[list[float] | None] = [None] * len(texts)
        for pos, item in enumerate(data):
            vec = item.get("embedding") if isinstance(item, dict) else None
            i = item.get("index", pos) if isinstance(item, dict) else pos
            if (not isinstance(vec, list) or not vec or type(i) is not int or not 0 <= i < len(texts)
                    or not all(type(x) in (int, float) and math.isfinite(x) for x in vec)):
                raise ValueError(f"/v1/embeddings of `{model}`: item {pos} is not a finite vector")
            vectors[i] = vec
        if any(v is None for v in vectors):
            raise ValueError(f"/v1/embeddings of `{model}`: an input has no embedding")
        return vectors   # type: ignore[return-value]

    # ---- sub-requests ----

    def target(self, name: str, authorization: bytes | None) -> Target | None:
        """Where a sub-request for the public model `name` goes (see the module docstring); None when this
        route serves it but no replica has a backend of it Ready, or nobody serves it."""
        router = self.router
        table = router.table
        if table is None:
            return None
        route = table.models.get(name)
        if route is not None:
            pool, skipped = router.pool, set()
            backend = route.pick(router.rng)
            while backend is not None:
                replica = pool.choose(backend.served_name)
                if replica is not None:
                    return Target(replica.engine_url, backend.served_name, dict(pool.engine_headers), replica)
                skipped.add(backend)
                backend = route.pick(router.rng, None, skipped)
            return None
        external = table.external.get(name)
        if external is not None:
            headers = {"Authorization": authorization.decode("latin-1")} if authorization else {}
            return Target(external.url.rstrip("/"), name, headers)
        return None

    async def _post(self, target: Target, path: str, payload: dict, limit: int = SUB_BODY_MAX_BYTES) -> Any:
        """POST `payload` as JSON to `target`; the parsed JSON answer. Raises MethodFailed(unavailable) for a
        non-200 answer, ValueError for an unreadable one, aiohttp errors for the transport."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=INDEX_BUILD_TIMEOUT_S, connect=self.router.connect_timeout),
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30))
        url = target.url + path
        replica = target.replica
        if replica is not None:
            replica.in_flight += 1   # the replica's load as the proxy sees it, while the sub-request runs
        try:
            async with self._session.post(url, json=payload, headers=target.headers, allow_redirects=False) as resp:
                body = await read_bounded(resp, limit, url)
                if resp.status != 200:
                    raise MethodFailed(Fallback.Unavailable, f"{url} answered {resp.status}: "
                                                             f"{body[:200].decode('utf-8', 'replace')}")
        finally:
            if replica is not None:
                replica.in_flight -= 1
        return json.loads(body)

    def forget_unused(self, keys: set[str]) -> None:
        """Drop the semantic indexes no content model of the current table uses (called on a table change)."""
        for key in list(self._indexes):
            if key not in keys:
                state = self._indexes.pop(key)
                if state.task is not None:
                    state.task.cancel()

    async def close(self) -> None:
        """Close the sub-request session and stop index builds (the router is shutting down)."""
        self.forget_unused(set())
        if self._session is not None:
            await self._session.close()
            self._session = None

