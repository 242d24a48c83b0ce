"""Adapter: one versioned LoRA artifact, checked against its base model before it is ever loaded."""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from typing import ClassVar, Literal

from pydantic import Field

from loraplane.api.common import (
    URI_MAX_LENGTH,
    ShortString,
    ApiModel,
    CelRule,
    FreeForm,
    LocalObjectRef,
    Resource,
    SecretKeyRef,
    StatusBase,
    uri_pattern,
    uri_rules,
)
from loraplane.api.evaluation import EvaluationResult
from loraplane.api.finetunejob import immutable
from loraplane.api.rollout import HistoryEntry, RolloutPolicy, RolloutStatus

# Served names (what vLLM loads an adapter version under, and what the serving table, the loader's report and
# the router's backends carry) are `<adapter>--<version>`. The separator is reserved in versions (a CEL rule
# below) and in the base model's served name (api.modelroute), so the name is unique by construction: the
# version is what follows the last `--`, the Adapter name what precedes it (an Adapter name may contain `--`).
SERVED_NAME_SEPARATOR = "--"


def served_name(adapter: str, version: str) -> str:
    """The served name of version `version` of Adapter `adapter`: `<adapter>--<version>`.

    Raises ValueError when `version` contains the reserved separator (the API refuses such versions), since two
    different (adapter, version) pairs could then give one name (`sql`/`v2--1` and `sql--v2`/`1`)."""
    if SERVED_NAME_SEPARATOR in version or not version:
        raise ValueError(f"version {version!r} must be non-empty and must not contain "
                         f"{SERVED_NAME_SEPARATOR!r} (reserved as the served-name separator)")
    return f"{adapter}{SERVED_NAME_SEPARATOR}{version}"


def base_served_name(name: str) -> str:
    """`name` made disjoint from every adapter served name: each run of the separator's character (`-`) that
    would contain `--` becomes a single `-` (`sql--v1` -> `sql-v1`). Every adapter served name contains `--`
    (`served_name`), so a name this returns never equals one and `adapter_of_served_name` gives None for it.

    Used for the base model's served name whatever its origin (spec.servedModelName and baseModel.name are
    also refused with `--` by the API; a name derived from a URI is not, so it is normalised here)."""
    while SERVED_NAME_SEPARATOR in name:
        name = name.replace(SERVED_NAME_SEPARATOR, SERVED_NAME_SEPARATOR[0])
    return name


def adapter_of_served_name(name: str) -> str | None:
    """The Adapter name a served name (`served_name`) belongs to; None when `name` is not an adapter's."""
    adapter, sep, version = name.rpartition(SERVED_NAME_SEPARATOR)
    return adapter if sep and adapter and version else None


class AdapterBaseModel(ApiModel):
    """The base model an adapter was trained on; it is only served on a ModelRoute of the same base."""

    name: str = Field(min_length=1, max_length=200,
                      description="Hugging Face id (or URI) of the base model, as in the ModelRoute's baseModel.")
    revision: str | None = Field(default=None, max_length=200,
                                 description="Revision it was trained on; when set, the route's must match.")


class AdapterSource(ApiModel):
    """Where the artifact (a PEFT adapter directory) lives."""

    cel_rules: ClassVar = (
        CelRule(rule="has(self.uri) != has(self.fineTuneJobRef)",
                check=lambda o: ("uri" in o) != ("fineTuneJobRef" in o),
                message="set exactly one of source.uri or source.fineTuneJobRef"),
        *uri_rules("uri", "source.uri"),
    )

    uri: str | None = Field(max_length=URI_MAX_LENGTH,
        default=None, pattern=uri_pattern("pvc", "s3", "http", "hf", "file", "path"),
        description="pvc://CLAIM/PATH, s3://BUCKET/PREFIX, https://….tar.gz, hf://ORG/REPO[@revision], "
                    "or a local directory for local runs only (`loraplane run`): in a cluster a local path is "
                    "refused (LocalSourceRefused).")
    fine_tune_job_ref: LocalObjectRef | None = Field(
        default=None, description="The FineTuneJob whose output this is (set by the operator on success).")
    sha256: str | None = Field(max_length=64, default=None, pattern=r"^[0-9a-f]{64}$",
                               description="Expected sha256 of the artifact; loading fails on mismatch.")
    credentials_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret (in the Adapter's namespace) with the credentials to fetch this artifact: "
                                  "HF_TOKEN and/or AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, "
                                  "AWS_ENDPOINT_URL, or one `key` holding the scheme's token. Mounted read-only in "
                                  "the adapter loader of each replica that serves it; without it the loader uses "
                                  "its own identity.")


class AdapterSpec(ApiModel):
    """What an Adapter declares: its base model, where the artifact is, its version and LoRA rank."""

    cel_rules: ClassVar = (
        CelRule(rule=f"!has(self.version) || !self.version.contains('{SERVED_NAME_SEPARATOR}')",
                check=lambda obj: SERVED_NAME_SEPARATOR not in str(obj.get("version") or ""),
                message=f"spec.version must not contain '{SERVED_NAME_SEPARATOR}': it separates the Adapter name "
                        "from the version in served names (use e.g. v2-1 or v2.1)"),
    )

    base_model: AdapterBaseModel = Field(json_schema_extra=immutable("spec.baseModel",
                                                                     "create a new Adapter for another base"))
    source: AdapterSource
    version: str | None = Field(
        default=None, max_length=63, pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
        description="Version label (no '--': it separates name and version in the served name "
                    "`<adapter>--<version>`). Changing source or version rolls replicas to the new artifact under "
                    "a new internal name, so cached prefixes never mix versions.")
    rank: int | None = Field(default=None, ge=1, le=512,
                             description="Declared LoRA rank; checked against routes before any download.")
    target_modules: list[ShortString] | None = Field(max_length=256, default=None, description="Declared target modules.")
    rollout: RolloutPolicy | None = Field(default=None, description=(
        "How a new spec.version goes live: evaluation gates, traffic steps with live analysis, automatic "
        "rollback, promote / abort / rollbackTo (docs/rollouts.md). Without it a new version takes all the "
        "traffic once every replica has loaded it."))


class ArtifactInfo(ApiModel):
    """Facts about the artifact of `status.version`: its URI and the sha256 recorded when the version was first
    served (spec.source.sha256, else the digest the replicas verified), and what adapter_config.json says."""

    uri: str | None = None
    sha256: str | None = None
    size_bytes: int | None = Field(default=None, ge=0)
    peft_type: str | None = None
    rank: int | None = None
    alpha: float | None = None
    target_modules: list[str] | None = None
    base_model: str | None = Field(default=None, description="base_model_name_or_path recorded by peft.")
    modules_to_save: list[str] | None = None


class Provenance(ApiModel):
    """How the artifact was made (from its FineTuneJob)."""

    fine_tune_job: str | None = None
    fine_tune_job_uid: str | None = Field(
        default=None, description="The uid of the FineTuneJob run that produced this version (the Adapter has no "
                                  "ownerReference to it: deleting the job never deletes a served Adapter).")
    base_model: str | None = None
    base_model_revision: str | None = None
    dataset_uri: str | None = None
    dataset_sha256: str | None = None
    hyperparameters: FreeForm | None = None
    metrics: dict[str, float] | None = None
    evaluation: EvaluationResult | None = Field(
        default=None, description="The version's evaluation after training (api.evaluation): its scores, the base "
                                  "model's and the replaced version's.")
    library_versions: dict[str, str] | None = None
    completed_at: str | None = Field(default=None, json_schema_extra={"format": "date-time"})


class LoadedOn(ApiModel):
    """One replica that serves the adapter."""

    route: str
    replica: str = Field(description="Pod name.")
    served_name: str = Field(description="Name the adapter is loaded under in vLLM (includes its version).")
    since: str = Field(json_schema_extra={"format": "date-time"})


class AdapterPhase(StrEnum):
    """status.phase of an Adapter: a one-word summary for `kubectl get` (the Ready condition has the detail)."""

    Pending = "Pending"
    Incompatible = "Incompatible"
    Loading = "Loading"
    Ready = "Ready"
    Failed = "Failed"


class CandidateVersion(ApiModel):
    """The version spec asks for while another one serves (make-before-break, docs/adapters.md): it is loaded
    and smoke-tested beside the serving version, gets `weight` % of the adapter's traffic (0 until it is Ready on
    every replica that will serve it), and replaces the serving version (is promoted) when that share reaches
    100. A candidate that fails (Failed, Incompatible) never gets traffic; the serving version keeps serving."""

    # "" rather than None when absent: status is written with merge patches, where a field left out keeps its
    # previous value (another candidate's version or URI).
    version: str = Field(default="", description="spec.version of the candidate (\"\" without one).")
    served_name: str = Field(description="Internal vLLM name of the candidate.")
    uri: str = Field(default="", description="spec.source.uri of the candidate (\"\" until it has one).")
    phase: AdapterPhase = Field(description="Loading until every replica that will serve it has it Ready; Ready; "
                                            "Failed or Incompatible when a replica refused it (never promoted); "
                                            "Pending when a route has no room for it (NoRoomForCandidate) or it has no "
                                            "source.uri yet (ArtifactPending).")
    reason: str = Field(description="Why it is in that phase (a Reason: Loading, Loaded, NoEffect, ...).")
    message: str = Field(default="", max_length=4096)
    ready_replicas: int = Field(default=0, ge=0, description="Replicas that have it loaded and smoke-tested.")
    replicas: int = Field(default=0, ge=0, description="Ready replicas of the routes that will serve it.")
    weight: int = Field(default=0, ge=0, le=100, description="Share of the adapter's traffic it gets (%).")


class AdapterStatus(StatusBase):
    """What the operator observed about an Adapter: its artifact, provenance and the replicas serving it."""

    phase: AdapterPhase | None = None
    version: str | None = Field(default=None, description=(
        "The version that serves: spec.version once it was loaded and smoke-tested on every replica of the "
        "routes that select the Adapter (until then the previous version keeps serving; `candidate`)."))
    served_name: str | None = Field(default=None, description="Internal vLLM name of `version`.")
    artifact: ArtifactInfo | None = Field(default=None, description=(
        "The artifact of `version` (recorded when it was first served): what the serving table loads it from."))
    candidate: CandidateVersion | None = Field(default=None, description=(
        "The spec's version while it does not serve yet (make-before-break); absent when spec's version serves."))
    provenance: Provenance | None = None
    routes: list[str] = Field(default_factory=list, description="ModelRoutes that select this adapter.")
    accepted_base_model: AdapterBaseModel | None = Field(
        default=None, description="The spec.baseModel the operator accepted; spec.baseModel is immutable, so a "
                                  "later change is refused (Ready=False, reason SpecImmutable) against this.")
    loaded_on: list[LoadedOn] = Field(default_factory=list)
    rollout: RolloutStatus | None = Field(default=None, description="Where the rollout of spec.version stands.")
    history: list[HistoryEntry] = Field(default_factory=list, max_length=20, description=(
        "The versions rolled out, newest first (spec.rollout.historyLimit): evaluation, when each was promoted "
        "or rolled back and why, and the artifact, so spec.rollout.rollbackTo can serve one again."))


class Adapter(Resource):
    """The Adapter custom resource (loraplane.io/v1alpha1): one versioned LoRA artifact."""

    KIND: ClassVar = "Adapter"
    PLURAL: ClassVar = "adapters"
    SHORT_NAMES: ClassVar = ("lora",)
    DESCRIPTION: ClassVar = "A versioned LoRA adapter, checked for compatibility before it is served."
    PRINTER_COLUMNS: ClassVar = (
        {"name": "Base", "type": "string", "jsonPath": ".spec.baseModel.name"},
        {"name": "Version", "type": "string", "jsonPath": ".spec.version"},
        {"name": "Rank", "type": "integer", "jsonPath": ".status.artifact.rank"},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Serving", "type": "string", "jsonPath": ".status.version", "priority": 1},
        {"name": "Candidate", "type": "string", "jsonPath": ".status.candidate.phase", "priority": 1},
        {"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"},
        {"name": "Rollout", "type": "string", "jsonPath": ".status.rollout.state"},
        {"name": "Step", "type": "integer", "jsonPath": ".status.rollout.step"},
        {"name": "Weight", "type": "integer", "jsonPath": ".status.rollout.weight"},
        {"name": "Reason", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].reason",
         "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    )

    kind: Literal["Adapter"] = "Adapter"
    spec: AdapterSpec
    status: AdapterStatus | None = None

    def served_name(self) -> str:
        """The name this version is loaded under in vLLM (module `served_name`): unique per (Adapter, version)
        across the namespace, stable across replicas."""
        if self.spec.version:
            return served_name(self.metadata.name or "", self.spec.version)
        # No version: derive one from the source, so a changed source still gets a new name.
        digest = hashlib.sha256(json.dumps(self.spec.source.wire(), sort_keys=True).encode()).hexdigest()
        return served_name(self.metadata.name or "", digest[:8])
