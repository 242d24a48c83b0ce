"""Types shared by the three kinds: the model base class, conditions, references and CEL rules.

Every API type derives from `ApiModel`: camelCase on the wire, snake_case in Python, unknown fields
rejected (a typo in a spec is an error that names the field, not a silently ignored setting).
Cross-field rules are written once, in CEL (`cel_rules`): the same expressions go into the CRD as
`x-kubernetes-validations` for API servers that enforce them, and are evaluated by pydantic here
(through each rule's Python mirror, `CelRule.check`) so that the operator, `loraplane render` and older API
servers enforce them too.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from decimal import Decimal
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer, WithJsonSchema, field_validator, model_validator,
)
from pydantic.alias_generators import to_camel

from loraplane.api import cel
from loraplane.api.conditions import ConditionState, ConditionStatus, ConditionType, Progress, progress_of
from loraplane.api.redaction import scrubbed

GROUP = "loraplane.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# A DNS-1123 subdomain, what Kubernetes accepts as an object name.
DNS_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
# A DNS-1123 label (Service, Deployment and label values built from it must fit in 63 characters).
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

# A DNS-1035 label: what a Service name must be (a DNS label that starts with a letter).
DNS_1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# A label value (k8s.io/apimachinery validation.IsValidLabelValue): empty, or at most 63 of these.
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# The name part of a qualified name (label keys, annotation keys): at most 63 of these.
QUALIFIED_NAME_PART = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
# An env var name as Kubernetes validates it (k8s.io/apimachinery validation.IsEnvVarName).
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"


def label_key_problem(key: str) -> str | None:
    """Why `key` is not a valid label key (`[prefix/]name`: prefix a DNS-1123 subdomain of at most 253
    characters, name at most 63 of [A-Za-z0-9-_.] starting and ending alphanumeric), else None.

    The rule is Kubernetes' IsQualifiedName (k8s.io/apimachinery/pkg/util/validation)."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not re.match(DNS_NAME, prefix)):
        return f"label key {key!r}: its prefix must be a DNS subdomain (lowercase, digits, '-', '.')"
    if not name or len(name) > 63 or not re.match(QUALIFIED_NAME_PART, name):
        return (f"label key {key!r}: the name part must be 1-63 characters of letters, digits, '-', '_', '.', "
                "starting and ending with a letter or digit")
    return None


def label_value_problem(value: str) -> str | None:
    """Why `value` is not a valid label value (at most 63 characters, LABEL_VALUE), else None."""
    if len(value) > 63 or not re.match(LABEL_VALUE, value):
        return (f"label value {value!r}: at most 63 characters of letters, digits, '-', '_', '.', starting and "
                "ending with a letter or digit")
    return None


def _check_labels(labels: dict[str, str]) -> dict[str, str]:
    problems = [p for k, v in labels.items() for p in (label_key_problem(k), label_value_problem(v)) if p]
    if problems:
        raise ValueError("; ".join(problems))
    return labels


# A map of Kubernetes labels (keys and values as the API server validates them), also what a nodeSelector
# and a selector's matchLabels hold. Values are also checked in the CRD schema; keys here (CRD schemas have
# no propertyNames).
Labels = Annotated[
    dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]],
    AfterValidator(_check_labels),
]


def _check_env(env: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    for i, entry in enumerate(env):
        name = entry.get("name")
        if not isinstance(name, str) or not re.match(ENV_NAME, name):
            raise ValueError(f"[{i}].name: every env entry needs a name of letters, digits, '_', '-', '.' (not "
                             f"starting with a digit), got {name!r}")
        if name in seen:
            raise ValueError(f"[{i}].name: {name!r} appears twice; env names must be unique (server-side apply "
                             "refuses a container with duplicate env names)")
        seen.add(name)
    return env


QUANTITY_RE = re.compile(r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$")
# Kubernetes quantity suffixes (apimachinery resource.Quantity): binary SI, decimal SI, and e/E exponents.
_QUANTITY_SUFFIX = {"Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "Pi": 2 ** 50, "Ei": 2 ** 60,
                    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1, "k": 10 ** 3,
                    "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12, "P": 10 ** 15, "E": 10 ** 18}
_QUANTITY_PARTS = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(?:([eE][-+]?[0-9]+)|([KMGTPE]i|[numkMGTPE]?))$")
# What a quantity string of the API may be, in the CRD schema too (as controller-gen writes resource.Quantity's,
# without the minus sign: every quantity of the API is a size or a CPU amount, which pods refuse negative; a
# leading `+`, which Kubernetes reads, is taken).
QUANTITY_PATTERN = r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[KMGTPE]i|[numkMGTPE])?$"


def _check_quantity(value: int | str) -> int | str:
    """A quantity field's value, refused (ValueError naming the fix) unless apimachinery's resource.Quantity reads
    it and it is not negative. The CRD admits any int-or-string without QUANTITY_PATTERN, and the children the
    operator builds from such a value (a Job's `memory: 4GB`) are refused by the API server only then."""
    number = quantity_value(value)
    if number is None or isinstance(value, str) and not re.fullmatch(QUANTITY_PATTERN, value):
        raise ValueError(f"{str(value)[:60]!r} is not a Kubernetes quantity: write a number with an optional unit "
                         "suffix and no space, e.g. 8, \"500m\" (CPU), \"64Gi\" (Ki, Mi, Gi, Ti: powers of 1024) or "
                         "\"64G\" (k, M, G, T: powers of 1000); \"GB\" and \"GiB\" are not units Kubernetes reads")
    if number < 0:
        raise ValueError(f"{value!r} is negative: a quantity here is a size or a CPU amount")
    return value


# An int-or-string Kubernetes quantity ("8", 8, "64Gi", "500m"), marked the Kubernetes way in the schema.
Quantity = Annotated[
    int | str,
    AfterValidator(_check_quantity),
    WithJsonSchema({"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN}),
    Field(description="A Kubernetes quantity, e.g. 8, \"500m\" or \"64Gi\"."),
]


def quantity_value(value: int | str) -> Decimal | None:
    """The number a Kubernetes quantity stands for (`"4Gi"` -> 4294967296, `"500m"` -> 0.5, `"1e3"` -> 1000), as
    apimachinery's resource.Quantity reads it; None when `value` is not a quantity (the API server refuses it
    where the field is a quantity; here it is left to that check)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Decimal(value)
    match = _QUANTITY_PARTS.match(str(value).strip())
    if not match:
        return None
    number, exponent, suffix = match.groups()
    if exponent:
        return Decimal(number) * Decimal(10) ** int(exponent[1:])
    return Decimal(number) * _QUANTITY_SUFFIX[suffix or ""]

# Free-form objects passed through to Kubernetes verbatim (tolerations, env entries, affinity).
FreeForm = Annotated[
    dict[str, Any],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]




class CelRule(BaseModel):
    """A CEL validation rule, as Kubernetes writes it into `x-kubernetes-validations`.

    `check` is the same rule in Python (wire-form dict -> ok), evaluated instead of cel-python where a spec is
    parsed: parsing is on the operator's reconcile path, and one CEL evaluation costs about 0.3 ms against
    microseconds (a ModelRoute's ~25 rules took ~10 ms per parse). Every rule has one: a test fails on a rule
    without, and evaluates both on the values the CRD schema admits and on hand-written cases
    (tests/unit/api/test_cel_mirrors.py). It may assume a valid model's wire form: pydantic has checked the
    fields' types before the rules run, and unset fields are absent (CEL's `has`)."""

    model_config = ConfigDict(frozen=True)
    rule: str
    message: str
    check: Callable[[dict], bool] | None = Field(default=None, exclude=True)


class ApiModel(BaseModel):
    """Base of all API types. Subclasses list cross-field rules in `cel_rules`."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=False,
        use_enum_values=True,
    )
    cel_rules: ClassVar[tuple[CelRule, ...]] = ()

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):  # noqa: D105 - pydantic hook
        schema = handler(core_schema)
        if cls.cel_rules:
            target = handler.resolve_ref_schema(schema)
            target["x-kubernetes-validations"] = [r.model_dump() for r in cls.cel_rules]
        return schema

    @model_validator(mode="wrap")
    @classmethod
    def _check_cel_rules(cls, data: Any, handler):
        model = handler(data)
        if cls.cel_rules:
            # What the API server would evaluate: wire names, only the fields the user set.
            raw = model.model_dump(by_alias=True, exclude_unset=True, exclude_none=True, mode="json")
            failed = cel.failed_rules(cls, raw)
            if failed:
                raise ValueError("; ".join(failed))
        return model

    def wire(self) -> dict[str, Any]:
        """The object as it appears in the Kubernetes API: camelCase, unset fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class LabelSelectorRequirement(ApiModel):
    """One matchExpressions entry of a Kubernetes label selector (metav1.LabelSelectorRequirement)."""

    key: str = Field(min_length=1, max_length=317, description="Label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]] | None = Field(
        default=None, max_length=256, description="Non-empty for In and NotIn; unset for Exists and DoesNotExist.")

    @model_validator(mode="after")
    def _check(self):
        if problem := label_key_problem(self.key):
            raise ValueError(problem)
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"matchExpressions: operator {self.operator} needs a non-empty values list")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"matchExpressions: operator {self.operator} takes no values")
        return self


class LabelSelector(ApiModel):
    """A Kubernetes label selector (metav1.LabelSelector): matchLabels AND matchExpressions; empty matches all."""

    match_labels: Labels = Field(default_factory=dict)
    match_expressions: list[LabelSelectorRequirement] = Field(max_length=64, default_factory=list)

    def matches(self, labels: dict[str, str]) -> bool:
        """Kubernetes' selector semantics on a label map."""
        for k, v in self.match_labels.items():   # a loop, not any(<generator>): called per (route, Adapter) pair
            if labels.get(k) != v:
                return False
        for e in self.match_expressions:
            present = e.key in labels
            if e.operator == "In" and (not present or labels[e.key] not in (e.values or [])):
                return False
            if e.operator == "NotIn" and present and labels[e.key] in (e.values or []):
                return False
            if e.operator == "Exists" and not present:
                return False
            if e.operator == "DoesNotExist" and present:
                return False
        return True


class SecretKeyRef(ApiModel):
    """A key in a Secret of the object's namespace."""

    name: str = Field(pattern=DNS_NAME, max_length=253, description="Name of the Secret.")
    key: str | None = Field(default=None, pattern=r"^[-._a-zA-Z0-9]+$", max_length=253,
                            description="Key within the Secret (letters, digits, '-', '_', '.', as Kubernetes "
                                        "allows); the whole Secret when omitted.")


def _one_of(*fields: str) -> CelRule:
    counted = " + ".join(f"(has(self.{f}) ? 1 : 0)" for f in fields)
    return CelRule(rule=f"{counted} == 1", check=lambda obj: sum(f in obj for f in fields) == 1,
                   message=f"set exactly one of {', '.join(fields)}")


class EnvFieldRef(ApiModel):
    """valueFrom.fieldRef of a container env entry (core/v1 ObjectFieldSelector): a field of the pod."""

    field_path: str = Field(min_length=1, max_length=253, description="e.g. metadata.name, status.podIP.")
    api_version: str | None = Field(default=None, max_length=63, description="Default v1.")


class EnvResourceFieldRef(ApiModel):
    """valueFrom.resourceFieldRef of a container env entry (core/v1 ResourceFieldSelector): a container's
    resource limit or request."""

    resource: str = Field(min_length=1, max_length=253, description="e.g. limits.memory, requests.cpu.")
    container_name: str | None = Field(default=None, max_length=63)
    divisor: Quantity | None = None


class EnvKeyRef(ApiModel):
    """valueFrom.configMapKeyRef / secretKeyRef of a container env entry (core/v1 ConfigMapKeySelector,
    SecretKeySelector): one key of a ConfigMap or Secret of the namespace."""

    name: str = Field(pattern=DNS_NAME, max_length=253, description="Name of the ConfigMap or Secret.")
    key: str = Field(pattern=r"^[-._a-zA-Z0-9]+$", max_length=253, description="The key within it.")
    optional: bool | None = None


class EnvVarSource(ApiModel):
    """valueFrom of a container env entry (core/v1 EnvVarSource): exactly one of its four sources."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        _one_of("fieldRef", "resourceFieldRef", "configMapKeyRef", "secretKeyRef"),)
    field_ref: EnvFieldRef | None = None
    resource_field_ref: EnvResourceFieldRef | None = None
    config_map_key_ref: EnvKeyRef | None = None
    secret_key_ref: EnvKeyRef | None = None


class EnvVar(ApiModel):
    """One container env entry (core/v1 EnvVar): a name and either a literal `value` or a `valueFrom` source.
    Typed so that a malformed entry (e.g. `valueFrom: "x"`) is refused at admission and by `loraplane
    validate` with its field named, never passed on to the policy check or the Pod."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(rule="!(has(self.value) && has(self.valueFrom))",
                check=lambda obj: not ("value" in obj and "valueFrom" in obj),
                message="set value or valueFrom, not both"),)
    name: str = Field(pattern=ENV_NAME, max_length=253, description=(
        "Letters, digits, '_', '-', '.', not starting with a digit."))
    # Bounded (CEL cost estimates need a bound); 32 KiB is more than any flag or URL an engine reads from env.
    value: str | None = Field(default=None, max_length=32768)
    value_from: EnvVarSource | None = None


def _env_wire(env: list[EnvVar]) -> list[dict[str, Any]]:
    # Kept as the wire dicts the builders copy into the Pod (camelCase, unset fields left out).
    return _check_env([e.wire() for e in env])


# Container env entries: each typed (EnvVar), with a valid, unique name; held as their wire dicts.
EnvList = Annotated[
    list[EnvVar],
    AfterValidator(_env_wire),
    PlainSerializer(lambda env: env, return_type=list[dict[str, Any]]),
]


# The URI forms each scheme takes in the API's `pattern`s: one place that says which schemes exist, so that
# admission (the CRD schema), `loraplane validate` and the operator agree. They only keep obviously wrong values
# out; storage.uri.parse_uri is the full parser every component uses. Adding a scheme: a form here, the fields
# whose uri_pattern() admit it, and a case in storage/uri.py (docs/architecture.md, "Where to add").
# Bounds of every free string of a spec that reaches a child (a Pod's args, a serving table, a ConfigMap): a
# schema-valid object must render children the API server accepts (a ConfigMap holds at most 1 MiB, an object's
# annotations 256 KiB), and CEL's cost estimate needs them too.
URI_MAX_LENGTH = 2048
IMAGE_MAX_LENGTH = 1024
ShortString = Annotated[str, Field(max_length=256)]   # a module name, a record field name, a header
ArgString = Annotated[str, Field(max_length=4096)]    # one command-line argument

URI_FORMS: dict[str, str] = {
    "pvc": r"pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/.*)?",      # the claim: a DNS-1123 subdomain, as Kubernetes names
    "s3": r"s3://[A-Za-z0-9][A-Za-z0-9._-]*(/.*)?",             # a bucket name, then the key
    "http": r"https?://.+",                                      # the host: see uri_rules
    "hf": r"hf:///*[\w.-]+(/[\w.-]+)?/*(@.*)?",                  # ORG/REPO[@REVISION], as the Hub names repos
    "file": r"file:///.+",
    "path": r"/.+",
}


# How each form reads in an error message (api.validation names the forms a refused URI could have taken).
URI_FORM_HINTS: dict[str, str] = {
    "pvc": "pvc://CLAIM/PATH", "s3": "s3://BUCKET/PREFIX", "http": "https://HOST/PATH", "hf": "hf://ORG/REPO[@REVISION]",
    "file": "file:///PATH (local runs)", "path": "/PATH (local runs)",
}
# What the part after each scheme must be, in words: said when a URI has a scheme its field takes but that part is
# wrong (`pvc://Bad_Claim/x`: the claim name, not the scheme). The same rules as storage.uri.parse_uri.
URI_FORM_PROBLEMS: dict[str, str] = {
    "pvc": "the claim name (CLAIM) must be a DNS-1123 name: lowercase letters, digits, '-' and '.', starting and "
           "ending with a letter or digit",
    "s3": "the bucket name must start with a letter or digit and hold only letters, digits, '.', '_' and '-'",
    "hf": "the repository must be ORG/REPO of letters, digits, '_', '.' and '-'",
    "http": "an http(s):// URI needs a host",
    "file": "a file:// URI names an absolute path (three slashes)",
}
# Every pattern uri_pattern() built -> the forms it admits, in words.
URI_PATTERN_FORMS: dict[str, str] = {}


def uri_pattern(*forms: str) -> str:
    """The anchored regular expression admitting the URI_FORMS named (KeyError on an unknown form)."""
    pattern = "^(" + "|".join(URI_FORMS[f] for f in forms) + ")$"
    URI_PATTERN_FORMS[pattern] = ", ".join(URI_FORM_HINTS[f] for f in forms)
    return pattern


def uri_rules(field: str, where: str) -> tuple["CelRule", ...]:
    """CEL rules refusing, at admission, the URIs storage.uri.parse_uri refuses although `uri_pattern` admits
    them, so that every accepted spec renders (a test checks the two agree on a table of URIs).

    `field` is the wire name of the URI field of the object the rules are attached to; `where` is its path as
    a user writes it (for the message). Patterns are RE2, as Kubernetes evaluates them (no lookahead).
    """
    has = f"!has(self.{field}) || "

    def refuses(pattern: str) -> Callable[[dict], bool]:
        regex = re.compile(pattern)
        return lambda obj: not isinstance(obj.get(field), str) or not regex.search(obj[field])

    return (
        CelRule(rule=has + f"!self.{field}.matches(r'{_URI_SPACE}')", check=refuses(_URI_SPACE),
                message=f"{where}: remove the leading or trailing whitespace"),
        CelRule(rule=has + f"!self.{field}.matches('{_URI_DOTDOT}')", check=refuses(_URI_DOTDOT),
                message=f"{where}: a pvc:// path must stay inside its claim (no '..' segment)"),
        CelRule(rule=has + f"!self.{field}.matches('{_URI_NO_HOST}')", check=refuses(_URI_NO_HOST),
                message=f"{where}: an http(s):// URI needs a host (https://HOST/PATH)"),
        CelRule(rule=has + f"!self.{field}.matches('{_URI_LONG_CLAIM}')", check=refuses(_URI_LONG_CLAIM),
                message=f"{where}: a PersistentVolumeClaim name has at most 253 characters"),
    )


# What uri_rules refuses (RE2 and Python `re` read these alike; CEL's matches() searches, as re.search does).
_URI_SPACE = r"^\s|\s$"
_URI_DOTDOT = r"^pvc://[^/]*(/.*)?/[.][.](/|$)"
_URI_NO_HOST = r"^https?://([/?#]|$)"
_URI_LONG_CLAIM = r"^pvc://[^/]{254}"


class LocalObjectRef(ApiModel):
    """A reference to an object of the same namespace."""

    name: str = Field(pattern=DNS_NAME, max_length=253, description="Name of the object.")


class ModelRef(ApiModel):
    """Where a base model comes from: a Hugging Face id (with revision) or a URI."""

    cel_rules: ClassVar = (
        *uri_rules("uri", "baseModel.uri"),
        CelRule(rule="has(self.name) != has(self.uri)", check=lambda o: ("name" in o) != ("uri" in o),
                message="set exactly one of baseModel.name (a Hugging Face id) or baseModel.uri"),
        CelRule(rule="!has(self.sha256) || (has(self.uri) && (self.uri.startsWith('s3://') || "
                     "self.uri.startsWith('http')))",
                check=lambda o: "sha256" not in o or ("uri" in o and o["uri"].startswith(("s3://", "http"))),
                message="baseModel.sha256 pins a downloaded model: use it with an s3:// or https:// baseModel.uri "
                        "(pin a hub model with baseModel.revision)"),
    )

    name: str | None = Field(
        default=None, min_length=1, max_length=200,
        description="Hugging Face model id, e.g. meta-llama/Llama-3.1-8B-Instruct. "
                    "Also the identity used to check adapter compatibility.")
    revision: str | None = Field(
        default=None, max_length=200,
        description="Branch, tag or commit of the Hugging Face repo. Pin a commit for reproducible runs.")
    uri: str | None = Field(max_length=URI_MAX_LENGTH,
        default=None, pattern=uri_pattern("pvc", "s3", "http", "file", "path"),
        description="pvc://CLAIM/PATH, s3://BUCKET/PREFIX, https://… archive, or a local path "
                    "(file:///… or /…, for local runs).")
    credentials_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret with HF_TOKEN or AWS_* credentials to fetch the model.")
    sha256: str | None = Field(max_length=64,
        default=None, pattern=r"^[0-9a-f]{64}$",
        description="Expected digest of an s3:// or https:// model: the archive's sha256 (what `sha256sum` "
                    "prints) or the directory's (loraplane.storage.digest.sha256_dir). A download that differs "
                    "is refused.")

    @property
    def identity(self) -> str:
        """The name adapters are matched against: the hub id, else the URI."""
        return self.name or self.uri or ""


class Condition(ApiModel):
    """A Kubernetes-style condition (the shape kstatus, Flux and Argo CD understand)."""

    type: str = Field(pattern=r"^[A-Z][A-Za-z0-9]*$", description="Condition type, e.g. Ready.")
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
                        description="CamelCase machine-readable reason; see docs/troubleshooting.md.")
    message: str = Field(default="", description="What happened and what to do about it.")
    observed_generation: int | None = Field(default=None, ge=0,
                                            description="metadata.generation this condition was computed for.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).",
                                      json_schema_extra={"format": "date-time"})


def now_rfc3339() -> str:
    """The current UTC time as RFC 3339 with whole seconds and a `Z` suffix (Kubernetes' time format)."""
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


# Condition messages, scrubbed (api.redaction.scrubbed, a pure function of the text), cached: every reconcile sets
# its conditions again, mostly with the messages they have, and its four regex passes were ~2% of the operator's
# CPU under load (issue 17). Bounded: messages are bounded and this keeps at most 4,096 of them.
_scrubbed_message = functools.lru_cache(maxsize=4096)(scrubbed)


def set_condition(conditions: list[Condition], type: ConditionType, state: ConditionState,
                  observed_generation: int | None = None, now: str | None = None) -> list[Condition]:
    """Return `conditions` with `type` set to `state`; lastTransitionTime moves only when the status flips
    (cert-manager's SetCertificateCondition rule). `now` (RFC 3339) replaces the clock in tests."""
    status_str = str(ConditionStatus.of(state.status))
    # Messages quote URIs: no credential of one reaches a status (api.redaction).
    type, reason, message = str(type), str(state.reason), _scrubbed_message(str(state.message))
    out: list[Condition] = []
    found = False
    for c in conditions:
        if c.type != type:
            out.append(c)
            continue
        found = True
        if (c.status, c.reason, c.message, c.observed_generation) == (status_str, reason, message,
                                                                       observed_generation):
            out.append(c)   # unchanged (the usual case on a re-reconcile): no new model validated
            continue
        ltt = c.last_transition_time if c.status == status_str else (now or now_rfc3339())
        out.append(Condition(type=type, status=status_str, reason=reason, message=message,
                             observed_generation=observed_generation, last_transition_time=ltt))
    if not found:
        out.append(Condition(type=type, status=status_str, reason=reason, message=message,
                             observed_generation=observed_generation, last_transition_time=now or now_rfc3339()))
    return out


def set_kstatus_conditions(conditions: list[Condition], ready: ConditionState,
                           observed_generation: int | None = None, now: str | None = None) -> list[Condition]:
    """Return `conditions` with kstatus' Reconciling and Stalled derived from the Ready state `ready`: the one of
    them that `ready.progress` (else `progress_of(ready.reason)`) names is True, with Ready's reason and message; the other (and both,
    when Ready is True or the object is idle) is removed (kstatus: abnormal-true conditions are absent when
    False, as Flux's own objects do)."""
    progress = (None if ConditionStatus.of(ready.status) == ConditionStatus.TRUE
                else ready.progress or progress_of(ready.reason))
    for type_, wanted in ((ConditionType.Reconciling, Progress.Reconciling), (ConditionType.Stalled,
                                                                               Progress.Stalled)):
        if progress == wanted:
            conditions = set_condition(conditions, type_, ConditionState(ConditionStatus.TRUE, ready.reason,
                                                                         ready.message), observed_generation, now)
        else:
            conditions = [c for c in conditions if c.type != type_]
    return conditions


def get_condition(conditions: list[Condition], type: str) -> Condition | None:
    """The condition of `type` in `conditions`, or None when there is none."""
    return next((c for c in conditions if c.type == type), None)


class StatusBase(ApiModel):
    """Fields every status carries: what generation it describes and its conditions."""

    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation of the spec this status was computed from.")
    conditions: list[Condition] = Field(
        default_factory=list, description="Current conditions; Ready summarises them (kstatus-compatible).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})

    def set_condition(self, type: ConditionType, state: ConditionState, generation: int | None = None,
                      now: str | None = None) -> None:
        """Set condition `type` to `state` in place (module `set_condition`: the transition time moves only on
        a status flip); `generation` (metadata.generation) becomes its observedGeneration. The one way a
        condition is set: setting Ready also sets kstatus' Reconciling and Stalled from it
        (`set_kstatus_conditions`), on every kind and every path (the InvalidSpec status included)."""
        self.conditions = set_condition(self.conditions, type, state, observed_generation=generation, now=now)
        if type == ConditionType.Ready:
            self.conditions = set_kstatus_conditions(self.conditions, state, generation, now)

    def condition(self, type: str) -> Condition | None:
        """The condition of `type`, or None when it is not set."""
        return get_condition(self.conditions, type)


class ObjectMeta(ApiModel):
    """The parts of metadata loraplane reads; everything else passes through untouched."""

    model_config = ConfigDict(extra="allow")
    name: str | None = Field(default=None, pattern=DNS_NAME, max_length=253)
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    generation: int | None = None
    uid: str | None = None


class Resource(ApiModel):
    """Base of the three top-level kinds: apiVersion, kind, metadata, spec, status."""

    # Filled by each kind.
    KIND: ClassVar[str]
    PLURAL: ClassVar[str]
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ()
    PRINTER_COLUMNS: ClassVar[tuple[dict[str, Any], ...]] = ()
    DESCRIPTION: ClassVar[str] = ""

    api_version: str = Field(default=API_VERSION, alias="apiVersion")
    kind: str
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)

    # A field validator (not a model one) so that the error is reported under `apiVersion`, the field to fix.
    @field_validator("api_version")
    @classmethod
    def _check_api_version(cls, value: str) -> str:
        if value != API_VERSION:
            raise ValueError(f"must be {API_VERSION}, not {value!r}")
        return value
