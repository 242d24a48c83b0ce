"""Helpers every child builder shares: names, labels, owner references and the applied-spec hash.

Builders are pure: the same custom resource always gives byte-identical manifests, so the operator can
compare a hash instead of the live object to decide whether anything needs writing.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Literal

import orjson

from loraplane.api.common import (
    DNS_1035_LABEL,
    DNS_LABEL,
    DNS_NAME,
    LABEL_VALUE,
    Resource,
)
from loraplane.api.keys import (  # noqa: F401
    COMPONENT_LABEL,
    FINETUNEJOB_LABEL,
    HASH_ANNOTATION,
    MANAGER,
    ROUTER_LABEL,
)
from loraplane.api.pods import ChildPodSettings, PodComponent, PodSettings
from loraplane.storage.uri import try_parse_uri

# ownerReferences of an object rendered before it exists (`loraplane render` on a file): the API server
# assigns the uid at creation and the operator fills it in.
UNKNOWN_UID = "set-by-the-api-server-at-creation"

Manifest = dict[str, Any]


# The forms of derived names and label values, with the rule Kubernetes checks for each
# (k8s.io/apimachinery/pkg/util/validation): the characters allowed, and whether the first must be a letter.
NameForm = Literal["subdomain", "label", "dns1035", "label-value"]
_FORM_RULES: dict[str, tuple[re.Pattern[str], str]] = {
    # Object names of most kinds (ConfigMap, Job, ServiceAccount, Deployment, RBAC): at most 253.
    "subdomain": (re.compile(DNS_NAME), "[^a-z0-9.-]"),
    # Volume names, pod hostnames: at most 63, no dots.
    "label": (re.compile(DNS_LABEL), "[^a-z0-9-]"),
    # Service names: a DNS label that starts with a letter.
    "dns1035": (re.compile(DNS_1035_LABEL), "[^a-z0-9-]"),
    # Label values: at most 63, upper case, '_' and '.' allowed (or empty).
    "label-value": (re.compile(LABEL_VALUE), "[^A-Za-z0-9_.-]"),
}
NAME_HASH_CHARS = 8


def bounded_name(base: str, suffix: str = "", limit: int = 63, form: NameForm = "subdomain") -> str:
    """`<base>-<suffix>` (or `base`), when it is a valid `form` of at most `limit` characters; else the longest
    head of `base` that fits, made valid, then `-<hash>` and `-<suffix>` (hash: the first NAME_HASH_CHARS hex
    digits of sha256 of the full `<base>-<suffix>`, so two different inputs never share the shortened name).

    The one way loraplane derives a child's name or a label value from a user's name: an API-valid name (up to
    253 characters, dots allowed) always yields a name the API server accepts for the child, deterministically
    (the operator finds its children again by recomputing it). Names that are already valid are unchanged.
    `suffix` must itself be valid in `form` (a constant such as "train"); `limit` is 63 or 253."""
    full = f"{base}-{suffix}" if suffix and base else (base or suffix)
    pattern, disallowed = _FORM_RULES[form]
    if len(full) <= limit and pattern.match(full):
        return full
    tail = f"-{hashlib.sha256(full.encode()).hexdigest()[:NAME_HASH_CHARS]}" + (f"-{suffix}" if suffix else "")
    clean = base if form == "label-value" else base.lower()
    clean = re.sub(disallowed, "-", clean)
    if form == "dns1035" and not clean[:1].isalpha():
        clean = "n" + clean  # a Service name must start with a letter
    head = re.sub(r"^[^A-Za-z0-9]+", "", clean[:limit - len(tail)]).rstrip("-._")
    if form == "dns1035" and not head[:1].isalpha():
        head = "n"
    return f"{head}{tail}" if head else tail[1:]


def child_name(owner: str, suffix: str, limit: int = 63, form: NameForm = "subdomain") -> str:
    """`<owner>-<suffix>` as a child's object name (`bounded_name`): a DNS subdomain by default, `limit` 63 where
    the name also becomes a label value (a Job's pods carry their Job's name) or a DNS label."""
    return bounded_name(owner, suffix, limit, form)


def label_value(value: str) -> str:
    """`value` (an object name, up to 253 characters) as a label value: itself when it fits 63 characters,
    else shortened with a hash (`bounded_name`). Selecting by such a label: compare with label_value(name)."""
    return bounded_name(value, "", 63, "label-value")


def pvc_volume_name(claim: str) -> str:
    """The pod volume name of PVC `claim`: `pvc-<claim>` when that is a DNS label (volume names are), else made
    one (dots replaced, shortened) with a hash of the claim, so `my.claim` and `my-claim` stay two volumes."""
    return bounded_name(f"pvc-{claim}", "", 63, "label")


def owner_reference(owner: Resource, controller: bool = True) -> dict[str, Any]:
    """An ownerReference to `owner` (a controller one unless `controller` is False; blockOwnerDeletion), so
    Kubernetes garbage-collects the child with its owner; the uid is a placeholder until the API server assigns one."""
    return {
        "apiVersion": owner.api_version,
        "kind": owner.kind,
        "name": owner.metadata.name,
        "uid": owner.metadata.uid or UNKNOWN_UID,
        "controller": controller,
        "blockOwnerDeletion": True,
    }


def base_labels(owner: Resource, component: str) -> dict[str, str]:
    """The app.kubernetes.io/{name,instance,component,managed-by} labels every child carries."""
    return {
        "app.kubernetes.io/name": "loraplane",
        "app.kubernetes.io/instance": label_value(owner.metadata.name or ""),
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGER,
    }


def namespace_of(owner: Resource, default: str = "default") -> str:
    """The owner's namespace, or `default` when it has none (a file rendered without one)."""
    return owner.metadata.namespace or default


def metadata(owner: Resource, name: str, labels: dict[str, str], annotations: dict[str, str] | None = None,
             namespace: str | None = None) -> dict[str, Any]:
    """A child's metadata: name, the owner's namespace unless `namespace` is given, sorted labels and
    annotations, and a controller ownerReference to `owner`."""
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace or namespace_of(owner),
        "labels": dict(sorted(labels.items())),
        "ownerReferences": [owner_reference(owner)],
    }
    if annotations:
        meta["annotations"] = dict(sorted(annotations.items()))
    return meta


def spec_hash(manifest: Manifest) -> str:
    """The first 16 hex digits of the sha256 of the manifest without its own hash annotation, over canonical
    JSON (sorted keys, compact, UTF-8; orjson: hashing every rendered child was ~6% of the operator's CPU with
    the standard library's encoder). `manifest` is not changed."""
    meta = dict(manifest.get("metadata") or {})
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != HASH_ANNOTATION}
    if annotations:
        meta["annotations"] = annotations
    else:
        meta.pop("annotations", None)
    body = {**manifest, "metadata": meta} if "metadata" in manifest else manifest
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def with_hash(manifest: Manifest) -> Manifest:
    """Stamp the manifest with the hash of its content (what the operator compares before writing)."""
    digest = spec_hash(manifest)
    manifest.setdefault("metadata", {}).setdefault("annotations", {})[HASH_ANNOTATION] = digest
    manifest["metadata"]["annotations"] = dict(sorted(manifest["metadata"]["annotations"].items()))
    return manifest


def quantity(value: int | float | str) -> str:
    """A quantity as a string: server-side apply (typed patches) rejects bare numbers for quantities."""
    return str(value)


def stringify_quantities(container: dict[str, Any]) -> dict[str, Any]:
    """The container with its resource requests/limits as strings (see `quantity`)."""
    res = container.get("resources")
    if res:
        container = {**container, "resources": {
            part: {k: quantity(v) for k, v in values.items()} for part, values in res.items()}}
    return container


def pvc_claims(*uris: str | None) -> list[str]:
    """The PVC claims named by pvc://CLAIM/PATH URIs, deduplicated in order (malformed URIs name none: the
    loader reports them for their adapter)."""
    claims: list[str] = []
    for uri in uris:
        parsed = try_parse_uri(uri)
        claim = parsed.pvc_claim if parsed else None
        if claim and claim not in claims:
            claims.append(claim)
    return claims


def secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    """An env var `name` from key `key` of Secret `secret`, optional (a missing key leaves it unset, so a Secret
    holding only some credentials still starts the pod)."""
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}


def resources(gpus: int, gpu_resource: str, cpu: Any, memory: Any) -> dict[str, Any]:
    """Requests/limits: GPUs as limits (extended resources), CPU as a request, memory as request and limit."""
    limits: dict[str, Any] = {}
    requests: dict[str, Any] = {}
    if gpus:
        limits[gpu_resource] = quantity(gpus)
    if cpu is not None:
        requests["cpu"] = quantity(cpu)
    if memory is not None:
        requests["memory"] = limits["memory"] = quantity(memory)
    out: dict[str, Any] = {}
    if limits:
        out["limits"] = limits
    if requests:
        out["requests"] = requests
    return out


def node_placement(node_selector: dict[str, str], gpu_type: str | None, gpu_type_label: str,
                   tolerations: list[Any]) -> dict[str, Any]:
    """Pod-spec nodeSelector (the GPU type as one more label) and tolerations; keys only when set."""
    selector = dict(node_selector)
    if gpu_type:
        selector[gpu_type_label] = gpu_type
    out: dict[str, Any] = {}
    if selector:
        out["nodeSelector"] = dict(sorted(selector.items()))
    if tolerations:
        out["tolerations"] = [dict(t) for t in tolerations]
    return out


# ---- Pod Security `restricted` (docs/security.md, "Engine pods and network") ----------------------------------
# The UID and GID of loraplane's images (images/*/Dockerfile `USER 65532:65532`); vLLM's image runs as root by
# default, so its pods set the same UID rather than only runAsNonRoot (which would refuse a root image).
POD_UID = 65532
# Every container's writable scratch directory (the root filesystem is read-only): HOME and TMPDIR point here.
SCRATCH_PATH = "/tmp"


def pod_security_context() -> dict[str, Any]:
    """The pod-level securityContext of every pod the operator creates: non-root POD_UID/GID, fsGroup so
    the pod's volumes are writable by that group (changed only when the volume root does not match, so a large
    PVC is not walked on every start), and the runtime's default seccomp profile."""
    return {"runAsNonRoot": True, "runAsUser": POD_UID, "runAsGroup": POD_UID, "fsGroup": POD_UID,
            "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context() -> dict[str, Any]:
    """Each container's securityContext under Pod Security `restricted`: no privilege escalation, no
    capabilities, non-root, RuntimeDefault seccomp, and a read-only root filesystem (writable paths are
    emptyDir volumes, e.g. `scratch_volume`)."""
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def scratch_volume(name: str, size_limit: str = "1Gi") -> dict[str, Any]:
    """An emptyDir for a container's SCRATCH_PATH (bounded: it counts against the node's ephemeral storage)."""
    return {"name": name, "emptyDir": {"sizeLimit": size_limit}}


def scratch_mount(name: str) -> dict[str, Any]:
    """The mount of `scratch_volume(name)` at SCRATCH_PATH."""
    return {"name": name, "mountPath": SCRATCH_PATH}


# The variables scratch_env sets; a local run (loraplane.local) keeps its own instead.
SCRATCH_ENV = ("HOME", "TMPDIR")


def scratch_env() -> list[dict[str, Any]]:
    """HOME and TMPDIR on the scratch volume: libraries write caches under HOME (~/.cache, ~/.triton)."""
    return [{"name": name, "value": SCRATCH_PATH} for name in SCRATCH_ENV]


def role(owner: Resource, name: str, labels: dict[str, str], rules: list[dict[str, Any]]) -> Manifest:
    """A namespaced RBAC Role with `rules`, owned by `owner`, stamped with its hash."""
    return with_hash({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                      "metadata": metadata(owner, name, labels), "rules": rules})


def service_account(owner: Resource, name: str, labels: dict[str, str]) -> Manifest:
    """A ServiceAccount owned by `owner`, stamped with its hash."""
    # No API token unless a pod asks for one: only the pods that talk to the API mount it.
    return with_hash({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata(owner, name, labels)})


def role_binding(owner: Resource, name: str, labels: dict[str, str], role_name: str,
                 service_account_name: str) -> Manifest:
    """A RoleBinding of Role `role_name` to ServiceAccount `service_account_name` in the owner's namespace."""
    return with_hash({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": metadata(owner, name, labels),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role_name},
        "subjects": [{"kind": "ServiceAccount", "name": service_account_name,
                      "namespace": namespace_of(owner)}],
    })


# ---- pod settings: chart childPods defaults + a kind's override (api/pods.py) --------------------------------
# Metadata keys Kubernetes' own controllers put on the pods the operator's Jobs and Deployments create: a pod
# setting naming one would fight them (a Job refuses a template that sets its selector labels).
KUBERNETES_POD_KEYS = frozenset({
    "job-name", "controller-uid", "batch.kubernetes.io/job-name", "batch.kubernetes.io/controller-uid",
    "batch.kubernetes.io/job-completion-index", "pod-template-hash",
})


def _dedupe(items: list[Any]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


def merged_pod_settings(defaults: PodSettings, override: PodSettings | None) -> PodSettings:
    """The chart's `defaults` with a kind's `override` over them: pull secrets and tolerations add up (duplicates
    dropped), labels, annotations and nodeSelector merge key by key (override wins), security contexts merge field
    by field (capabilities.add/drop add up), priorityClassName, runtimeClassName and affinity are replaced."""
    if override is None:
        return defaults

    def context(base: Any, over: Any) -> Any:
        if base is None or over is None:
            return over if base is None else base
        fields = {**base.model_dump(exclude_unset=True), **over.model_dump(exclude_unset=True)}
        if getattr(base, "capabilities", None) and getattr(over, "capabilities", None):
            fields["capabilities"] = {"add": _dedupe([*base.capabilities.add, *over.capabilities.add]),
                                      "drop": _dedupe([*base.capabilities.drop, *over.capabilities.drop])}
        return type(base).model_validate(fields)

    return PodSettings(
        image_pull_secrets=_dedupe([*defaults.image_pull_secrets, *override.image_pull_secrets]),
        security_context=context(defaults.security_context, override.security_context),
        container_security_context=context(defaults.container_security_context,
                                           override.container_security_context),
        priority_class_name=override.priority_class_name or defaults.priority_class_name,
        runtime_class_name=override.runtime_class_name or defaults.runtime_class_name,
        labels={**defaults.labels, **override.labels},
        annotations={**defaults.annotations, **override.annotations},
        node_selector={**defaults.node_selector, **override.node_selector},
        tolerations=_dedupe([*defaults.tolerations, *override.tolerations]),
        affinity=override.affinity if override.affinity is not None else defaults.affinity,
    )


def component_pod_defaults(child_pods: PodSettings, component: PodComponent) -> PodSettings:
    """The chart's childPods for one component's pods: the shared settings with `childPods.<component>` over them
    (merged_pod_settings' rules). A plain PodSettings (no component entries) applies to every component."""
    if not isinstance(child_pods, ChildPodSettings):
        return child_pods
    return merged_pod_settings(child_pods.shared(), getattr(child_pods, component))


def _wire(model: Any) -> dict[str, Any]:
    return model.model_dump(by_alias=True, exclude_none=True, exclude_unset=True, mode="json") if model else {}


def apply_pod_settings(template: dict[str, Any], defaults: PodSettings, override: PodSettings | None) -> None:
    """Put the merged pod settings (`merged_pod_settings`) into a pod `template` ({metadata, spec}) the builder
    made, in place. The operator's own choices win where they meet: its labels and annotations, the nodeSelector
    keys and tolerations the kind's resources fields ask for, and the restricted security context's
    non-negotiable parts (capabilities drop ALL stays; the policy refuses a loosening override before this runs,
    builders/policy.py). Containers and init containers all get the container security context."""
    s = merged_pod_settings(defaults, override)
    meta, spec = template.setdefault("metadata", {}), template["spec"]
    if s.labels:
        meta["labels"] = dict(sorted({**s.labels, **meta.get("labels", {})}.items()))
    if s.annotations:
        meta["annotations"] = dict(sorted({**s.annotations, **(meta.get("annotations") or {})}.items()))
    if s.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": r.name} for r in s.image_pull_secrets]
    if s.priority_class_name:
        spec["priorityClassName"] = s.priority_class_name
    if s.runtime_class_name:
        spec["runtimeClassName"] = s.runtime_class_name
    if s.node_selector:
        spec["nodeSelector"] = dict(sorted({**s.node_selector, **spec.get("nodeSelector", {})}.items()))
    if s.tolerations:
        spec["tolerations"] = _dedupe([*spec.get("tolerations", []), *(dict(t) for t in s.tolerations)])
    if s.affinity is not None:
        spec["affinity"] = dict(s.affinity)
    if s.security_context is not None:
        spec["securityContext"] = {**spec.get("securityContext", {}), **_wire(s.security_context)}
        # A container's own profile wins over the pod's: the operator's RuntimeDefault on each container would
        # silently void a pod-level Localhost profile, so it is dropped where the pod names one (the pod's then
        # applies to every container, which Pod Security `restricted` accepts).
        if s.security_context.seccomp_profile is not None:
            for container in [*spec.get("containers", []), *spec.get("initContainers", [])]:
                container.get("securityContext", {}).pop("seccompProfile", None)
    if (csc := _wire(s.container_security_context)):
        caps = csc.pop("capabilities", {})
        for container in [*spec.get("containers", []), *spec.get("initContainers", [])]:
            current = container.get("securityContext", {})
            merged = {**current, **csc}
            drop = _dedupe([*(current.get("capabilities") or {}).get("drop", []), *caps.get("drop", [])])
            merged["capabilities"] = {**({"add": caps["add"]} if caps.get("add") else {}), "drop": drop}
            container["securityContext"] = merged
