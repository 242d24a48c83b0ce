"""Model orchestration (issue 15): one endpoint for many specialised models, each request routed by what it asks.

The contracts, in one place:

- **Spec** (`ModelRoute.spec.contentRouting`): a public model (e.g. `auto`) whose requests go to other public
  models (destinations), chosen per request by rules, by semantic similarity to example prompts (embeddings from
  an embedding model served by a ModelRoute) or by a trained classifier (an adapter trained with the FineTuneJob
  `classification` dataset format), evaluated in the order of `methods`, with a `default`.
- **Wire** (`ServingTable.content_models`, `ServingTable.external_models`): the resolved form the router reads.
  A destination, the classifier or the embedding model may be a public model of another ModelRoute in the same
  namespace: the operator resolves it to that route's router Service (`ExternalModel`), and the router forwards
  the request there with the client's own `Authorization` (never this route's engine key).
- **Status** (`ModelRoute.status.contentModels`): each content-routed model, its destinations and whether each
  is ready.
- **Classifier prompt and answer** (`classifier_prompt`, `classifier_max_tokens`, `parse_label`): the one text
  template the trainer trains a `classification` adapter on and the router asks it with, the answer's token
  budget and the one reading of the answer, shared by the router and the trainer's evaluation (`accuracy`), so
  what is measured before routing is what routing does.
- **Name ownership across routes** (`public_name_owners`): in a namespace (the scope of the gateway and of
  cross-route destinations) a public model name belongs to the oldest route publishing it; later routes get the
  condition reason `PublicNameConflict` for that name, and only that name is left out of the gateway.
- **Response headers** (`DESTINATION_HEADER`, `METHOD_HEADER`): every content-routed answer says where it went
  and why.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Annotated, ClassVar, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from loraplane.api.patterns import compile_re2
from loraplane.api.common import DNS_1035_LABEL, ApiModel, CelRule
from loraplane.api.paths import ROUTER_PORT

# spec.engine.task of a ModelRoute: what the route's vLLM serves (builders.engine_pod.engine_args turns it into
# vLLM's runner). Here rather than in api.modelroute because a Publication carries it (which role another route's
# public model can play in content routing) and api.modelroute imports this module.
ENGINE_TASK_GENERATE = "generate"
ENGINE_TASK_EMBED = "embed"
EngineTask = Literal["generate", "embed"]

# A public model name (the same grammar as spec.routes[].name).
PUBLIC_NAME = r"^[A-Za-z0-9]([-A-Za-z0-9_.:/]*[A-Za-z0-9])?$"
# A classifier label: what the classification adapter answers, one token-ish word.
LABEL = r"^[a-z0-9]([-a-z0-9_]*[a-z0-9])?$"

Method = Literal["rules", "classifier", "semantic"]
# Bounded strings: everything in a spec reaches a child (the serving ConfigMap) and the router's memory.
Keyword = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Example = Annotated[str, StringConstraints(min_length=1, max_length=2000)]
# An HTTP field name (RFC 9110 token); checked in Python (a CRD cannot constrain map keys).
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}$")
HeaderValue = Annotated[str, StringConstraints(max_length=1024)]
METHODS: tuple[str, ...] = ("rules", "classifier", "semantic")
# The method name in headers/metrics when nothing matched or a method failed and the default served.
DEFAULT_METHOD = "default"

# Response headers of a content-routed answer (also on errors after the decision).
DESTINATION_HEADER = "X-Loraplane-Destination"   # the public model that served the request
METHOD_HEADER = "X-Loraplane-Routing-Method"      # rules | classifier | semantic | default
# Why the default served, when it did: no-match | timeout | unavailable | invalid-answer.
FALLBACK_HEADER = "X-Loraplane-Routing-Fallback"
# Request header a router sets on a request it forwards to another route's router (router/forward.py): how many
# times the request has been forwarded so far, this forward included. The legitimate chain is at most the gateway
# then a content model's external destination (2); a router refuses to forward a request that arrived with
# MAX_FORWARD_HOPS already (508), so two routers whose tables disagree for a moment (a public name moving from
# one route to another) cannot pass a request back and forth forever.
FORWARD_HOPS_HEADER = "X-Loraplane-Hops"
MAX_FORWARD_HOPS = 2

# What the router reads from a request to decide: the last user message (chat) or the prompt (completions),
# cut to this many characters (bounded work per request whatever the body size).
MAX_DECISION_TEXT_CHARS = 4096


# RE2's program memory per rule pattern (bytes), as the loader gate bounds its target_modules patterns: a pattern
# cannot blow up the memory of the operator (which compiles it to validate) or of the router (which runs it).
# Compile time grows with the program: at this bound one pattern compiles in ~10-20 ms (a Unicode class repeated,
# e.g. [\p{L}\p{N}]{50}: 67k instructions); at 8 MiB it took ~0.2-0.4 s.
PATTERN_MAX_MEM = 1 << 20
# All rule patterns of one ModelRoute spec together, in RE2 program instructions (`programsize`; a pattern RE2
# refuses counts PATTERN_REFUSED_COST): a spec may hold 32 x 64 patterns, and each parse of it (every reconcile,
# `loraplane validate`) compiles them all, so without a total one spec of distinct near-limit patterns cost
# minutes of the operator's CPU per reconcile. Typical patterns are tens of instructions.
PATTERNS_MAX_INSTRUCTIONS = 1 << 18
PATTERN_REFUSED_COST = 1 << 16
# The budget left while a ModelRouteSpec is being validated (a one-element list, decremented); None outside one.
_pattern_budget: ContextVar[list[int] | None] = ContextVar("pattern_budget", default=None)


@contextmanager
def pattern_budget(instructions: int = PATTERNS_MAX_INSTRUCTIONS) -> Iterator[None]:
    """Within it, the rule patterns validated (RuleMatch.pattern) share `instructions` RE2 program instructions
    (see PATTERNS_MAX_INSTRUCTIONS): ModelRouteSpec validates its whole spec inside one."""
    token = _pattern_budget.set([instructions])
    try:
        yield
    finally:
        _pattern_budget.reset(token)


def compile_pattern(pattern: str):
    """The RE2 program of a rule's `pattern` (google-re2: linear-time matching, no backreferences or lookaround,
    program memory bounded at PATTERN_MAX_MEM), with the options the router matches it with. Raises ValueError
    saying why RE2 refuses it. The API validates spec patterns with it, so a pattern the router cannot run never
    reaches a serving table."""
    return compile_re2(pattern, PATTERN_MAX_MEM)


def classifier_prompt(text: str) -> str:
    """The prompt a `classification` adapter is trained on and asked with: the request text, then `Label:`.
    The adapter's completion is `" " + label` (greedy). `text` is cut to MAX_DECISION_TEXT_CHARS characters."""
    return f"Classify this request.\nRequest: {text[:MAX_DECISION_TEXT_CHARS]}\nLabel:"


def classifier_completion(label: str) -> str:
    """The completion a `classification` adapter is trained to write after `classifier_prompt`."""
    return f" {label}"


# The classifier's max_tokens: enough for the longest label (a token is at least one character) plus a space,
# never more than this.
MAX_CLASSIFIER_TOKENS = 64
# A classifier label at the start of its answer (LABEL, read case-insensitively).
_LABEL_WORD = re.compile(r"\s*([A-Za-z0-9](?:[-A-Za-z0-9_]*[A-Za-z0-9])?)(?![-A-Za-z0-9_])")


def classifier_max_tokens(max_label_chars: int) -> int:
    """The max_tokens a classifier is asked with when its longest label has `max_label_chars` characters:
    `max_label_chars + 2` (a token is at least one character, plus the leading space), between 1 and
    MAX_CLASSIFIER_TOKENS. The router uses its destinations' labels, the trainer's evaluation the dataset's."""
    return max(1, min(MAX_CLASSIFIER_TOKENS, max_label_chars + 2))


def parse_label(answer: object) -> str | None:
    """The label a classifier answered: the first word of its completion text (letters, digits, `-`, `_`),
    lower-cased; None when the answer is not a string or does not start with one (after whitespace). Only the
    first 256 characters are read. The router routes by it; the trainer's `accuracy` compares it to the record's
    label."""
    if not isinstance(answer, str):
        return None
    m = _LABEL_WORD.match(answer[:256])
    return m.group(1).lower() if m else None


# ----------------------------------------------------------------------------------------------------------------
# Spec (ModelRoute.spec.contentRouting[])


class RuleMatch(ApiModel):
    """What a request must look like to go to this destination by rules. Every condition set must hold (AND);
    a destination whose rules are all unset never matches by rules."""

    pattern: str | None = Field(default=None, min_length=1, max_length=1024, description=(
        "A regular expression (RE2 syntax: linear time, no backreferences) searched in the request text (the "
        "last user message, or the prompt). Add (?i) for case-insensitive matching."))
    keywords: list[Keyword] = Field(default_factory=list, max_length=256, description=(
        "Any of these words or phrases in the request text, case-insensitive, at word boundaries."))
    headers: dict[str, HeaderValue] = Field(default_factory=dict, max_length=32, description=(
        "Request headers that must have exactly these values (header names case-insensitive)."))
    min_prompt_tokens: int | None = Field(default=None, ge=0, description=(
        "The request text has at least this many tokens (counted by the route's vLLM /tokenize, the engine's "
        "own tokenizer; costs one round trip, only when set)."))
    max_prompt_tokens: int | None = Field(default=None, ge=0, description="At most this many tokens (see above).")

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, pattern: str | None) -> str | None:
        if pattern is None:
            return pattern
        budget = _pattern_budget.get()
        over = ("the rule patterns of this ModelRoute together are over their budget of "
                f"{PATTERNS_MAX_INSTRUCTIONS} RE2 program instructions (each compiled on every check of the spec): "
                "use fewer or simpler patterns (a repeated Unicode class such as \\p{L}{50} is tens of thousands), "
                "or keywords")
        if budget is not None and budget[0] <= 0:
            raise ValueError(f"{pattern[:80]!r}: {over}")
        try:
            program = compile_pattern(pattern)
        except ValueError as exc:
            if budget is not None:
                budget[0] -= PATTERN_REFUSED_COST
            raise ValueError(f"{pattern[:80]!r} is not a pattern the router can run: {exc}; write it in RE2 "
                             "syntax (https://github.com/google/re2/wiki/Syntax: no backreferences, no "
                             "lookahead or lookbehind) and keep its program small") from None
        if budget is not None:
            budget[0] -= program.programsize
            if budget[0] < 0:
                raise ValueError(f"{pattern[:80]!r}: {over}")
        return pattern

    @field_validator("headers")
    @classmethod
    def _check_header_names(cls, headers: dict[str, str]) -> dict[str, str]:
        for name in headers:
            if not HEADER_NAME.match(name):
                raise ValueError(f"{name[:60]!r} is not an HTTP header name (letters, digits and "
                                 "!#$%&'*+.^_`|~- only, at most 256; no spaces or ':'): write the name alone, "
                                 "e.g. X-Team, and its exact value after the ':'")
        return headers

    @model_validator(mode="after")
    def _check_token_bounds(self):
        if (self.pattern is None and not self.keywords and not self.headers and self.min_prompt_tokens is None
                and self.max_prompt_tokens is None):
            raise ValueError("rules sets no condition, so it never matches: set pattern, keywords, headers, "
                             "minPromptTokens or maxPromptTokens, or remove rules")
        # Both bounds must hold (AND): min over max could never match, and costs a /tokenize call per request.
        lo, hi = self.min_prompt_tokens, self.max_prompt_tokens
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"minPromptTokens {lo} is over maxPromptTokens {hi}: no request could match (both "
                             "must hold); swap them or remove one")
        return self


class ContentDestination(ApiModel):
    """One place a content-routed model's requests can go, and how to recognise the requests it should get."""

    model: str = Field(min_length=1, max_length=200, pattern=PUBLIC_NAME, description=(
        "A public model name: one of this route's (an adapter's route or the base), or one a route in the "
        "same namespace publishes."))
    rules: RuleMatch | None = Field(default=None, description="Match by rules (method `rules`).")
    examples: list[Example] = Field(default_factory=list, max_length=256, description=(
        "Example prompts this destination should get (method `semantic`)."))
    label: str | None = Field(default=None, max_length=63, pattern=LABEL, description=(
        "The label the classifier answers for this destination (method `classifier`). Default: none (the "
        "classifier cannot choose this destination)."))


class ClassifierSpec(ApiModel):
    """A trained classifier: a public model (typically an Adapter trained by a FineTuneJob with dataset format
    `classification`) that answers a destination label for `classifier_prompt(request text)`."""

    model: str = Field(min_length=1, max_length=200, pattern=PUBLIC_NAME, description=(
        "Public model name of the classifier (this route's, or one a route in the same namespace publishes)."))
    timeout_milliseconds: int = Field(default=500, ge=10, le=60000, description=(
        "Budget for the classifier's answer; past it the default destination serves (counted)."))


class SemanticSpec(ApiModel):
    """Routing by similarity of the request to each destination's `examples`, with embeddings from an embedding
    model served by a ModelRoute (vLLM /v1/embeddings)."""

    embedding_model: str = Field(min_length=1, max_length=200, pattern=PUBLIC_NAME, description=(
        "Public model name of the embedding model (a ModelRoute in this namespace serving a pooling model)."))
    min_similarity: float = Field(default=0.0, ge=-1, le=1, description=(
        "Cosine similarity the best example must reach; below it the default serves."))
    timeout_milliseconds: int = Field(default=300, ge=10, le=60000, description=(
        "Budget for the request's embedding; past it the default destination serves (counted)."))


class ContentRoute(ApiModel):
    """A public model whose requests are routed by content to other public models."""

    cel_rules: ClassVar = (
        CelRule(rule="!has(self.methods) || !self.methods.exists(m, m == 'classifier') || has(self.classifier)",
                check=lambda o: "classifier" not in o.get("methods", ()) or "classifier" in o,
                message="methods has `classifier` but `classifier` is not set: add `classifier: {model: <the "
                        "public name of the classifier adapter>}`, or remove classifier from methods"),
        CelRule(rule="!has(self.methods) || !self.methods.exists(m, m == 'semantic') || has(self.semantic)",
                check=lambda o: "semantic" not in o.get("methods", ()) or "semantic" in o,
                message="methods has `semantic` but `semantic` is not set: add `semantic: {embeddingModel: <the "
                        "public name of an embedding model>}`, or remove semantic from methods"),
    )

    name: str = Field(min_length=1, max_length=200, pattern=PUBLIC_NAME, description=(
        "Public model name clients send (e.g. `auto`); must not be a name spec.routes publishes."))
    default: str = Field(min_length=1, max_length=200, pattern=PUBLIC_NAME, description=(
        "The public model that serves when no method chooses a destination, or a method is unavailable or "
        "over its budget."))
    methods: list[Method] = Field(default_factory=lambda: ["rules"], min_length=1, max_length=3, description=(
        "The methods tried, in order; the first that chooses a destination decides."))
    destinations: list[ContentDestination] = Field(min_length=1, max_length=64, description=(
        "Where requests can go, in order (rules: the first matching destination wins)."))
    classifier: ClassifierSpec | None = None
    semantic: SemanticSpec | None = None

    @model_validator(mode="after")
    def _check_destinations(self):
        # Each message names the field and the fix (a ModelRouteSpec rule adds the names across content models).
        seen: set[str] = set()
        for m in self.methods:
            if m in seen:
                raise ValueError(f"methods: {m!r} is listed twice; list each method once, in the order to try them")
            seen.add(m)
        labels: dict[str, int] = {}
        for i, d in enumerate(self.destinations):
            if d.label is None:
                continue
            if d.label in labels:
                raise ValueError(f"destinations[{i}].label {d.label!r} is also destinations[{labels[d.label]}]."
                                 "label: the classifier's answer must name one destination; give each a different "
                                 "label")
            labels[d.label] = i
        if "classifier" in self.methods and not labels:
            raise ValueError("methods has `classifier` but no destination has a `label` (the classifier could "
                             "never choose one): set destinations[].label to the labels it was trained on")
        if "semantic" in self.methods and not any(d.examples for d in self.destinations):
            raise ValueError("methods has `semantic` but no destination has `examples` (nothing to compare a "
                             "request with): add example prompts to destinations[].examples")
        return self

    def unreachable(self) -> list[str]:
        """One sentence per destination that none of `methods` can choose (rules without `rules`, classifier
        without `label`, semantic without `examples`): valid, since the default may be meant to cover it, but
        usually a forgotten field; `loraplane validate` warns with it."""
        ways = {"rules": lambda d: d.rules is not None, "classifier": lambda d: d.label is not None,
                "semantic": lambda d: bool(d.examples)}
        fields = {"rules": "rules", "classifier": "label", "semantic": "examples"}
        return [f"destinations[{i}] {d.model!r} can never be chosen by methods {list(self.methods)}: give it "
                + " or ".join(f"`{fields[m]}`" for m in self.methods)
                for i, d in enumerate(self.destinations)
                if d.model != self.default and not any(ways[m](d) for m in self.methods)]

    def references(self) -> list[tuple[str, str]]:
        """Every public model this content model sends requests to, as (field path under the content route,
        name), in spec order: each destination, the default, the classifier and the embedding model."""
        out = [(f"destinations[{i}].model", d.model) for i, d in enumerate(self.destinations)]
        out.append(("default", self.default))
        if self.classifier is not None:
            out.append(("classifier.model", self.classifier.model))
        if self.semantic is not None:
            out.append(("semantic.embeddingModel", self.semantic.embedding_model))
        return out


# ----------------------------------------------------------------------------------------------------------------
# Wire (ServingTable.content_models / external_models): snake_case JSON, like the rest of the serving table.


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WireRules(_Wire):
    """RuleMatch as the router reads it."""

    pattern: str | None = None
    keywords: list[str] = Field(default_factory=list)
    headers: dict[str, str] = Field(default_factory=dict)
    min_prompt_tokens: int | None = None
    max_prompt_tokens: int | None = None


class WireDestination(_Wire):
    """A destination as the router reads it."""

    model: str
    rules: WireRules | None = None
    examples: list[str] = Field(default_factory=list)
    label: str | None = None


class WireClassifier(_Wire):
    model: str
    timeout_ms: int = 500


class WireSemantic(_Wire):
    embedding_model: str
    min_similarity: float = 0.0
    timeout_ms: int = 300


class ContentModel(_Wire):
    """One content-routed public model (ServingTable.content_models[]). Every name it references (default,
    destinations, classifier, embedding model) is one of the table's `models` or `external_models`: the operator
    leaves out a destination nobody serves, takes a method out of `methods` when its classifier or embedding model
    is served by nobody, and leaves the whole content model out when its default is (builders.orchestration)."""

    name: str
    default: str
    methods: list[str] = Field(default_factory=lambda: ["rules"])
    destinations: list[WireDestination]
    classifier: WireClassifier | None = None
    semantic: WireSemantic | None = None
    log_decisions: bool = False  # spec.router.logDecisions: one log line per decision, never the prompt


class ExternalModel(_Wire):
    """A public model of another ModelRoute that a content model of this route reaches (destination, default,
    classifier or embedding model): requests for it are forwarded to that route's router."""

    name: str
    route: str
    url: str = Field(description="http://<route>-router.<namespace>.svc:<port>, built by the operator from names.")


# ----------------------------------------------------------------------------------------------------------------
# Status (ModelRoute.status.contentModels[])


class ContentDestinationStatus(ApiModel):
    """One public model a content-routed model sends requests to and whether it can serve."""

    model: str
    route: str | None = Field(default=None, description="The ModelRoute publishing it (None: not found).")
    ready: bool = False
    reason: str | None = Field(default=None, description=(
        "Why it is not ready: the owning route's backend reason (e.g. NotLoaded), ModelsNotReady for another "
        "route's model, ContentTargetNotFound when no route of the namespace publishes it, or "
        "ContentTargetWrongTask when the route that does cannot answer this role (its spec.engine.task)."))


class ContentModelStatus(ApiModel):
    """A content-routed public model: its default and destinations and whether each is ready."""

    name: str
    ready: bool = Field(default=False, description="The default destination can serve.")
    default: str
    methods: list[str] = Field(default_factory=list)
    destinations: list[ContentDestinationStatus] = Field(default_factory=list, description=(
        "Each destination model once, in spec order, then the default when it is no destination."))
    classifier: ContentDestinationStatus | None = Field(default=None, description=(
        "The classifier model (method `classifier`); when it cannot serve, the default serves."))
    embedding_model: ContentDestinationStatus | None = Field(default=None, description=(
        "The embedding model (method `semantic`); when it cannot serve, the default serves."))


# ----------------------------------------------------------------------------------------------------------------
# Name ownership across routes


def public_name_owners(routes: Iterable[tuple[str, str, Iterable[str]]]) -> tuple[dict[str, str],
                                                                                   dict[str, list[tuple[str, str]]]]:
    """Who owns each public model name in one scope (a namespace, or a gateway's selection of it).

    `routes`: (route name, metadata.creationTimestamp RFC 3339, the public names it publishes: spec.routes'
    names, selector-served names and contentRouting names). The oldest route owns a name (ties: the route name
    in byte order), as Kubernetes orders "first come" elsewhere (e.g. Ingress conflicts in ingress-nginx).

    Returns (owners: name -> owning route, conflicts: later route -> [(name, owner)]). A later route keeps every
    name nobody else had: only the conflicting names are left out, never its whole table.
    """
    ordered = sorted(((created or "", name, list(names)) for name, created, names in routes))
    owners: dict[str, str] = {}
    conflicts: dict[str, list[tuple[str, str]]] = {}
    for _created, route, names in ordered:
        for n in names:
            owner = owners.setdefault(n, route)
            if owner != route:
                conflicts.setdefault(route, []).append((n, owner))
    return owners, conflicts


def router_url(route: str, namespace: str) -> str:
    """The in-cluster base URL of ModelRoute `route`'s router Service, no path:
    `http://<route>-router.<namespace>.svc:ROUTER_PORT`. Built from the two names only, never from a field a pod
    could write, so an external model (and the gateway's table) can only point at a loraplane router of the
    namespace. A ModelRoute name is a DNS-1035 label of at most 50 characters, so `<route>-router` is the router
    Service's name exactly as builders.modelroute names it (a test checks the two agree)."""
    return f"http://{route}-router.{namespace}.svc:{ROUTER_PORT}"


# ----------------------------------------------------------------------------------------------------------------
# What a stored ModelRoute publishes (read by the operator for ownership and status, and by the gateway)

# A route name its router Service can be named after (the API refuses others, but the API server stores any DNS
# subdomain, e.g. `a.b`, whose router URL would name another host); public model names of the API's grammar.
_ROUTE_NAME = re.compile(DNS_1035_LABEL)
_PUBLIC_NAME = re.compile(PUBLIC_NAME)


def is_route_name(name: object) -> bool:
    """Whether a stored ModelRoute's metadata.name is one the operator serves: a DNS-1035 label of at most 50
    characters (api.modelroute's rule), so `router_url` of it names that route's router Service and no other host."""
    return isinstance(name, str) and len(name) <= 50 and _ROUTE_NAME.match(name) is not None


@dataclass(frozen=True)
class Publication:
    """What one ModelRoute of a namespace publishes, from its stored object: its name, its
    metadata.creationTimestamp, its served public models with their readiness (status.models) and its
    content-routed models with theirs (status.contentModels). Hashable: the controller keys its memo on
    `naming`."""

    route: str
    created: str
    models: tuple[tuple[str, bool], ...] = ()
    content: tuple[tuple[str, bool], ...] = ()
    # Its spec.engine.task: `embed` routes answer /v1/embeddings only, `generate` routes completions only.
    task: str = ENGINE_TASK_GENERATE

    def names(self) -> list[str]:
        """Every public name it publishes (served models, then content models)."""
        return [n for n, _ in self.models] + [n for n, _ in self.content]

    @functools.cached_property
    def naming(self) -> tuple:
        """What ownership and the serving table depend on (names and the engine task, not readiness). Computed
        once (the controller compares every other route's on each reconcile); the fields are frozen."""
        return (self.route, self.created, tuple(n for n, _ in self.models), tuple(n for n, _ in self.content),
                self.task)


def _entries(value: object) -> tuple[tuple[str, bool], ...]:
    """(name, ready) of a status list as stored; entries of another shape are skipped (the object is read from
    the API server, whose schema a foreign writer of the status may not have followed)."""
    if not isinstance(value, list):
        return ()
    out: dict[str, bool] = {}
    for item in value:
        if (isinstance(item, dict) and isinstance(name := item.get("name"), str) and len(name) <= 200
                and _PUBLIC_NAME.match(name)):
            out.setdefault(name, item.get("ready") is True)
    return tuple(out.items())


def publication(body: dict) -> Publication:
    """The Publication of a ModelRoute object (a dict as the store holds it). A route with no status yet
    publishes nothing: a name is published once the route's operator reconcile wrote it into status. Neither does
    a route whose name is no DNS-1035 label of at most 50 characters, and only public names of the API's grammar
    count (as the gateway reads them)."""
    meta = body.get("metadata") or {}
    status = body.get("status") if isinstance(body.get("status"), dict) else {}
    created = meta.get("creationTimestamp")
    name = str(meta.get("name") or "")
    if not is_route_name(name):
        # Not a route name the operator serves (it refuses the spec): it publishes nothing, so no router URL is
        # ever built from it.
        return Publication(route=name, created=created if isinstance(created, str) else "")
    return Publication(route=name, created=created if isinstance(created, str) else "",
                       models=_entries(status.get("models")), content=_entries(status.get("contentModels")),
                       task=engine_task(body))


def engine_task(body: dict) -> str:
    """spec.engine.task of a stored ModelRoute (a dict as the store holds it): `embed` or `generate` (the API's
    default, also for a value of another shape: the API server's schema refuses any other)."""
    spec = body.get("spec")
    engine = spec.get("engine") if isinstance(spec, dict) else None
    task = engine.get("task") if isinstance(engine, dict) else None
    return ENGINE_TASK_EMBED if task == ENGINE_TASK_EMBED else ENGINE_TASK_GENERATE
