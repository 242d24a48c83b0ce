"""Benchmark: from `kubectl apply` of a ModelRoute to the first token from its adapter, on the e2e plane.

    flock /tmp/heavy.lock python tests/bench/bench_e2e.py [--rounds 1] [--json OUT]

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
                               first_token_breakdown, install_chart, router_url)
from support.kubectl import Kubectl  # noqa: E402
from loraplane.local.tinymodel import tiny_model_path  # noqa: E402

API = "loraplane.io/v1alpha1"


def route_doc(name: str, model_uri: str) -> dict:
    return {"apiVersion": API, "kind": "ModelRoute", "metadata": {"name": name},
            "spec": {"baseModel": {"uri": model_uri}, "servedModelName": "tiny", "replicas": 1,
                     "engine": {"dtype": "float32", "maxModelLen": 256, "maxLoras": 2, "maxLoraRank": 16, "gpus": 0,
                                "cpu": 2, "memory": "6Gi"},
                     "routes": [{"name": "assistant", "backends": [{"adapter": "bench", "weight": 100}]}]}}


def one_round(plane, kubectl: Kubectl, n: int, model_dir: Path) -> dict:
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
    k.apply([route_doc("bench", model_uri)])
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
    kubectl("delete", "namespace", ns, "--wait=false")
    return split


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=1)
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
        rounds = [one_round(plane, kubectl, n, tiny_model_path()) for n in range(args.rounds)]
    finally:
        plane.stop()
    keys = list(dict.fromkeys(k for r in rounds for k in r))
    print(f"\napply ModelRoute → first adapter token (seconds; {len(rounds)} round(s), phases ±1 s):")
    for key in keys:
        print(f"  {key:>16}: " + "  ".join(f"{r[key]:7.2f}" if key in r else "      -" for r in rounds))
    if args.json:
        args.json.write_text(json.dumps(rounds, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
