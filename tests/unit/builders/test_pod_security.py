"""Every pod the operator creates runs under Pod Security `restricted` (issue 12): the trainer Job's pod, the
engine pod (vLLM, the adapter loader, the model-fetch init container) and the router pod, checked with the
standard's checks (support/pod_security.py: why a port of upstream's checks, not upstream's code), and with a
read-only root filesystem whose writable paths are volumes."""

from __future__ import annotations

import copy

import pytest

from support.pod_security import RESTRICTED, every_pod_kind, violations


PODS = every_pod_kind()


def test_the_variants_cover_every_container_the_operator_creates():
    names = {c["name"] for _, t in PODS for key in ("containers", "initContainers") for c in t["spec"].get(key, [])}
    assert names >= {"trainer", "vllm", "adapter-loader", "model-fetch", "router"}


@pytest.mark.parametrize("owner,template", PODS, ids=[o for o, _ in PODS])
def test_every_pod_passes_pod_security_restricted(owner, template):
    assert violations(template["spec"], template.get("metadata")) == []


@pytest.mark.parametrize("owner,template", PODS, ids=[o for o, _ in PODS])
def test_every_container_has_a_read_only_root_and_volumes_for_what_it_writes(owner, template):
    spec = template["spec"]
    volumes = {v["name"] for v in spec["volumes"]}
    for c in [*spec["containers"], *spec.get("initContainers", [])]:
        assert c["securityContext"]["readOnlyRootFilesystem"] is True, c["name"]
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts and mounts["/tmp"] in volumes, c["name"]


BAD = {   # one pod per check that breaks it, so no check can pass vacuously
    "hostNamespaces": {"hostNetwork": True},
    "privileged": {"containers": [{"name": "c", "securityContext": {"privileged": True}}]},
    "capabilities_baseline": {"containers": [{"name": "c", "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}]},
    "hostPathVolumes": {"volumes": [{"name": "h", "hostPath": {"path": "/"}}]},
    "hostPorts": {"containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 80}]}]},
    "appArmorProfile": {"securityContext": {"appArmorProfile": {"type": "Unconfined"}}},
    "seLinuxOptions": {"securityContext": {"seLinuxOptions": {"type": "spc_t"}}},
    "procMount": {"containers": [{"name": "c", "securityContext": {"procMount": "Unmasked"}}]},
    "seccompProfile_baseline": {"securityContext": {"seccompProfile": {"type": "Unconfined"}}},
    "sysctls": {"securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "1"}]}},
    "windowsHostProcess": {"securityContext": {"windowsOptions": {"hostProcess": True}}},
    "restrictedVolumes": {"volumes": [{"name": "n", "nfs": {"server": "x", "path": "/"}}]},
    "allowPrivilegeEscalation": {"containers": [{"name": "c", "securityContext": {}}]},
    "runAsNonRoot": {"securityContext": {"runAsNonRoot": False}},
    "runAsUser": {"securityContext": {"runAsUser": 0}},
    "seccompProfile_restricted": {"securityContext": {"seccompProfile": None}},
    "capabilities_restricted": {"containers": [{"name": "c", "securityContext": {"capabilities": {"drop": ["NET_RAW"]}}}]},
}


@pytest.mark.parametrize("check", sorted(RESTRICTED))
def test_each_check_refuses_a_pod_that_breaks_it(check):
    owner, template = next(p for p in PODS if p[0].endswith("-engine"))
    spec = copy.deepcopy(template["spec"])
    bad = BAD[check]
    for key, value in bad.items():
        if key == "securityContext":
            spec["securityContext"] = {**spec["securityContext"], **value}
        elif key == "containers":     # the broken container's securityContext laid over vLLM's
            c = spec["containers"][0]
            c["securityContext"] = {**c["securityContext"], **value[0].get("securityContext", {})}
            c["ports"] = value[0].get("ports", c.get("ports"))
            if check == "allowPrivilegeEscalation":
                del c["securityContext"]["allowPrivilegeEscalation"]
        elif key == "volumes":
            spec["volumes"] = [*spec["volumes"], *value]
        else:
            spec[key] = value
    if check == "seccompProfile_restricted":   # neither the pod nor one container sets a profile
        del spec["securityContext"]["seccompProfile"]
        del spec["containers"][0]["securityContext"]["seccompProfile"]
    found = violations(spec)
    assert any(v.startswith(f"{check}: ") for v in found), found
