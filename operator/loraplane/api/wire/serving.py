"""The contract between the operator and the serving data plane (adapter loader and router).

For each ModelRoute the operator resolves its spec and the Adapters it selects into one `ServingTable`
and writes it as JSON (key `serving.json`) into the ConfigMap `<route>-serving`:

- the **loader** sidecar beside each vLLM replica makes the replica's loaded adapters equal `adapters`;
- the **router** maps each public model name in `models` to weighted backends (vLLM served names).

Each replica's loader reports what it actually has as a `ReplicaReport`: served on its HTTP `/status`
(the router polls it to choose replicas; the operator polls it too and writes it into the Pod's annotation
`loraplane.io/adapters`, which it aggregates into Adapter and ModelRoute status). Locally (quickstart, tests) the same
JSON travels through files and loopback URLs instead of a ConfigMap and annotations.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loraplane.api.common import DNS_NAME
from loraplane.api.orchestration import ContentModel, ExternalModel
from loraplane.api.reasons import Reason, quoted_reason, reason_or_unknown

# Re-exported: the keys and ports this contract travels through (defined once in api.keys / api.paths).
from loraplane.api.keys import REPORT_ANNOTATION, ROUTE_LABEL  # noqa: F401
from loraplane.api.paths import ENGINE_PORT, LOADER_PORT, ROUTER_PORT  # noqa: F401

CONFIGMAP_KEY = "serving.json"


def configmap_name(route_name: str) -> str:
    """Name of the ConfigMap that carries a route's serving table: `<route>-serving`."""
    return f"{route_name}-serving"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DesiredAdapter(_Model):
    """One adapter version every replica of the route must have loaded."""

    served_name: str = Field(description="Name it is loaded under in vLLM (unique per version).")
    adapter: str = Field(description="Adapter object name.")
    version: str | None = None
    uri: str = Field(description="Where to fetch the PEFT directory: local path, pvc://, s3://, https://, hf://.")
    sha256: str | None = Field(default=None, description="Expected artifact sha256; mismatch refuses the load.")
    rank: int | None = Field(default=None, description="Declared/known rank (checked again on the artifact).")
    base_model: str = Field(description="Base model identity the adapter was trained on.")
    base_model_revision: str | None = None
    credentials_secret: str | None = Field(
        default=None, pattern=DNS_NAME, description="The Adapter's source.credentialsSecretRef Secret: the loader reads it from "
                                  "ADAPTER_CREDENTIALS_ROOT/<secret> and fetches with it (None: its own identity).")
    credentials_key: str | None = Field(default=None, pattern=r"^[-._a-zA-Z0-9]+$",
                                        description="One key of that Secret (the scheme's token).")


class Backend(_Model):
    """One weighted target of a public model: a vLLM served name (the base model's or an adapter version's)."""

    served_name: str = Field(description="vLLM model name: the base model's served name or an adapter's.")
    adapter: str | None = Field(default=None, description="Adapter object name; None for the base model.")
    weight: int = Field(ge=0, le=100)


class PublicModel(_Model):
    """A name clients send in the OpenAI `model` field and the backends the router splits it across."""

    name: str = Field(description="Public model name clients send in `model`.")
    backends: list[Backend]


class RouterSettings(_Model):
    """Router behaviour from the ModelRoute's spec.router (timeout in seconds, body limit in bytes)."""

    sticky_header: str | None = None
    timeout_seconds: float = 600
    max_request_bytes: int = 4 * 1024 * 1024
    log_prompts: bool = False
    # vLLM runs with --enable-force-include-usage (in spec.engine.extraArgs): every stream already ends with its
    # usage chunk, which clients then expect, so the router neither asks for it nor strips it.
    engine_includes_usage: bool = False
    # While no replica is up (scaled to zero, or every replica starting), a request is held this many seconds
    # for one to serve its model, then answered 503 with Retry-After; 0: answered 503 at once. At most
    # `cold_start_max_requests` are held at once (per router pod); more are answered 503 at once.
    cold_start_wait_seconds: float = Field(default=0, ge=0)
    cold_start_max_requests: int = Field(default=0, ge=0)


class ServingTable(_Model):
    """Everything the loader and router of one route need: the base model, vLLM's LoRA limits, the adapters
    to load and the public models (the ConfigMap's `serving.json`)."""

    route: str
    namespace: str = "default"
    generation: int = 0
    base_model: str = Field(description="Identity of the served base model (ModelRef.identity).")
    base_model_revision: str | None = None
    served_model_name: str = Field(description="Name vLLM serves the base model under.")
    model_path: str | None = Field(default=None, description="Local path of the base model in the replica, "
                                                             "for compatibility checks against its modules.")
    max_lora_rank: int
    max_loras: int
    adapters: list[DesiredAdapter] = Field(default_factory=list)
    models: list[PublicModel] = Field(default_factory=list)
    router: RouterSettings = Field(default_factory=RouterSettings)
    # Issue 15 (api/orchestration.py): content-routed public models, and the public models of other routes in
    # the namespace they reach (forwarded to that route's router).
    content_models: list[ContentModel] = Field(default_factory=list)
    external_models: list[ExternalModel] = Field(default_factory=list)
    # The route's metadata.creationTimestamp: the gateway's first-come rule for public names across routes
    # (api.orchestration.public_name_owners).
    route_created: str | None = None

    @cached_property
    def json_text(self) -> str:
        """The table as indented JSON, computed once per (frozen) table: resolve() measures it, the controller
        compares it and the ConfigMap carries it."""
        return self.model_dump_json(indent=2)

    def to_json(self) -> str:
        """The table as indented JSON (the ConfigMap value and the local file format)."""
        return self.json_text

    @classmethod
    def load(cls, path: Path) -> "ServingTable":
        """Read a table from a JSON file; raises pydantic.ValidationError on a malformed table."""
        return cls.model_validate_json(Path(path).read_text())


class AdapterState(StrEnum):
    """Where one adapter stands on one replica (a ReplicaReport entry); the operator aggregates these."""

    Pending = "Pending"
    """In the table, not yet being worked on (waiting for vLLM or a retry)."""
    Fetching = "Fetching"
    """Being downloaded or copied into the verified cache."""
    Loading = "Loading"
    """Gated, being loaded into vLLM or smoke-tested."""
    Ready = "Ready"
    """Loaded into vLLM and smoke-tested: requests may be sent to it."""
    Incompatible = "Incompatible"
    """Refused by the compatibility gate (never loaded); the reason says which rule."""
    Failed = "Failed"
    """Fetching or loading failed after bounded retries, or the smoke test showed no effect."""
    Draining = "Draining"
    """No longer in the table, still loaded: requests routed to it before the table changed (or by a router
    that has not read the new table yet) finish; unloaded once vLLM runs none with it (bounded). Routable."""
    Unloading = "Unloading"
    """No longer in the table; being unloaded from vLLM."""


# The longest message of one adapter in a report the operator carries into a condition (characters); the loader
# writes at most api.redaction.MAX_MESSAGE. A pod annotation anyone who may patch pods can write is untrusted.
REPORT_MESSAGE_CHARS = 4000


class AdapterReport(_Model):
    """One adapter's state on one replica, with the reason, since when and how many load attempts.

    Read from a pod annotation, so validated at this boundary: a reason that is not a `Reason` becomes
    `UnknownReason` (the original quoted in the message) and the message is cut to REPORT_MESSAGE_CHARS, so
    neither can fail a status patch nor become an unbounded metric label or Event reason."""

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, data):
        if isinstance(data, dict):
            data = dict(data)
            reason = data.get("reason")
            message = data.get("message")
            if isinstance(reason, str) and reason_or_unknown(reason) == Reason.UnknownReason:
                data["reason"] = Reason.UnknownReason.value
                data["message"] = f"(reported reason {quoted_reason(reason)}) {message if isinstance(message, str) else ''}"
            if isinstance(data.get("message"), str) and len(data["message"]) > REPORT_MESSAGE_CHARS:
                data["message"] = data["message"][:REPORT_MESSAGE_CHARS - 3] + "..."
        return data

    state: AdapterState
    reason: str = Field(description="CamelCase reason, e.g. Loaded, RankTooLarge, BaseModelMismatch, NoEffect; "
                                    "one the reader does not know reads as UnknownReason (quoted in the message).")
    message: str = Field(default="", description=f"At most {REPORT_MESSAGE_CHARS} characters (longer is cut).")
    since: str = Field(description="RFC 3339 time the adapter entered this state.")
    attempts: int = 0
    sha256: str | None = Field(default=None, description="Digest of the artifact this replica fetched and "
                                                         "verified (the one the table expected, else its "
                                                         "directory's sha256_dir); the Adapter records it.")
    rank: int | None = Field(default=None, ge=0, description="The LoRA rank the replica's gate read from the "
                                                         "artifact (adapter_config.json and its tensors); the "
                                                         "Adapter records it in status.artifact.rank.")


# The report annotation's budget. Kubernetes refuses an object whose annotations together exceed 256 KiB
# (apimachinery ValidateAnnotationsSize, TotalAnnotationSizeLimitB = 262144): past it the report patch fails and
# every adapter's status on that replica goes stale. 64 KiB are left to the pod's other annotations; 192 KiB
# hold the state, reason and time of about 1,000 adapters.
REPORT_MAX_BYTES = 192 * 1024
# The loader's /status answers ReplicaReport.to_annotation() (at most REPORT_MAX_BYTES) when asked with this
# query string; without it the full report (what the router polls). The operator's report relay asks with it.
STATUS_BOUNDED_QUERY = "form=annotation"
# The most any reader of a loader's /status reads (storage.httpbody.read_bounded): the full report grows with its
# adapters (about 370 bytes per Ready adapter, up to ~4.2 KB with a REPORT_MESSAGE_CHARS message), so 4 MiB
# covers 1,000 adapters with the longest messages or ~11,000 Ready ones.
STATUS_MAX_BYTES = 4 * 1024 * 1024
# Message lengths tried, longest first, when the report does not fit (the last one drops them).
_MESSAGE_STEPS = (500, 100, 0)
# Which entries are kept first when even states and reasons do not all fit: what serves and what needs someone
# to act, then the ones in transit.
_KEEP_FIRST = {AdapterState.Ready: 0, AdapterState.Failed: 1, AdapterState.Incompatible: 1}


def _dump(data: dict) -> str:
    return json.dumps(data, separators=(",", ":"), sort_keys=True)


class ReplicaReport(_Model):
    """What one replica really serves, as its loader observed it."""

    replica: str = Field(description="Pod name (or a local id).")
    route: str
    generation: int = Field(description="ServingTable generation the loader has applied.")
    engine_ready: bool = Field(description="The replica may get traffic: vLLM answers /health and has completed "
                                           "the loader's warm-up completion since it (re)started.")
    engine_url: str | None = None
    adapters: dict[str, AdapterReport] = Field(default_factory=dict, description="By served name.")
    updated_at: str
    omitted: int | None = Field(default=None, ge=0, description=(
        "How many adapters were left out of this report to keep it within REPORT_MAX_BYTES (absent: none). The "
        "replica's HTTP /status always has them all."))

    def to_annotation(self, max_bytes: int = REPORT_MAX_BYTES) -> str:
        """Compact, key-sorted JSON without nulls: the value of the Pod annotation `loraplane.io/adapters`,
        never longer than `max_bytes` (UTF-8).

        When the whole report does not fit, it is made smaller step by step until it does: the messages of
        Ready entries go first, then every message is cut to 500, 100 and 0 characters (a cut message ends with
        `…`), then the digests and attempt counts of entries that are not Ready (the operator reads a digest
        only from a Ready entry). States, reasons and times are kept to the last; only if even those do not all
        fit are entries left out (the Ready and failed ones kept first, then by served name) and counted in
        `omitted`."""
        data = self.model_dump(mode="json", exclude_none=True)
        text = _dump(data)
        if len(text.encode()) <= max_bytes:
            return text
        entries: dict[str, dict] = data["adapters"]
        for e in entries.values():
            if e["state"] == AdapterState.Ready:
                e.pop("message", None)
        for limit in (None, *_MESSAGE_STEPS):
            if limit is not None:
                for e in entries.values():
                    if len(e.get("message", "")) > limit:
                        e["message"] = e["message"][:max(limit - 1, 0)] + "…" if limit else ""
                        if not e["message"]:
                            del e["message"]
            text = _dump(data)
            if len(text.encode()) <= max_bytes:
                return text
        for e in entries.values():
            if e["state"] != AdapterState.Ready:
                e.pop("sha256", None)
                e.pop("attempts", None)
        text = _dump(data)
        if len(text.encode()) <= max_bytes:
            return text
        # Left out, least needed first; the rest kept in their order of importance while they fit.
        order = sorted(entries, key=lambda n: (_KEEP_FIRST.get(entries[n]["state"], 2), n))
        kept: dict[str, dict] = {}
        data["adapters"], data["omitted"] = kept, len(entries)
        budget = max_bytes - len(_dump(data).encode()) - len(str(len(entries)))
        for name in order:
            cost = len(_dump({name: entries[name]}).encode()) - 1   # its `"name":{...}` plus a comma
            if cost > budget:
                break
            kept[name], budget = entries[name], budget - cost
        data["omitted"] = len(entries) - len(kept)
        return _dump(data)
