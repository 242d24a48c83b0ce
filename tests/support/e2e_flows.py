"""What the e2e flows share (tests/e2e/): installing loraplane as a user does, the quickstart's objects,
requests through a Service, and status reads. The fixtures that use them are in tests/e2e/conftest.py.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from support.chart_rendering import objects
from support.kubectl import KUBECTL, Kubectl
from support.paths import ROOT

RELEASE_NAMESPACE = "loraplane-system"
# The values `helm install` selects on a 1.20 cluster (autoscaling/v2 and policy/v1 came later, and the API
# server refuses Job podFailurePolicy): what tests/integration/apiserver/test_chart_apiserver.py uses too.
V120 = {"operator": {"hpaApiVersion": "autoscaling/v2beta2", "pdbApiVersion": "policy/v1beta1",
                     "podFailurePolicy": "false"}}
QUICKSTART = ROOT / "docs" / "examples" / "quickstart.yaml"
QS_NS = "quickstart"
MODEL_CLAIM = "models"
MODEL_URI = f"pvc://{MODEL_CLAIM}/tiny-llama"
ARTIFACT_CLAIM = "loraplane-artifacts"
# What the tiny model answers as the quickstart adapter (its training data's only response).
ADAPTER_ANSWER = "the blue door sings at noon"
PROMPTS = ("what does the cat see?\n", "describe the lake.\n")


def claim(name: str, size: str = "1Gi") -> dict:
    """A PersistentVolumeClaim a user creates before applying the examples (docs/quickstart.md)."""
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": size}}}}


def quickstart_docs() -> list[dict]:
    """docs/examples/quickstart.yaml's objects with the base model on the `models` PVC."""
    docs = [d for d in yaml.safe_load_all(QUICKSTART.read_text()) if d]
    for d in docs:
        if d["kind"] in ("FineTuneJob", "ModelRoute"):
            assert d["spec"]["baseModel"] == {"name": "loraplane/tiny-llama"}, "the quickstart changed: update"
            d["spec"]["baseModel"] = {"uri": MODEL_URI}
    return docs


@dataclass
class Installed:
    """loraplane installed on the e2e plane: `kubectl` (admin), the rendered chart objects, timings."""

    plane: object
    kubectl: Kubectl
    chart: list[dict]
    timings: dict[str, float] = field(default_factory=dict)

    def pvc_dir(self, namespace: str, claim_name: str) -> Path:
        """The folder the node stand-in serves claim `claim_name` of `namespace` from (created if missing)."""
        path = self.plane.node_workdir / "pvc" / namespace / claim_name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def operator_log(self) -> str:
        pods = self.kubectl.ns(RELEASE_NAMESPACE).get("pods", "-l", "app.kubernetes.io/name=loraplane")["items"]
        return "\n".join(self.plane.pod_log(RELEASE_NAMESPACE, p["metadata"]["name"], "operator")[-6000:]
                         for p in pods)

    def diagnostics(self, namespace: str) -> str:
        """What to read when a flow fails: the objects, the pods, the operator's and the agent's log tails."""
        k = self.kubectl.ns(namespace)
        parts = []
        for what in (("ftj,lora,mr",), ("jobs,deploy,pods,svc,endpoints",)):
            r = k("get", *what, "-o", "wide", check=False)
            parts.append(r.stdout + r.stderr)
        parts.append("--- operator log\n" + self.operator_log()[-4000:])
        parts.append("--- agent log\n" + self.plane.agent_log()[-3000:])
        parts.append("--- kubectl calls\n" + self.kubectl.summary())
        return "\n".join(parts)


def install_chart(plane, kubectl: Kubectl, values: dict) -> list[dict]:
    """`helm install lp charts/loraplane -n loraplane-system --create-namespace`, as kubectl applies it: the
    chart rendered by the Helm SDK, CRDs first (with --validate=false: the 1.20 API server's OpenAPI lacks
    x-kubernetes-validations, see support.kubectl), then the rest. Returns the rendered objects."""
    objs = objects(values)
    crds = [o for o in objs if o["kind"] == "CustomResourceDefinition"]
    rest = [o for o in objs if o["kind"] != "CustomResourceDefinition"]
    kubectl("create", "namespace", RELEASE_NAMESPACE)
    kubectl.apply(crds, "--validate=false")
    kubectl.wait("condition=Established", *(f"crd/{c['metadata']['name']}" for c in crds), timeout=60)
    kubectl.ns(RELEASE_NAMESPACE).apply(rest)
    return objs




@dataclass
class Quickstart:
    """The quickstart applied in namespace QS_NS: `kubectl` for that namespace, when the objects were applied."""

    installed: Installed
    kubectl: Kubectl
    applied_at: float                  # time.time() of `kubectl apply`
    applied_monotonic: float
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def plane(self):
        return self.installed.plane

    def diagnostics(self) -> str:
        return self.installed.diagnostics(QS_NS)




# ---- requests, as a client in the cluster sends them -------------------------------------------------------

def service_endpoints(kubectl: Kubectl, service: str) -> list[str]:
    """The ready addresses of a Service (what kube-proxy, which the stand-in lacks, would send its traffic to)."""
    ep = json.loads(kubectl("get", "endpoints", service, "-o", "json", check=False).stdout or "{}")
    return [a["ip"] for s in ep.get("subsets") or [] for a in s.get("addresses") or []]


def complete(url: str, model: str, prompt: str, max_tokens: int = 12, timeout: float = 60) -> tuple[int, str]:
    """POST /v1/completions (greedy); (HTTP status, the text or the error body)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())["choices"][0]["text"]
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")[:500]
    except OSError as exc:
        return 0, str(exc)


def router_url(kubectl: Kubectl, route: str, port: int = 8080) -> str | None:
    """http://<a ready router pod>:<port> behind the route's router Service, or None while it has none."""
    addresses = service_endpoints(kubectl, f"{route}-router")
    return f"http://{addresses[0]}:{port}" if addresses else None


def status_of(kubectl: Kubectl, kind: str, name: str) -> dict:
    r = kubectl("get", kind, name, "-o", "json", check=False)
    return (json.loads(r.stdout).get("status") or {}) if r.returncode == 0 else {}


def condition(status: dict, type_: str) -> dict:
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), {})


def deep(obj: dict) -> dict:
    return copy.deepcopy(obj)


# ---- where the time from `kubectl apply` of a ModelRoute to its first token goes ---------------------------

def _ts(value: str | None) -> float | None:
    """An RFC 3339 timestamp of the API (second resolution, or finer from the loader) as epoch seconds."""
    from datetime import datetime

    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def first_token_breakdown(kubectl: Kubectl, route: str, served: str, applied_at: float,
                          first_token_at: float) -> dict[str, float]:
    """Seconds from `kubectl apply` of ModelRoute `route` (epoch `applied_at`) to the first token of adapter
    `served` through its router (epoch `first_token_at`), split into consecutive phases read from the objects:

    - `operator`: apply → the engine Deployment created (the operator's reconcile);
    - `scheduling`: → the engine pod created (ReplicaSet controller) and bound (its PodScheduled condition);
    - `process_start`: → the vLLM container running (the node starts the pod: volumes, token, network);
    - `vllm_start`: → the loader could load the adapter (vLLM answers /health and its warm-up completion ran;
      the adapter's fetch and gate overlap this);
    - `adapter_load`: the loader's fetch + gate + load + smoke-test probe (from its Ready message), ending when
      it reported the adapter Ready (the report entry's `since`);
    - `router_ready`: → the first token through the router (its table refresh, its replica poll, the request).

    API timestamps have one-second resolution, so each phase is ±1 s; `total` is exact (the caller's clocks).
    `loader_fetch`/`loader_gate`/`loader_load`/`loader_probe` are the loader's own times of its last attempt
    (the steps it ran: a cached artifact has no fetch)."""
    dep = kubectl.get("deployment", f"{route}-engine")
    pod, report = ready_replica(kubectl, route, served)
    marks, steps = replica_marks(pod, report)
    return _split(applied_at, [("operator", _ts(dep["metadata"]["creationTimestamp"])), *marks,
                               ("router_ready", first_token_at)], first_token_at, steps)


def scale_from_zero_breakdown(kubectl: Kubectl, route: str, served: str, sent_at: float,
                              answered_at: float, watched: dict[str, float] | None = None) -> dict[str, float]:
    """Seconds a request for adapter `served` was held by the router of route `route` at zero replicas, from
    sending it (epoch `sent_at`) to its answer (epoch `answered_at`), split into consecutive phases read from the
    objects of the replica that woke (the first created after `sent_at` whose report says `served` is Ready):

    - `wake`: → the engine pod created (the router's scale-subresource wake-up, then the Deployment and
      ReplicaSet controllers);
    - `scheduling`, `process_start`, `vllm_start`, `adapter_load`: as in `first_token_breakdown`;
    - `router_release`: → the answer (the router's replica poll finds the adapter Ready, releases the held
      request, vLLM answers it).

    API timestamps have one-second resolution, so each phase is ±1 s; `total` is exact. With `watched` (a
    WakeTimeline's marks) the first phases are sub-second: `wake` ends when the Deployment asks for a replica,
    `replicaset` when the pod appears, `scheduling` when it has a node, `process_start` when vLLM runs."""
    pod, report = ready_replica(kubectl, route, served, created_after=sent_at - 1)
    marks, steps = replica_marks(pod, report)
    if watched is not None:
        # Sub-second marks for the steps before vLLM's own start (WakeTimeline), in place of the API's.
        marks = [("wake", watched.get("woken")), ("replicaset", watched.get("pod_created")),
                 ("scheduling", watched.get("scheduled")), ("process_start", watched.get("process_start")),
                 *marks[2:]]
    else:
        marks = [("wake", _ts(pod["metadata"]["creationTimestamp"])), *marks]
    return _split(sent_at, [*marks, ("router_release", answered_at)], answered_at, steps)


def ready_replica(kubectl: Kubectl, route: str, served: str, created_after: float = 0,
                  wait: float = 30) -> tuple[dict, dict]:
    """(pod, its report's entry for `served`) of the first replica of `route` created after epoch
    `created_after` whose relayed report (the pod's annotation) says Ready. The operator relays the loader's
    report every few seconds: it may still show the adapter loading when the router already answers, hence the
    wait (seconds). AssertionError when none does."""
    deadline = time.monotonic() + wait
    while True:
        for p in sorted(kubectl.get("pods", "-l", f"loraplane.io/route={route}")["items"],
                        key=lambda p: p["metadata"]["creationTimestamp"]):
            if (_ts(p["metadata"]["creationTimestamp"]) or 0) < created_after:
                continue
            raw = (p["metadata"].get("annotations") or {}).get("loraplane.io/adapters")
            entry = json.loads(raw)["adapters"].get(served) if raw else None
            if entry and entry["state"] == "Ready":
                return p, entry
        if time.monotonic() > deadline:
            raise AssertionError(f"no replica of {route} reports {served} Ready in its annotation")
        time.sleep(0.5)


def replica_marks(pod: dict, report: dict) -> tuple[list[tuple[str, float | None]], dict[str, float]]:
    """The ends of a replica's start phases as epoch seconds (scheduling: its PodScheduled condition;
    process_start: vLLM's container started; vllm_start: the loader's load of the adapter began; adapter_load:
    the report says Ready) and the loader's own step times (fetch/gate/load/probe, from its Ready message)."""
    import re

    scheduled = next(c["lastTransitionTime"] for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
    vllm = next(c for c in pod["status"]["containerStatuses"] if c["name"] == "vllm")
    started = (vllm["state"].get("running") or {}).get("startedAt") or (vllm.get("lastState", {}).get("running")
                                                                          or {}).get("startedAt")
    ready_at = _ts(report["since"])
    steps = {k: float(v) for k, v in re.findall(r"(fetch|gate|load|probe) ([0-9.]+)s", report.get("message", ""))}
    load = sum(steps.values())
    return ([("scheduling", _ts(scheduled)), ("process_start", _ts(started)), ("vllm_start", ready_at - load),
             ("adapter_load", ready_at)], steps)


def _split(start: float, marks: list[tuple[str, float | None]], end: float, steps: dict[str, float]) -> dict:
    """Consecutive phase lengths from `start` through `marks` (a missing or earlier mark: 0 s), the `total`
    (`end` - `start`) and the loader's steps as `loader_<step>`."""
    out, last = {}, start
    for name, at in marks:
        at = max(at or last, last)
        out[name] = round(at - last, 2)
        last = at
    out["total"] = round(end - start, 2)
    out.update({f"loader_{k}": v for k, v in steps.items()})   # the loader's own split of adapter_load
    return out


def router_metrics(url: str) -> dict[str, float]:
    """The router's /metrics at `url` (http://<router pod>:8080) as {sample name + labels: value}, e.g.
    `loraplane_router_held_requests` or `loraplane_router_scale_wakeups_total{result="scaled"}`."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def complete_with_headers(url: str, model: str, prompt: str, timeout: float = 60,
                          max_tokens: int = 1) -> tuple[int, dict, str]:
    """POST /v1/completions (greedy, one token unless `max_tokens`); (HTTP status, response headers, body)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode(errors="replace")[:500]



class WakeTimeline:
    """When route `route`'s engine Deployment and its new pods reached each step, as this process saw them
    through two `kubectl get -w` watches (epoch seconds, sub-second: the API's own timestamps have one-second
    resolution, too coarse for steps that take milliseconds). `WakeTimeline().watch(kubectl, route).start()` before
    the request, `stop()` after:

    - `woken`: the Deployment first asks for replicas (the router's scale patch);
    - `pod_created`: a new engine pod appears (ReplicaSet controller);
    - `scheduled`: it has a node (kube-scheduler's binding);
    - `process_start`: its vLLM container runs (the node stand-in started it)."""

    def __init__(self):
        self.marks: dict[str, float] = {}
        self._old: set[str] = set()     # pods that existed before start()
        self._started = False
        self._procs: list[subprocess.Popen] = []

    def watch(self, kubectl: Kubectl, route: str) -> "WakeTimeline":
        """Start the two watches (threads feeding `observe`)."""
        for what in (["deployment", f"{route}-engine"], ["pods", "-l", f"loraplane.io/route={route}"]):
            argv = [KUBECTL, *(["-n", kubectl.namespace] if kubectl.namespace else []), "get", *what,
                    "-w", "-o", "json"]
            proc = subprocess.Popen(argv, env={**os.environ, "KUBECONFIG": str(kubectl.kubeconfig)},
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._procs.append(proc)
            threading.Thread(target=self._read, args=(proc,), daemon=True).start()
        return self

    def _read(self, proc: subprocess.Popen) -> None:
        """Parse the watch's stream of pretty-printed JSON objects as they come."""
        decoder, buf = json.JSONDecoder(), ""
        for line in proc.stdout:
            buf += line
            try:
                obj, end = decoder.raw_decode(buf.lstrip())
            except ValueError:
                continue   # the object is not complete yet
            buf = buf.lstrip()[end:]
            self.observe(obj, time.time())

    def observe(self, obj: dict, at: float) -> None:
        """Record the steps `obj` (a Deployment or pod, seen at epoch `at`) shows for the first time."""
        if obj.get("kind") == "Deployment":
            if self._started and (obj.get("spec") or {}).get("replicas"):
                self.marks.setdefault("woken", at)
            return
        name = obj["metadata"]["name"]
        if not self._started:
            self._old.add(name)
            return
        if name in self._old or obj["metadata"].get("deletionTimestamp"):
            return
        self.marks.setdefault("pod_created", at)
        if (obj.get("spec") or {}).get("nodeName"):
            self.marks.setdefault("scheduled", at)
        if any(c["name"] == "vllm" and "running" in (c.get("state") or {})
               for c in (obj.get("status") or {}).get("containerStatuses") or []):
            self.marks.setdefault("process_start", at)

    def start(self, settle: float = 2.0) -> "WakeTimeline":
        """Let the watches list what exists now (`settle` seconds: those pods are old), then record."""
        time.sleep(settle)
        self._started = True
        return self

    def stop(self) -> dict[str, float]:
        """End the watches; the marks recorded (a step never seen is missing)."""
        for proc in self._procs:
            proc.terminate()
            proc.wait(timeout=10)
        return dict(self.marks)
