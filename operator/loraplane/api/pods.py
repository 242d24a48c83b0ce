"""Settings of the pods the operator creates (trainer Job, engine and router Deployments): pull secrets, security
context, priority and runtime class, extra labels and annotations, node selection.

One model, `PodSettings`, in two places: the chart's `childPods` values (operator-wide defaults, passed to the
operator as LORAPLANE_CHILD_PODS JSON) and one field per kind for overrides (FineTuneJob `spec.pod`, ModelRoute
`spec.engine.pod` and `spec.router.pod`). The builders merge them (builders.common.apply_pod_settings) and the
operator's spec policy (builders.policy) refuses an override that loosens the restricted security context or
sets a label or annotation the operator owns (docs/security.md, "Pod settings").

The security context types carry the Kubernetes fields a platform may need to change (ids, fsGroup, seccomp and
AppArmor profiles, SELinux level) and the fields that would loosen the restricted profile (runAsNonRoot,
privileged, allowPrivilegeEscalation, capabilities.add, ...) so that the policy can name a refused value
(PolicyViolation) instead of a schema error hiding which rule it breaks.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from loraplane.api.common import DNS_NAME, ApiModel, FreeForm, Labels, LocalObjectRef, label_key_problem

# Annotation values are free text; the API server bounds all annotations of an object to 256 KiB together.
ANNOTATION_VALUE_MAX = 4096
# A Linux capability name (CAP_ prefix optional, as the runtime accepts both).
CapabilityName = Annotated[str, Field(max_length=64, pattern=r"^[A-Za-z_]+$")]
AnnotationValue = Annotated[str, Field(max_length=ANNOTATION_VALUE_MAX)]


class SeccompProfile(ApiModel):
    """core/v1 SeccompProfile: RuntimeDefault or Localhost (Unconfined is refused by the policy)."""

    type: Literal["RuntimeDefault", "Localhost", "Unconfined"]
    localhost_profile: str | None = Field(default=None, max_length=4096,
                                          description="Path of a Localhost profile under the kubelet's seccomp root.")


class AppArmorProfile(ApiModel):
    """core/v1 AppArmorProfile: RuntimeDefault or Localhost (Unconfined is refused by the policy)."""

    type: Literal["RuntimeDefault", "Localhost", "Unconfined"]
    localhost_profile: str | None = Field(default=None, max_length=4096)


class SELinuxOptions(ApiModel):
    """core/v1 SELinuxOptions. Pod Security `baseline` allows only `level` and the container_* types; the policy
    refuses the rest."""

    user: str | None = Field(default=None, max_length=253)
    role: str | None = Field(default=None, max_length=253)
    type: str | None = Field(default=None, max_length=253)
    level: str | None = Field(default=None, max_length=253)


class Capabilities(ApiModel):
    """core/v1 Capabilities. `drop` adds to the operator's ALL; `add` may hold only NET_BIND_SERVICE (Pod
    Security `restricted`)."""

    add: list[CapabilityName] = Field(default_factory=list, max_length=64)
    drop: list[CapabilityName] = Field(default_factory=list, max_length=64)


class PodSecurityContextSpec(ApiModel):
    """The pod-level securityContext fields a pod's settings may set; merged over the operator's restricted one
    (runAsNonRoot, uid/gid 65532, fsGroup 65532, RuntimeDefault seccomp)."""

    run_as_user: int | None = Field(default=None, ge=0, le=2147483647, description="UID; 0 is refused.")
    run_as_group: int | None = Field(default=None, ge=0, le=2147483647)
    run_as_non_root: bool | None = Field(default=None, description="false is refused.")
    fs_group: int | None = Field(default=None, ge=0, le=2147483647, description=(
        "Group that owns the pod's volumes (PVCs are made writable for it): the GID the storage expects."))
    fs_group_change_policy: Literal["OnRootMismatch", "Always"] | None = None
    supplemental_groups: list[int] = Field(default_factory=list, max_length=64)
    seccomp_profile: SeccompProfile | None = None
    app_armor_profile: AppArmorProfile | None = None
    se_linux_options: SELinuxOptions | None = None

    @field_validator("supplemental_groups")
    @classmethod
    def _groups(cls, groups: list[int]) -> list[int]:
        if any(g < 0 for g in groups):
            raise ValueError("supplementalGroups must be non-negative GIDs")
        return groups


class ContainerSecurityContextSpec(ApiModel):
    """The container-level securityContext fields a pod's settings may set, applied to every container of the
    pod; merged over the operator's restricted one (no privilege escalation, capabilities drop ALL, non-root,
    read-only root filesystem, RuntimeDefault seccomp)."""

    run_as_user: int | None = Field(default=None, ge=0, le=2147483647, description="UID; 0 is refused.")
    run_as_group: int | None = Field(default=None, ge=0, le=2147483647)
    run_as_non_root: bool | None = Field(default=None, description="false is refused.")
    allow_privilege_escalation: bool | None = Field(default=None, description="true is refused.")
    privileged: bool | None = Field(default=None, description="true is refused.")
    read_only_root_filesystem: bool | None = Field(default=None, description="false is refused.")
    capabilities: Capabilities | None = None
    proc_mount: Literal["Default", "Unmasked"] | None = Field(default=None, description="Unmasked is refused.")
    seccomp_profile: SeccompProfile | None = None
    app_armor_profile: AppArmorProfile | None = None
    se_linux_options: SELinuxOptions | None = None


def _check_annotations(annotations: dict[str, str]) -> dict[str, str]:
    problems = [p.replace("label key", "annotation key") for k in annotations if (p := label_key_problem(k))]
    if problems:
        raise ValueError("; ".join(problems))
    return annotations


class PodSettings(ApiModel):
    """Settings of the pods the operator creates. Chart value `childPods` holds the operator-wide defaults; the
    kinds' fields override them (lists of pull secrets and tolerations add up; maps merge key by key; scalars
    replace). What a field may ask for is bounded by the operator's policy (docs/security.md, "Pod settings")."""

    image_pull_secrets: list[LocalObjectRef] = Field(default_factory=list, max_length=32, description=(
        "Secrets (type kubernetes.io/dockerconfigjson, in the object's namespace) the kubelet pulls this pod's "
        "images with; added to the chart's childPods.imagePullSecrets."))
    security_context: PodSecurityContextSpec | None = Field(default=None, description=(
        "Pod securityContext fields (fsGroup, runAsUser, ...) over the operator's restricted one; loosening it "
        "(runAsNonRoot false, UID 0, Unconfined seccomp) is refused (PolicyViolation)."))
    container_security_context: ContainerSecurityContextSpec | None = Field(default=None, description=(
        "securityContext fields of every container over the operator's restricted one; loosening it (privileged, "
        "allowPrivilegeEscalation, capabilities.add other than NET_BIND_SERVICE, ...) is refused "
        "(PolicyViolation)."))
    priority_class_name: str | None = Field(default=None, pattern=DNS_NAME, max_length=253, description=(
        "PriorityClass of the pods; on a kind, only one the operator's policy allows (chart "
        "operator.policy.allowedPriorityClasses; else PolicyViolation)."))
    runtime_class_name: str | None = Field(default=None, pattern=DNS_NAME, max_length=253, description=(
        "RuntimeClass of the pods (e.g. nvidia, gvisor); on a kind, only one the operator's policy allows (chart "
        "operator.policy.allowedRuntimeClasses; else PolicyViolation)."))
    labels: Labels = Field(default_factory=dict, description=(
        "Extra pod labels; for the trainer also on its Job object, where Kueue reads kueue.x-k8s.io/queue-name. "
        "Keys the operator or Kubernetes set on the pods are "
        "refused; other keys in the reserved domains loraplane.io, kubernetes.io and k8s.io (app.kubernetes.io "
        "excepted) only where the policy allows them (operator.policy.allowedPodMetadataKeys)."))
    annotations: dict[str, AnnotationValue] = Field(default_factory=dict, max_length=64, description=(
        "Extra pod annotations; the same key rules as labels."))
    node_selector: Labels = Field(default_factory=dict, description="Added to the pod's nodeSelector.")
    tolerations: list[FreeForm] = Field(default_factory=list, max_length=64,
                                        description="Added to the pod's tolerations (core/v1 Toleration).")
    affinity: FreeForm | None = Field(default=None, description="The pod's affinity (core/v1 Affinity), verbatim.")

    @field_validator("annotations")
    @classmethod
    def _annotations(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_annotations(value)

    def wire_dict(self) -> dict[str, Any]:
        """The settings in wire form (camelCase, unset left out)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# The parts of loraplane whose pods the chart's childPods may set per component (ChildPodSettings).
PodComponent = Literal["trainer", "engine", "router"]
POD_COMPONENTS: tuple[PodComponent, ...] = ("trainer", "engine", "router")


class ChildPodSettings(PodSettings):
    """The chart's `childPods`: PodSettings of every pod the operator creates, and under `trainer` (the training
    Job), `engine` (vLLM replicas) and `router` settings for that component's pods only, over the shared ones
    with the same merge rules as a kind's override (builders.common.component_pod_defaults). A setting only some
    pods need (a Kueue queue label only the trainer Jobs may carry, a GPU runtimeClassName or toleration the
    router must not get) goes under its component: a component cannot unset a shared scalar."""

    trainer: PodSettings | None = Field(default=None, description="Settings of the trainer Jobs' pods only.")
    engine: PodSettings | None = Field(default=None, description="Settings of the vLLM engine pods only.")
    router: PodSettings | None = Field(default=None, description="Settings of the router pods only.")

    def shared(self) -> PodSettings:
        """The settings every component shares (the component entries left out)."""
        return PodSettings.model_validate(self.model_dump(exclude=set(POD_COMPONENTS), exclude_unset=True))


__all__ = ["AppArmorProfile", "ChildPodSettings", "POD_COMPONENTS", "PodComponent", "Capabilities", "ContainerSecurityContextSpec", "PodSecurityContextSpec",
           "PodSettings", "SELinuxOptions", "SeccompProfile"]
