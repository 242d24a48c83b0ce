"""Benchmark: from `kubectl apply` of a ModelRoute to the first token from its adapter, on the e2e plane.

    flock /tmp/heavy.lock python tests/bench/bench_e2e.py [--rounds 1] [--scale-from-zero] [--json OUT]

On the control plane + kube-scheduler + node stand-in of tests/support/e2e.py (pods really run: vLLM CPU build,
loader, router, each in its own network namespace), with loraplane installed from the chart with kubectl and the
operator running as a pod (tests/support/e2e_flows.py). Per round, in a fresh namespace: the base model on a PVC,
an Adapter whose artifact is already on the artifact PVC (random LoRA weights of the tiny model's shapes: it
changes the output, which is all the smoke test needs; training is not measured here), then, timed:

    kubectl apply -f modelroute.yaml   →   the first token of the adapter's public model through the router

polled every 0.2 s with one-token greedy completions at the router Service's ready endpoint. The time is split
(`support.e2e_flows.first_token_breakdown`) into operator, scheduling, process start, vLLM start, adapter fetch +
gate + load + probe, and router ready, from the objects' timestamps (one-second resolution) and the loader's
report. The quickstart flow (tests/e2e/test_flows.py) prints the same split for the quickstart's route.

With `--scale-from-zero` (issue 16) the route is HPA-autoscaled (`autoscaling: {backend: hpa, minReplicas: 1,
maxReplicas: 2}`); after its first token it is parked at zero (`kubectl scale deploy/bench-engine --replicas=0`,
then no engine pod left and the router's poll sees none), and one more request is timed, held by the router until
the replica it wakes serves the adapter:

    request sent (held)   →   its answer

split (`support.e2e_flows.scale_from_zero_breakdown`) into wake (→ the router's scale-subresource patch),
replicaset (→ the pod created), scheduling, process start (these four from two `kubectl get -w` watches,
sub-second), vLLM start, adapter load and router release, with the router's own `loraplane_router_hold_seconds` for the request (`router_hold_s`). KEDA is
not here: a KEDA route adds one Prometheus scrape and one KEDA poll before `wake` (docs/operations.md).

No target is set by issue 11 for this number: it is printed to be watched. Exit status 0 unless a round failed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "operator")]

from support.adapters import write_adapter  # noqa: E402
from support.e2e import start_plane  # noqa: E402
from support.e2e_flows import (ARTIFACT_CLAIM, MODEL_CLAIM, RELEASE_NAMESPACE, V120, claim, complete,  # noqa: E402
                               first_token_breakdown, install_chart, router_metrics, router_url,
                               scale_from_zero_breakdown, WakeTimeline)
from support.kubectl import Kubectl  # noqa: E402
from loraplane.local.tinymodel import tiny_model_path  # noqa: E402

API = "loraplane.io/v1alpha1"


def route_doc(name: str, model_uri: str, autoscaled: bool = False) -> dict:
    scale = ({"autoscaling": {"backend": "hpa", "minReplicas": 1, "maxReplicas": 2}} if autoscaled
             else {"replicas": 1})
    return {"apiVersion": API, "kind": "ModelRoute", "metadata": {"name": name},
            "spec": {"baseModel": {"uri": model_uri}, "servedModelName": "tiny", **scale,
                     "engine": {"dtype": "float32", "maxModelLen": 256, "maxLoras": 2, "maxLoraRank": 16, "gpus": 0,
                                "cpu": 2, "memory": "6Gi"},
                     "routes": [{"name": "assistant", "backends": [{"adapter": "bench", "weight": 100}]}]}}


def one_round(plane, kubectl: Kubectl, n: int, model_dir: Path, from_zero: bool = False) -> dict:
    ns = f"bench-{n}"
    kubectl("create", "namespace", ns)
    k = kubectl.ns(ns)
    pvc = plane.node_workdir / "pvc" / ns
    shutil.copytree(model_dir, pvc / MODEL_CLAIM / "tiny-llama")
    write_adapter(pvc / ARTIFACT_CLAIM / "bench", base="")
    model_uri = f"pvc://{MODEL_CLAIM}/tiny-llama"
    k.apply([claim(MODEL_CLAIM), claim(ARTIFACT_CLAIM),
             {"apiVersion": API, "kind": "Adapter", "metadata": {"name": "bench"},
              "spec": {"baseModel": {"name": model_uri}, "version": "1",
                       "source": {"uri": f"pvc://{ARTIFACT_CLAIM}/bench"}}}])
    applied_at, t0 = time.time(), time.monotonic()
    k.apply([route_doc("bench", model_uri, autoscaled=from_zero)])
    first_at = None
    while time.monotonic() - t0 < 600:
        url = router_url(k, "bench")
        if url and complete(url, "assistant", "what does the cat see?\n", max_tokens=1, timeout=30)[0] == 200:
            first_at = time.time()
            break
        time.sleep(0.2)
    if first_at is None:
        raise RuntimeError(f"no first token in 600 s:\n{k('get', 'mr,lora,pods', '-o', 'wide').stdout}")
    split = first_token_breakdown(k, "bench", "bench--1", applied_at, first_at)
    if from_zero:
        split.update({f"zero_{key}": v for key, v in from_zero_round(plane, k).items()})
    kubectl("delete", "namespace", ns, "--wait=false")
    return split


def from_zero_round(plane, k: Kubectl) -> dict:
    """Park the route at zero, then time one request held by the router until the woken replica answers it."""
    k("scale", "deployment/bench-engine", "--replicas=0")
    plane.wait(lambda: not k.get("pods", "-l", "loraplane.io/route=bench")["items"], 180, "no engine pod left")
    url = router_url(k, "bench")
    plane.wait(lambda: not any(v for name, v in router_metrics(url).items()
                               if name.startswith("loraplane_router_replica_up")), 60, "the router to see none")
    before = router_metrics(url).get("loraplane_router_hold_seconds_sum", 0.0)
    timeline = WakeTimeline().watch(k, "bench").start()
    sent_at = time.time()
    code, text = complete(url, "assistant", "what does the cat see?\n", max_tokens=1, timeout=600)
    answered_at = time.time()
    watched = timeline.stop()
    if code != 200:
        raise RuntimeError(f"the held request was answered {code}: {text}")
    split = scale_from_zero_breakdown(k, "bench", "bench--1", sent_at, answered_at, watched)
    split["router_hold_s"] = round(router_metrics(url)["loraplane_router_hold_seconds_sum"] - before, 2)
    return split


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--scale-from-zero", action="store_true",
                   help="also time a request held at zero replicas until the replica it wakes answers (zero_*)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="loraplane-bench-e2e-"))
    t = time.monotonic()
    plane = start_plane(workdir)
    try:
        kubectl = Kubectl(plane.kubeconfig)
        install_chart(plane, kubectl, V120)
        kubectl.ns(RELEASE_NAMESPACE).wait("condition=Available", "deployment/lp-loraplane", timeout=300)
        print(f"plane + node + loraplane installed in {time.monotonic() - t:.1f}s")
        rounds = [one_round(plane, kubectl, n, tiny_model_path(), args.scale_from_zero) for n in range(args.rounds)]
    finally:
        plane.stop()
    keys = list(dict.fromkeys(k for r in rounds for k in r))
    print(f"\napply ModelRoute → first adapter token (seconds; {len(rounds)} round(s), phases ±1 s)"
          + ("; zero_*: request held at zero replicas → its answer" if args.scale_from_zero else "") + ":")
    for key in keys:
        print(f"  {key:>22}: " + "  ".join(f"{r[key]:7.2f}" if key in r else "      -" for r in rounds))
    if args.json:
        args.json.write_text(json.dumps(rounds, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
