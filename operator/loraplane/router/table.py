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
from urllib.parse import urlsplit

from loraplane.api.wire.serving import ServingTable
from loraplane.router.content import CompiledContentModel

STICKY_CACHE_SIZE = 65536
# Sticky header values longer than this are routed by the same hash but not cached: the cache holds
# client-chosen keys, and 65536 of them at the header cap (64 KiB) would be 4 GiB.
STICKY_CACHE_KEY_BYTES = 256
# Scans of whole bodies are compiled patterns: on CPython 3.11 `re` finds these literals in about half
# the time of bytes.find.
_MODEL_KEY = re.compile(rb'"model"')
# The only way a JSON key can spell `model` other than literally: a \u escape of one of its letters
# (m o d e l are U+006D U+006F U+0064 U+0065 U+006C; JSON has no other escapes for letters). A body
# without this prefix anywhere has every top-level `model` key written as the literal `"model"`.
_LETTER_ESCAPE = re.compile(rb"\\u006")
_UTF16_32_START = (b"\xfe", b"\xff")  # first byte of a UTF-16/32 BOM (the UTF-32-BE one starts with NUL)
# After the key: `: "value"` where the value has no escapes (the common case; anything else is parsed).
_SIMPLE_VALUE = re.compile(rb'\s*:\s*"([^"\\]*)"')


BACKEND_HEADER = "X-Loraplane-Backend"  # tells the caller which version answered (canaries, debugging)


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
    # The answer's `X-Loraplane-Backend: <served name>` header line (with CRLF), rendered once.
    header_line: bytes = b""

    def __post_init__(self):
        self.served_json = json.dumps(self.served_name, ensure_ascii=False)[1:-1].encode()
        self.header_line = b"%s: %s\r\n" % (BACKEND_HEADER.encode(), self.served_json)

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
            if not exclude and best is not None and len(sticky_key) <= STICKY_CACHE_KEY_BYTES:
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


# The backend label (metrics, logs) of a model forwarded to another route's router: `route:<route name>`.
EXTERNAL_BACKEND_PREFIX = "route:"


@dataclass(slots=True, eq=False)
class ExternalRoute:
    """A public model of another ModelRoute (`ServingTable.external_models`): its requests are forwarded, body
    unchanged, to that route's router (`url`, built by the operator or the gateway from the route's name and
    namespace), with the client's own Authorization, never this route's engine key (router/forward.py). That
    router does its own weights, replica choice and metrics; here it is one backend, `route:<route>`."""

    name: str
    route: str
    url: str
    backend: BackendRoute = field(init=False)
    # The upstream (a `replicas.Replica` with `external` set: its kept-alive connections), assigned by
    # Router.set_table and shared by every name of the same URL across table versions.
    replica: object = None

    def __post_init__(self):
        # adapter None: a 404 from the other router is its answer (unknown name), never resent here.
        self.backend = BackendRoute(EXTERNAL_BACKEND_PREFIX + self.route, None, 1)


@dataclass(slots=True, eq=False)
class RoutingTable:
    """What the router needs from a ServingTable, prepared once per table version."""

    source: ServingTable
    models: dict[str, PublicRoute]
    base_served_name: str
    models_json: bytes  # the /v1/models answer, rendered once
    # Entries left out, one readable line each ("models[3] 'x': ..."): one bad entry never costs the rest.
    dropped: list[str] = field(default_factory=list)
    # Issue 15: content-routed public names (looked up only when `models` has no such name, so a request naming
    # a public model pays nothing for them), the public models of other routes they reach, and the request
    # headers any content rule reads (lower-cased; the client connection keeps only those, see client_protocol).
    content: dict[str, CompiledContentModel] = field(default_factory=dict)
    # What is kept but will not work as written, one line each (a content model's destination nobody serves).
    warnings: list[str] = field(default_factory=list)
    external: dict[str, ExternalRoute] = field(default_factory=dict)
    rule_headers: frozenset[bytes] = frozenset()

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
        external: dict[str, ExternalRoute] = {}
        for i, em in enumerate(table.external_models):
            if em.name in models or em.name in external:
                dropped.append(f"external_models[{i}] {em.name!r}: the name is already served here; that entry "
                               "serves it")
                continue
            problem = external_url_problem(em.url)
            if problem is not None:
                dropped.append(f"external_models[{i}] {em.name!r}: {problem}")
                continue
            external[em.name] = ExternalRoute(em.name, em.route, em.url.rstrip("/"))
        content: dict[str, CompiledContentModel] = {}
        warnings: list[str] = []
        for i, cm in enumerate(table.content_models):
            if cm.name in models or cm.name in external or cm.name in content:
                dropped.append(f"content_models[{i}] {cm.name!r}: the name is already a public model; that "
                               "entry serves it")
                continue
            compiled = CompiledContentModel.compile(cm, f"content_models[{i}]")
            dropped += compiled.problems
            for name, role in ((cm.default, "default"), *((d.model, "destination") for d in cm.destinations)):
                if name not in models and name not in external:
                    warnings.append(f"content_models[{i}] {cm.name!r}: {role} {name!r} is neither a model of this "
                                    "route nor an external model (requests routed to it are answered 404)")
            content[cm.name] = compiled
        listing = {"object": "list",
                   "data": [{"id": name, "object": "model", "created": 0, "owned_by": table.route,
                             "root": name, "parent": None} for name in (*models, *content)]
                   + [{"id": name, "object": "model", "created": 0, "owned_by": ext.route,
                       "root": name, "parent": None} for name, ext in external.items()]}
        return cls(source=table, models=models, base_served_name=table.served_model_name,
                   models_json=json.dumps(listing, separators=(",", ":")).encode(), dropped=dropped,
                   content=content, external=external, warnings=warnings,
                   rule_headers=frozenset(n for c in content.values() for n in c.header_names))

    def served_names(self) -> list[str]:
        """Every public name this table answers: its own models, its content-routed models, then the other
        routes' (external) ones."""
        return [*self.models, *self.content, *self.external]

    @property
    def sticky_header(self) -> str | None:
        """The route's router.stickyHeader (a header name), or None."""
        return self.source.router.sticky_header


def external_url_problem(url: str) -> str | None:
    """Why `url` cannot be an external model's router URL, or None. The router forwards over plain HTTP inside
    the cluster to `http://host:port` with no path, query or credentials (the operator and the gateway build it
    from a route's name and namespace)."""
    parts = urlsplit(url)
    try:
        parts.port
    except ValueError:
        return f"url {url[:200]!r}: the port is not a number in 0-65535"
    if parts.scheme != "http" or not parts.hostname:
        return f"url {url[:200]!r}: must be http://<host>:<port>"
    if parts.username or parts.password or parts.query or parts.fragment or parts.path not in ("", "/"):
        return f"url {url[:200]!r}: must be http://<host>:<port> without credentials, path or query"
    return None


def read_model(body: bytes) -> tuple[str, object]:
    """The request's top-level `model` and a handle for `rewrite_model`; raises BadRequest (param `model`
    where it is about it) for a body the router cannot route.

    The rule (docs/router.md, "What the router reads"): the `model` the router routes by is exactly the
    `model` vLLM reads from the forwarded body. vLLM (FastAPI/Starlette) parses with Python's `json.loads`
    on the raw bytes: a BOM or UTF-16/32 is decoded, NaN/Infinity accepted, a duplicate key's last value
    wins. So a body with `model` more than once at the top level (also spelled with escapes, e.g.
    `"mod\\u0065l"`) is refused with 400: which one counts depends on the parser, and routing one while
    vLLM serves the other would bypass public names, canaries and metrics. Anything else `json.loads`
    accepts is routed by the `model` that `json.loads` reads.

    Fast path, no JSON parse: `"model"` occurs exactly once, right after the opening brace, with an
    unescaped UTF-8 string value, and no letter of `model` is \\u-escaped anywhere (so no other key can
    spell it). Then that occurrence is the top-level key and the only one: any JSON parser that accepts
    the forwarded body reads the served name written there. (A body that is not valid JSON after it, e.g.
    trailing garbage, is left to vLLM, which refuses it before generating anything.) Otherwise the body
    is parsed (invalid JSON: 400 here); the value is then spliced when its only literal occurrence is the
    top-level key with an unescaped value, else the body is re-encoded.
    """
    key = _MODEL_KEY.search(body)
    i = key.start() if key is not None else -1
    # `literal`: the body spells `model` only literally, and at most once; then no key can be a duplicate.
    # Byte scans see keys only in UTF-8 (with or without a BOM): json.loads also reads UTF-16/32, which it
    # tells by a BOM or NUL bytes at the start (json.detect_encoding).
    literal = (i < 0 or _MODEL_KEY.search(body, i + 7) is None) and _LETTER_ESCAPE.search(body) is None
    if literal and i >= 0:
        m = _SIMPLE_VALUE.match(body, i + 7)
        if m is not None and body[:i].strip() == b"{":  # starts `{"`: UTF-8 by json.detect_encoding
            try:
                return m.group(1).decode(), m.span(1)
            except UnicodeDecodeError:  # not UTF-8: json.loads below refuses the body and says where
                pass
    literal = literal and body[:1] not in _UTF16_32_START and b"\x00" not in body[:4]
    seen_model = 0

    def pairs_hook(pairs: list) -> dict:
        # Called for every object, innermost first: the last call is the top-level object's.
        nonlocal seen_model
        seen_model = sum(1 for k, _ in pairs if k == "model")
        return dict(pairs)

    try:
        # The hook (a Python call per object) only where a duplicate is possible at all.
        obj = json.loads(body) if literal else json.loads(body, object_pairs_hook=pairs_hook)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:   # json's C decoder recurses per nesting level: `[[[[...` a few thousand deep
        raise BadRequest("the request body nests arrays or objects too deeply to be read") from None
    if not isinstance(obj, dict):
        raise BadRequest("the request body must be a JSON object with a `model` field")
    if seen_model > 1:
        raise BadRequest(f"`model` appears {seen_model} times in the request body (counting escaped spellings "
                         "such as \"mod\\u0065l\"): send it once", "model")
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("`model` is required: set it to one of the names listed by GET /v1/models", "model")
    if literal:
        # The one literal `"model"` is the top-level key (no other spelling exists): splice when its value
        # is unescaped.
        m = _SIMPLE_VALUE.match(body, i + 7)
        # surrogatepass: json.loads decodes with it, so `model` may hold a lone surrogate (raw bytes ED A0 80
        # in the body); plain .encode() would raise on it (a crash on client input).
        if m is not None and m.group(1) == model.encode("utf-8", "surrogatepass"):
            return model, m.span(1)
    return model, obj


def rewrite_model(body: bytes, handle: object, backend: BackendRoute) -> bytes:
    """The body with only `model` changed to the backend's served name."""
    if type(handle) is tuple:
        start, end = handle
        return b"".join((body[:start], backend.served_json, body[end:]))
    obj = dict(handle)  # a parsed body: re-encode (rare: escapes, or `model` also nested)
    obj["model"] = backend.served_name
    # ASCII with \u escapes: any string json.loads returned encodes, lone surrogates (`"\ud800"`) included,
    # and vLLM's json.loads reads back exactly the same values (NaN/Infinity stay literals, as it accepts).
    return json.dumps(obj, separators=(",", ":")).encode()
