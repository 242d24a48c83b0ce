"""The routing table compiled from a `ServingTable`, and the request-body surgery on `model`.

Pure code (no I/O): which backend (vLLM served name) a request for a public model name goes to,
by weight or sticky by a header value, and how its body is rewritten.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import random
import re
from dataclasses import dataclass, field

from loraplane.api.wire.serving import ServingTable

STICKY_CACHE_SIZE = 65536
_MODEL_KEY = b'"model"'
# After the key: `: "value"` where the value has no escapes (the common case; anything else is parsed).
_SIMPLE_VALUE = re.compile(rb'\s*:\s*"([^"\\]*)"')


class BadRequest(ValueError):
    """The client's request cannot be routed; the message names the field and the fix."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(slots=True, eq=False)
class BackendRoute:
    """One destination of a public model: a vLLM served name (base model or adapter version)."""

    served_name: str
    adapter: str | None
    weight: int
    # The served name as it appears inside a JSON string (escaped once, at table load).
    served_json: bytes = b""
    # Filled by Router.set_table: its metric children, so the hot path does no label lookups.
    stats: object = None

    def __post_init__(self):
        self.served_json = json.dumps(self.served_name, ensure_ascii=False)[1:-1].encode()

    @property
    def is_base(self) -> bool:
        """The route's base model (no adapter): vLLM always has it, so a 404 from vLLM is not resent."""
        return self.adapter is None


@dataclass(slots=True, eq=False)
class PublicRoute:
    """A public model name and its weighted backends."""

    name: str
    backends: tuple[BackendRoute, ...]
    _cumulative: list[int] = field(default_factory=list)
    _total: int = 0
    # sticky key -> backend: the hash per backend is the costliest step of a request otherwise. The table
    # is immutable (a new one is compiled on change), so entries never go stale; the size is capped.
    _sticky: dict[bytes, BackendRoute] = field(default_factory=dict)

    def __post_init__(self):
        total = 0
        for b in self.backends:
            total += b.weight
            self._cumulative.append(total)
        self._total = total

    def pick(self, rng: random.Random, sticky_key: bytes | None = None,
             exclude: frozenset[BackendRoute] | set[BackendRoute] = frozenset()) -> BackendRoute | None:
        """The backend for one request: weighted random, or weighted rendezvous hashing of the sticky key.

        Rendezvous (highest random weight) hashing keeps a caller on one version across router replicas and
        restarts, and when a canary's weight changes only the callers whose share moves change version.
        `exclude` drops backends that have no usable replica; the rest keep their relative weights.
        """
        if sticky_key is not None:
            if not exclude:
                cached = self._sticky.get(sticky_key)
                if cached is not None:
                    return cached
            best, best_score = None, -1.0
            for b in self.backends:
                if b.weight <= 0 or b in exclude:
                    continue
                digest = hashlib.blake2b(sticky_key, digest_size=8, key=b.served_json[:64]).digest()
                # A uniform u in (0, 1]; score = w / -ln(u) is the weighted HRW score.
                u = (int.from_bytes(digest, "big") + 1) / 18446744073709551616.0
                score = b.weight / -math.log(u) if u < 1.0 else math.inf
                if score > best_score:
                    best, best_score = b, score
            if not exclude and best is not None:
                if len(self._sticky) >= STICKY_CACHE_SIZE:
                    self._sticky.clear()
                self._sticky[sticky_key] = best
            return best
        if not exclude:
            if self._total <= 0:
                return None
            if len(self.backends) == 1:
                return self.backends[0]
            return self.backends[bisect.bisect_right(self._cumulative, rng.random() * self._total)]
        remaining = [b for b in self.backends if b.weight > 0 and b not in exclude]
        if not remaining:
            return None
        return rng.choices(remaining, weights=[b.weight for b in remaining])[0]


@dataclass(slots=True, eq=False)
class RoutingTable:
    """What the router needs from a ServingTable, prepared once per table version."""

    source: ServingTable
    models: dict[str, PublicRoute]
    base_served_name: str
    models_json: bytes  # the /v1/models answer, rendered once
    # Entries left out, one readable line each ("models[3] 'x': ..."): one bad entry never costs the rest.
    dropped: list[str] = field(default_factory=list)

    @classmethod
    def compile(cls, table: ServingTable) -> "RoutingTable":
        """Compile a validated ServingTable. An entry that cannot be routed is left out and listed in `dropped`,
        never the whole table: a public model name already taken (the first entry keeps it, as the operator's
        resolution keeps the first source)."""
        models: dict[str, PublicRoute] = {}
        dropped: list[str] = []
        for i, pm in enumerate(table.models):
            if pm.name in models:
                dropped.append(f"models[{i}] {pm.name!r}: the name appears twice; the first entry serves it")
                continue
            backends = tuple(BackendRoute(b.served_name, b.adapter, b.weight) for b in pm.backends)
            models[pm.name] = PublicRoute(pm.name, backends)
        listing = {"object": "list",
                   "data": [{"id": name, "object": "model", "created": 0, "owned_by": table.route,
                             "root": name, "parent": None} for name in models]}
        return cls(source=table, models=models, base_served_name=table.served_model_name,
                   models_json=json.dumps(listing, separators=(",", ":")).encode(), dropped=dropped)

    @property
    def sticky_header(self) -> str | None:
        """The route's router.stickyHeader (a header name), or None."""
        return self.source.router.sticky_header


def read_model(body: bytes) -> tuple[str, object]:
    """The request's top-level `model` and a handle for `rewrite_model`.

    Fast path, no JSON parse: the body holds `"model"` exactly once, right after the opening brace,
    with an unescaped string value (a JSON string cannot contain an unescaped quote, so that
    occurrence is the key). Otherwise the body is parsed; it is re-encoded only when the raw value
    cannot be spliced (escapes, duplicate keys, or `"model"` also appearing nested).
    """
    i = body.find(_MODEL_KEY)
    if i >= 0 and body.find(_MODEL_KEY, i + 7) < 0:
        m = _SIMPLE_VALUE.match(body, i + 7)
        if m is not None and body[:i].strip() == b"{":
            return m.group(1).decode("utf-8", "replace"), m.span(1)
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadRequest("the request body must be a JSON object with a `model` field")
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("`model` is required: set it to one of the names listed by GET /v1/models", "model")
    if i >= 0 and body.find(_MODEL_KEY, i + 7) < 0:
        m = _SIMPLE_VALUE.match(body, i + 7)
        if m is not None and m.group(1) == model.encode():
            return model, m.span(1)  # the only occurrence, and it is the top-level key
    return model, obj


def rewrite_model(body: bytes, handle: object, backend: BackendRoute) -> bytes:
    """The body with only `model` changed to the backend's served name."""
    if type(handle) is tuple:
        start, end = handle
        return b"".join((body[:start], backend.served_json, body[end:]))
    obj = dict(handle)  # a parsed body: re-encode (rare: escapes, duplicate or nested `model` keys)
    obj["model"] = backend.served_name
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
