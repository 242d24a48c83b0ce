"""Every pod the operator creates runs under Pod Security `restricted` (issue 12): the trainer Job's pod, the
engine pod (vLLM, the adapter loader, the model-fetch init container) and the router pod, checked with the
standard's checks (support/pod_security.py: why a port of upstream's checks, not upstream's code), and with a
read-only root filesystem whose writable paths are volumes."""

from __future__ import annotations

import copy

import pytest

import yaml

from loraplane.api import KINDS, FineTuneJob, ModelRoute, parse
from loraplane.builders import BuildSettings, render
from support.examples import EXAMPLES
from support.pod_security import RESTRICTED, violations


def pod_templates(manifests: list[dict]) -> list[tuple[str, dict]]:
    """(owner kind/name, pod template) of every Job and Deployment."""
    return [(f"{m['kind']}/{m['metadata']['name']}", m["spec"]["template"])
            for m in manifests if m["kind"] in ("Job", "Deployment")]


def every_pod_kind() -> list[tuple[str, dict]]:
    """The examples plus variants that add containers and volumes: a multi-node trainer with PVC data, an s3://
    base model (fetch-model init container), adapters from a PVC and with credentials, a router API key."""
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
