"""The operator's settings, read from LORAPLANE_* environment variables (`loraplane operator` sets them from its
flags; `kopf run -m loraplane.controllers.handlers` takes them from the environment as is)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from pydantic import ValidationError

from loraplane.api.paths import ROUTER_PORT
from loraplane.api.pods import ChildPodSettings, PodSettings
from loraplane.api.validation import format_validation_error
from loraplane.builders.policy import (DEFAULT_ENGINE_ARGS, DEFAULT_ENGINE_ENV, SpecPolicy,
                                       chart_pod_settings_problems, split_list)
from loraplane.builders.settings import ArtifactClaim, BuildSettings


@dataclass(frozen=True)
class OperatorSettings:
    """How the operator runs: the builders' settings, the namespaces watched, the periodic resync (seconds),
    how long a scheduled key waits for more events (seconds), where /metrics and /healthz listen and how often
    the engine pods' reports are read (seconds)."""

    build: BuildSettings = field(default_factory=BuildSettings)
    namespaces: tuple[str, ...] = ()      # empty: all namespaces
    resync_seconds: float = 600.0
    coalesce_seconds: float = 0.05
    metrics_port: int = 8080
    metrics_host: str = "0.0.0.0"
    # Seconds between two reads of each engine pod's loader /status (controllers/reports.py).
    report_poll_seconds: float = 5.0
    # The router pods' port read for rollout analysis (/metrics; controllers/rollout_metrics.py). Tests run the
    # router elsewhere; in a cluster it is the router's port.
    router_metrics_port: int = ROUTER_PORT

    @classmethod
    def from_env(cls) -> "OperatorSettings":
        """`kopf run -m loraplane.controllers.handlers` has no flags of ours: settings come from LORAPLANE_* env."""
        e = os.environ.get
        d = BuildSettings()
        policy = SpecPolicy(
            allowed_images=split_list(e("LORAPLANE_ALLOWED_IMAGES")) or (),
            # Unset: the safe default list; set (even empty): exactly the flags it names.
            allowed_engine_args=split_list(e("LORAPLANE_ALLOWED_ENGINE_ARGS", ",".join(DEFAULT_ENGINE_ARGS))) or (),
            allow_trust_remote_code=e("LORAPLANE_ALLOW_TRUST_REMOTE_CODE", "false").lower() == "true",
            allowed_env_secrets=split_list(e("LORAPLANE_ALLOWED_ENV_SECRETS")) or (),
            # Unset: the safe default list; set (even empty): exactly the globs it names.
            allowed_engine_env=split_list(e("LORAPLANE_ALLOWED_ENGINE_ENV", ",".join(DEFAULT_ENGINE_ENV))) or (),
            allowed_service_accounts=split_list(e("LORAPLANE_ALLOWED_SERVICE_ACCOUNTS")) or (),
            allowed_prometheus_addresses=split_list(e("LORAPLANE_ALLOWED_PROMETHEUS_ADDRESSES")) or (),
            allowed_priority_classes=split_list(e("LORAPLANE_ALLOWED_PRIORITY_CLASSES")) or (),
            allowed_runtime_classes=split_list(e("LORAPLANE_ALLOWED_RUNTIME_CLASSES")) or (),
            allowed_pod_metadata_keys=split_list(e("LORAPLANE_ALLOWED_POD_METADATA_KEYS")) or (),
            allowed_model_cache_host_paths=split_list(e("LORAPLANE_ALLOWED_MODEL_CACHE_HOST_PATHS")) or ())
        return cls(
            build=BuildSettings(image=e("LORAPLANE_IMAGE", d.image), trainer_image=e("LORAPLANE_TRAINER_IMAGE"),
                                engine_image=e("LORAPLANE_ENGINE_IMAGE", d.engine_image),
                                artifact_store=e("LORAPLANE_ARTIFACT_STORE", d.artifact_store),
                                artifact_claim=ArtifactClaim(
                                    create=e("LORAPLANE_ARTIFACT_CLAIM_CREATE", "true").lower() != "false",
                                    storage_class=e("LORAPLANE_ARTIFACT_CLAIM_STORAGE_CLASS") or None,
                                    access_mode=e("LORAPLANE_ARTIFACT_CLAIM_ACCESS_MODE") or d.artifact_claim.access_mode,
                                    size=e("LORAPLANE_ARTIFACT_CLAIM_SIZE") or d.artifact_claim.size),
                                hpa_api_version=e("LORAPLANE_HPA_API_VERSION", d.hpa_api_version),
                                pdb_api_version=e("LORAPLANE_PDB_API_VERSION", d.pdb_api_version),
                                pod_failure_policy=e("LORAPLANE_POD_FAILURE_POLICY", "true").lower() != "false",
                                allow_insecure_http=e("LORAPLANE_ALLOW_INSECURE_HTTP", "false").lower() == "true",
                                policy=policy, child_pods=child_pods_from_env(e("LORAPLANE_CHILD_PODS")),
                                network_policies=e("LORAPLANE_NETWORK_POLICIES", "true").lower() != "false"),
            namespaces=tuple(n for n in e("LORAPLANE_NAMESPACES", "").split(",") if n),
            resync_seconds=float(e("LORAPLANE_RESYNC_SECONDS", "600")),
            coalesce_seconds=float(e("LORAPLANE_COALESCE_SECONDS", "0.05")),
            metrics_port=int(e("LORAPLANE_METRICS_PORT", "8080")),
            metrics_host=e("LORAPLANE_METRICS_HOST", "0.0.0.0"),
            report_poll_seconds=float(e("LORAPLANE_REPORT_POLL_SECONDS", "5")),
            router_metrics_port=int(e("LORAPLANE_ROUTER_METRICS_PORT", str(ROUTER_PORT))),
        )


def child_pods_from_env(value: str | None) -> PodSettings:
    """The chart's childPods (LORAPLANE_CHILD_PODS, JSON of api.pods.ChildPodSettings) as ChildPodSettings; unset or empty:
    none. Raises ValueError naming the bad value when it is not valid JSON, not PodSettings, or loosens the
    restricted security context (builders.policy.chart_pod_settings_problems): the operator does not start with
    settings it would have to ignore."""
    if not value or not value.strip():
        return ChildPodSettings()
    try:
        pods = ChildPodSettings.model_validate(json.loads(value))
    except json.JSONDecodeError as exc:
        raise ValueError(f"LORAPLANE_CHILD_PODS (chart value childPods) is not valid JSON: {exc}") from exc
    except ValidationError as exc:
        raise ValueError("LORAPLANE_CHILD_PODS (chart value childPods):\n"
                         + format_validation_error(exc, "  childPods.")) from exc
    if problems := chart_pod_settings_problems(pods):
        raise ValueError("chart value childPods loosens the restricted security context every pod keeps: "
                         + "; ".join(problems))
    return pods


__all__ = ["OperatorSettings", "child_pods_from_env"]
