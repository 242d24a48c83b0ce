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
- **Classifier prompt** (`classifier_prompt`): the one text template the trainer trains a `classification`
  adapter on and the router asks it with, so the two cannot drift.
- **Name ownership across routes** (`public_name_owners`): in a namespace (the scope of the gateway and of
  cross-route destinations) a public model name belongs to the oldest route publishing it; later routes get the
  condition reason `PublicNameConflict` for that name, and only that name is left out of the gateway.
- **Response headers** (`DESTINATION_HEADER`, `METHOD_HEADER`): every content-routed answer says where it went
  and why.
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from loraplane.api.common import ApiModel, CelRule

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

# What the router reads from a request to decide: the last user message (chat) or the prompt (completions),
# cut to this many characters (bounded work per request whatever the body size).
MAX_DECISION_TEXT_CHARS = 4096


def classifier_prompt(text: str) -> str:
    """The prompt a `classification` adapter is trained on and asked with: the request text, then `Label:`.
    The adapter's completion is `" " + label` (greedy). `text` is cut to MAX_DECISION_TEXT_CHARS characters."""
    return f"Classify this request.\nRequest: {text[:MAX_DECISION_TEXT_CHARS]}\nLabel:"


def classifier_completion(label: str) -> str:
    """The completion a `classification` adapter is trained to write after `classifier_prompt`."""
    return f" {label}"


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

    @field_validator("headers")
    @classmethod
    def _check_header_names(cls, headers: dict[str, str]) -> dict[str, str]:
        for name in headers:
            if not HEADER_NAME.match(name):
                raise ValueError(f"headers: {name[:60]!r} is not an HTTP header name (letters, digits and "
                                 "!#$%&'*+.^_`|~- only, at most 256): fix the name")
        return headers


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
                message="contentRouting: method classifier needs `classifier` (its model)"),
        CelRule(rule="!has(self.methods) || !self.methods.exists(m, m == 'semantic') || has(self.semantic)",
                check=lambda o: "semantic" not in o.get("methods", ()) or "semantic" in o,
                message="contentRouting: method semantic needs `semantic` (its embeddingModel)"),
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
    """One content-routed public model (ServingTable.content_models[])."""

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
    """One destination of a content-routed model and whether it can serve."""

    model: str
    route: str | None = Field(default=None, description="The ModelRoute publishing it (None: not found).")
    ready: bool = False
    reason: str | None = None


class ContentModelStatus(ApiModel):
    """A content-routed public model: its default and destinations and whether each is ready."""

    name: str
    ready: bool = Field(default=False, description="The default destination can serve.")
    default: str
    methods: list[str] = Field(default_factory=list)
    destinations: list[ContentDestinationStatus] = Field(default_factory=list)


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
