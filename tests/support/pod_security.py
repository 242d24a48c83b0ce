"""The Kubernetes Pod Security Standards, `baseline` and `restricted` levels at version `latest`, as checks over a
pod spec: what the PodSecurity admission controller (k8s.io/pod-security-admission, package policy) enforces.

Why a port and not the upstream code: nothing that runs upstream's checks is available offline here. The Go module
proxy is unreachable (and the machine's Go 1.19 is older than the module requires), the test kube-apiserver is
v1.20 (PodSecurity admission arrived in 1.22), and no PyPI package wraps the Go library (the PyPI tools that
exist, e.g. checkov, implement their own rule sets, not the standard). So each check below follows one upstream
check, named by its upstream ID (policy/check_<ID>.go), with the fields and allowed values of the published
standard (kubernetes.io/docs/concepts/security/pod-security-standards). `tests/unit/builders/test_pod_security.py`
shows each check refusing a pod that breaks it, so a check cannot pass vacuously.

`violations(pod_spec, pod_metadata)` returns "<check ID>: <what>" for each check the pod fails; [] = allowed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

Pod = dict[str, Any]
Check = Callable[[Pod, dict], list[str]]

BASELINE_CAPABILITIES = frozenset({"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                                   "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"})
SAFE_SYSCTLS = frozenset({"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
                          "net.ipv4.ip_unprivileged_port_start",
                          "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                          "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                          "net.ipv4.tcp_keepalive_probes", "net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"})
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
RESTRICTED_VOLUME_SOURCES = frozenset({"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                                       "persistentVolumeClaim", "projected", "secret"})
SECCOMP_RESTRICTED = frozenset({"RuntimeDefault", "Localhost"})


def containers(pod: Pod) -> Iterator[dict]:
    """Containers, init containers and ephemeral containers (upstream visitContainers)."""
    for key in ("initContainers", "containers", "ephemeralContainers"):
        yield from pod.get(key) or []


def _sc(obj: dict) -> dict:
    return obj.get("securityContext") or {}


# ---- baseline ----------------------------------------------------------------------------------------------

def host_namespaces(pod: Pod, meta: dict) -> list[str]:
    return [f"{k}=true" for k in ("hostNetwork", "hostPID", "hostIPC") if pod.get(k)]


def privileged(pod: Pod, meta: dict) -> list[str]:
    return [f"container {c['name']} privileged" for c in containers(pod) if _sc(c).get("privileged")]


def capabilities_baseline(pod: Pod, meta: dict) -> list[str]:
    return [f"container {c['name']} adds {cap}" for c in containers(pod)
            for cap in (_sc(c).get("capabilities") or {}).get("add") or [] if cap not in BASELINE_CAPABILITIES]


def host_path_volumes(pod: Pod, meta: dict) -> list[str]:
    return [f"volume {v['name']} is hostPath" for v in pod.get("volumes") or [] if "hostPath" in v]


def host_ports(pod: Pod, meta: dict) -> list[str]:
    return [f"container {c['name']} hostPort {p['hostPort']}" for c in containers(pod)
            for p in c.get("ports") or [] if p.get("hostPort")]


def app_armor_profile(pod: Pod, meta: dict) -> list[str]:
    bad = []
    for owner, sc in [("pod", _sc(pod)), *((f"container {c['name']}", _sc(c)) for c in containers(pod))]:
        kind = (sc.get("appArmorProfile") or {}).get("type")
        if kind not in (None, "RuntimeDefault", "Localhost"):
            bad.append(f"{owner} appArmorProfile {kind}")
    for key, value in (meta.get("annotations") or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
                value == "runtime/default" or value.startswith("localhost/")):
            bad.append(f"annotation {key}={value}")
    return bad


def se_linux_options(pod: Pod, meta: dict) -> list[str]:
    bad = []
    for owner, sc in [("pod", _sc(pod)), *((f"container {c['name']}", _sc(c)) for c in containers(pod))]:
        opts = sc.get("seLinuxOptions") or {}
        if opts.get("type", "") not in SELINUX_TYPES or opts.get("user") or opts.get("role"):
            bad.append(f"{owner} seLinuxOptions {opts}")
    return bad


def proc_mount(pod: Pod, meta: dict) -> list[str]:
    return [f"container {c['name']} procMount {_sc(c)['procMount']}" for c in containers(pod)
            if _sc(c).get("procMount") not in (None, "Default")]


def seccomp_profile_baseline(pod: Pod, meta: dict) -> list[str]:
    bad = []
    for owner, sc in [("pod", _sc(pod)), *((f"container {c['name']}", _sc(c)) for c in containers(pod))]:
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            bad.append(f"{owner} seccompProfile Unconfined")
    return bad


def sysctls(pod: Pod, meta: dict) -> list[str]:
    return [f"sysctl {s.get('name')}" for s in _sc(pod).get("sysctls") or [] if s.get("name") not in SAFE_SYSCTLS]


def windows_host_process(pod: Pod, meta: dict) -> list[str]:
    owners = [("pod", _sc(pod)), *((f"container {c['name']}", _sc(c)) for c in containers(pod))]
    return [f"{owner} hostProcess" for owner, sc in owners if (sc.get("windowsOptions") or {}).get("hostProcess")]


# ---- restricted --------------------------------------------------------------------------------------------

def restricted_volumes(pod: Pod, meta: dict) -> list[str]:
    bad = []
    for v in pod.get("volumes") or []:
        sources = set(v) - {"name"}
        if not sources <= RESTRICTED_VOLUME_SOURCES:
            bad.append(f"volume {v['name']} uses {sorted(sources - RESTRICTED_VOLUME_SOURCES)}")
    return bad


def allow_privilege_escalation(pod: Pod, meta: dict) -> list[str]:
    # Must be set to false explicitly in every container (unset means allowed).
    return [f"container {c['name']} allowPrivilegeEscalation != false" for c in containers(pod)
            if _sc(c).get("allowPrivilegeEscalation") is not False]


def run_as_non_root(pod: Pod, meta: dict) -> list[str]:
    pod_value = _sc(pod).get("runAsNonRoot")
    bad = ["pod runAsNonRoot=false"] if pod_value is False else []
    for c in containers(pod):
        value = _sc(c).get("runAsNonRoot")
        if value is False or (value is None and pod_value is not True):
            bad.append(f"container {c['name']} runAsNonRoot != true")
    return bad


def run_as_user(pod: Pod, meta: dict) -> list[str]:
    owners = [("pod", _sc(pod)), *((f"container {c['name']}", _sc(c)) for c in containers(pod))]
    return [f"{owner} runAsUser=0" for owner, sc in owners if sc.get("runAsUser") == 0]


def seccomp_profile_restricted(pod: Pod, meta: dict) -> list[str]:
    pod_type = (_sc(pod).get("seccompProfile") or {}).get("type")
    bad = [f"pod seccompProfile {pod_type}"] if pod_type is not None and pod_type not in SECCOMP_RESTRICTED else []
    for c in containers(pod):
        kind = (_sc(c).get("seccompProfile") or {}).get("type")
        if kind is None and pod_type is None:
            bad.append(f"container {c['name']} has no seccompProfile (nor has the pod)")
        elif kind is not None and kind not in SECCOMP_RESTRICTED:
            bad.append(f"container {c['name']} seccompProfile {kind}")
    return bad


def capabilities_restricted(pod: Pod, meta: dict) -> list[str]:
    bad = []
    for c in containers(pod):
        caps = _sc(c).get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad.append(f"container {c['name']} does not drop ALL capabilities")
        bad += [f"container {c['name']} adds {cap}" for cap in caps.get("add") or [] if cap != "NET_BIND_SERVICE"]
    return bad


BASELINE: dict[str, Check] = {
    "hostNamespaces": host_namespaces, "privileged": privileged, "capabilities_baseline": capabilities_baseline,
    "hostPathVolumes": host_path_volumes, "hostPorts": host_ports, "appArmorProfile": app_armor_profile,
    "seLinuxOptions": se_linux_options, "procMount": proc_mount, "seccompProfile_baseline": seccomp_profile_baseline,
    "sysctls": sysctls, "windowsHostProcess": windows_host_process,
}
RESTRICTED: dict[str, Check] = {
    **BASELINE, "restrictedVolumes": restricted_volumes, "allowPrivilegeEscalation": allow_privilege_escalation,
    "runAsNonRoot": run_as_non_root, "runAsUser": run_as_user, "seccompProfile_restricted": seccomp_profile_restricted,
    "capabilities_restricted": capabilities_restricted,
}


def violations(pod_spec: Pod, pod_metadata: dict | None = None, level: dict[str, Check] = RESTRICTED) -> list[str]:
    """Every failed check of `level` (default restricted, which includes baseline) as "<check ID>: <what>"."""
    meta = pod_metadata or {}
    return [f"{check_id}: {what}" for check_id, check in level.items() for what in check(pod_spec, meta)]


def pod_templates(manifests: list[dict]) -> list[tuple[str, dict]]:
    """(owner kind/name, pod template) of every Job and Deployment."""
    return [(f"{m['kind']}/{m['metadata']['name']}", m["spec"]["template"])
            for m in manifests if m["kind"] in ("Job", "Deployment")]


def every_pod_kind() -> list[tuple[str, dict]]:
    """(owner kind/name, pod template) of every pod the builders render for docs/examples plus variants that add
    containers and volumes: a multi-node trainer with PVC data, an s3:// base model (fetch-model init
    container), adapters from a PVC and with credentials, a router API key. Shared by the port's check
    (tests/unit/builders/test_pod_security.py) and the admission check (test_pod_security_admission.py)."""
    import yaml

    from loraplane.api import KINDS, FineTuneJob, ModelRoute, parse
    from loraplane.builders import BuildSettings, render
    from support.examples import EXAMPLES

    ftj = FineTuneJob.model_validate({
        "apiVersion": "loraplane.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "t", "namespace": "ml"},
        "spec": {"baseModel": {"uri": "pvc://models/llama"}, "dataset": {"uri": "pvc://data/train.jsonl"},
                 "output": {"uri": "pvc://out/adapters", "adapterName": "t"}, "resources": {"gpus": 2, "nodes": 2}}})
    route = ModelRoute.model_validate({
        "apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute", "metadata": {"name": "r", "namespace": "ml"},
        "spec": {"baseModel": {"uri": "s3://bucket/llama", "credentialsSecretRef": {"name": "s3"}},
                 "router": {"apiKeySecretRef": {"name": "keys"}},
                 "routes": [{"name": "a", "backends": [{"adapter": "a", "weight": 100}]}]}})
    adapter = parse({"apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter",
                     "metadata": {"name": "a", "namespace": "ml"},
                     "spec": {"baseModel": {"name": "s3://bucket/llama"}, "rank": 8,
                              "source": {"uri": "pvc://adapters/a", "credentialsSecretRef": {"name": "creds"}}}})
    examples = [parse(d) for path in sorted(EXAMPLES.glob("*.yaml")) for d in yaml.safe_load_all(path.read_text())
                if d and d.get("kind") in KINDS]
    manifests = render([*examples, ftj, route, adapter], BuildSettings())
    return pod_templates(manifests)
