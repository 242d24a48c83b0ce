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
from pathlib import Path
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from loraplane.api.common import DNS_NAME

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

    def to_json(self) -> str:
        """The table as indented JSON (the ConfigMap value and the local file format)."""
        return self.model_dump_json(indent=2)

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
    Unloading = "Unloading"
    """No longer in the table; being unloaded from vLLM."""


class AdapterReport(_Model):
    """One adapter's state on one replica, with the reason, since when and how many load attempts."""

    state: AdapterState
    reason: str = Field(description="CamelCase reason, e.g. Loaded, RankTooLarge, BaseModelMismatch, NoEffect.")
    message: str = ""
    since: str = Field(description="RFC 3339 time the adapter entered this state.")
    attempts: int = 0
    sha256: str | None = Field(default=None, description="Digest of the artifact this replica fetched and "
                                                         "verified (the one the table expected, else its "
                                                         "directory's sha256_dir); the Adapter records it.")


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

    def to_annotation(self) -> str:
        """Compact, key-sorted JSON without nulls: the value of the Pod annotation `loraplane.io/adapters`."""
        return json.dumps(self.model_dump(mode="json", exclude_none=True), separators=(",", ":"), sort_keys=True)
