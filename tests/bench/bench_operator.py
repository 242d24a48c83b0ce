"""The operator at scale against the real kube-apiserver (v1.20.2 + controller-manager, built locally).

    .venv/bin/python tests/bench/bench_operator.py [--adapters 1000] [--routes 50] [--idle 25]

Creates N ModelRoutes and M Adapters in one namespace (each route selects M/N adapters by label and
references one by name) with the operator already running, then measures, in one run:
- time for every object to reach a settled status (observedGeneration current, adapters listing their
  route, every route's serving ConfigMap holding its adapters), next to the time the API server took
  just to accept the creates (the floor any operator shares);
- API writes the operator made: per object and per reconcile, by resource;
- writes during an idle period that spans at least two full resyncs (target: 0);
- the operator's resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from harness.cluster import start_cluster  # noqa: E402
from support.operator_process import OperatorProcess, cpu_seconds, rss_bytes  # noqa: E402
from support.kube import install_crds  # noqa: E402

G, V, NS = "loraplane.io", "v1alpha1", "bench"


def route(i: int) -> dict:
    return {"apiVersion": f"{G}/{V}", "kind": "ModelRoute", "metadata": {"name": f"route-{i}", "namespace": NS},
            "spec": {"baseModel": {"name": "org/base"}, "replicas": 1,
                     "engine": {"gpus": 0, "maxLoraRank": 16},
                     "router": {"replicas": 1},
                     "routes": [{"name": f"pinned-{i}", "backends": [{"adapter": f"adapter-{i}-0"}]},
                                {"selector": {"matchLabels": {"group": f"g{i}"}}, "prefix": f"g{i}/"}]}}


def adapter(j: int, groups: int) -> dict:
    g = j % groups
    return {"apiVersion": f"{G}/{V}", "kind": "Adapter",
            "metadata": {"name": f"adapter-{g}-{j // groups}", "namespace": NS, "labels": {"group": f"g{g}"}},
            "spec": {"baseModel": {"name": "org/base"}, "source": {"uri": f"s3://bench/{j}"}, "version": "1",
                     "rank": 8}}


def settled(custom, core, apps, n_adapters: int, n_routes: int, per_route: int) -> tuple[bool, str]:
    """Everything the operator will write has been written: every Adapter's status lists its route, every
    serving table holds its adapters, and every route's status reflects its engine Deployment as the
    controller-manager finished it (status.replicas = the Deployment's, which has all its pods), since the
    Deployment's status is the last change that makes the operator write."""
    adapters = custom.list_namespaced_custom_object(G, V, NS, "adapters")["items"]
    routes = custom.list_namespaced_custom_object(G, V, NS, "modelroutes")["items"]
    ok_adapters = sum(1 for a in adapters if (a.get("status") or {}).get("observedGeneration")
                      == a["metadata"]["generation"] and (a.get("status") or {}).get("routes"))
    deployments = {d.metadata.name: d for d in apps.list_namespaced_deployment(NS).items}

    def route_done(r: dict) -> bool:
        st = r.get("status") or {}
        dep = deployments.get(f"{r['metadata']['name']}-engine")
        if dep is None or st.get("observedGeneration") != r["metadata"]["generation"]:
            return False
        rolled = (dep.status.observed_generation == dep.metadata.generation
                  and (dep.status.replicas or 0) == r["spec"]["replicas"])
        return rolled and st.get("replicas") == dep.status.replicas

    ok_routes = sum(1 for r in routes if route_done(r))
    tables = 0
    for cm in core.list_namespaced_config_map(NS, label_selector="app.kubernetes.io/component=serving-table").items:
        if len(json.loads(cm.data["serving.json"])["adapters"]) == per_route:
            tables += 1
    done = ok_adapters == n_adapters and ok_routes == n_routes and tables == n_routes
    return done, f"adapters {ok_adapters}/{n_adapters}, routes {ok_routes}/{n_routes}, tables {tables}/{n_routes}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--routes", type=int, default=50)
    p.add_argument("--idle", type=float, default=25, help="idle seconds measured (resync every idle/2.5 s)")
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args()
    from kubernetes import client, config

    warnings.filterwarnings("ignore", message="Unverified HTTPS request")
    work = Path(tempfile.mkdtemp(prefix="bench-operator-"))
    cluster = start_cluster(work / "kube")
    op = None
    try:
        api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        install_crds(api)
        core, custom, apps = client.CoreV1Api(api), client.CustomObjectsApi(api), client.AppsV1Api(api)
        core.create_namespace({"metadata": {"name": NS}})
        resync = args.idle / 2.5
        op = OperatorProcess(cluster.kubeconfig, work / "operator.log", resync_seconds=resync).start()
        rss_idle_empty = rss_bytes(op.proc.pid)
        w0 = op.metric_sum("loraplane_operator_api_writes_total")
        r0 = op.metric_sum("loraplane_operator_reconciles_total")

        docs = [route(i) for i in range(args.routes)] + [adapter(j, args.routes) for j in range(args.adapters)]
        plural = {"ModelRoute": "modelroutes", "Adapter": "adapters"}

        def create(doc):
            custom.create_namespaced_custom_object(G, V, NS, plural[doc["kind"]], doc)

        cpu0 = cpu_seconds(op.proc.pid)
        apiserver = cluster.procs["kube-apiserver"].pid
        api_cpu0 = cpu_seconds(apiserver)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, docs))
        t_created = time.perf_counter() - t0
        per_route = args.adapters // args.routes
        deadline = time.monotonic() + args.timeout
        state = ""
        last_print = 0.0
        while time.monotonic() < deadline:
            done, state = settled(custom, core, apps, args.adapters, args.routes, per_route)
            if done:
                break
            if time.perf_counter() - last_print > 5:
                last_print = time.perf_counter()
                print(f"  {last_print - t0:5.1f} s: {state}", flush=True)
            time.sleep(0.5)
        else:
            print(f"NOT settled after {args.timeout}s: {state}\n{op.log_tail()}")
            return 1
        t_settled = time.perf_counter() - t0
        cpu_settle = cpu_seconds(op.proc.pid) - cpu0
        api_cpu = cpu_seconds(apiserver) - api_cpu0
        time.sleep(3)  # stragglers (events, last status patches) before the counters are read
        writes = op.metric_sum("loraplane_operator_api_writes_total") - w0
        reconciles = op.metric_sum("loraplane_operator_reconciles_total") - r0
        by_resource: dict[str, float] = {}
        from prometheus_client.parser import text_string_to_metric_families

        for fam in text_string_to_metric_families(op.metrics_text()):
            for s in fam.samples:
                if s.name == "loraplane_operator_api_writes_total":
                    by_resource[f"{s.labels['verb']} {s.labels['resource']}"] = s.value
        rss_loaded = rss_bytes(op.proc.pid)

        w1 = op.metric_sum("loraplane_operator_api_writes_total")
        r1 = op.metric_sum("loraplane_operator_reconciles_total")
        time.sleep(args.idle)
        idle_writes = op.metric_sum("loraplane_operator_api_writes_total") - w1
        idle_reconciles = op.metric_sum("loraplane_operator_reconciles_total") - r1

        n = args.adapters + args.routes
        print(f"objects: {args.routes} ModelRoutes + {args.adapters} Adapters ({per_route} adapters per route)")
        print(f"creates accepted by the API server: {t_created:6.1f} s  ({n / t_created:6.0f} objects/s)")
        print(f"all settled (status + serving tables): {t_settled:6.1f} s  ({n / t_settled:6.0f} objects/s); "
              f"ratio settled/created {t_settled / t_created:4.2f}")
        print(f"CPU while settling: operator {cpu_settle:.1f} s ({cpu_settle / t_settled:.0%} of one core), "
              f"kube-apiserver {api_cpu:.1f} s; machine load average {os.getloadavg()[0]:.1f}")
        print(f"operator writes: {writes:.0f} total, {writes / n:.2f} per object, "
              f"{writes / max(reconciles, 1):.3f} per reconcile ({reconciles:.0f} reconciles)")
        for k, v in sorted(by_resource.items(), key=lambda kv: -kv[1]):
            print(f"    {v:7.0f}  {k}")
        print(f"idle {args.idle:.0f} s with resync every {resync:.0f} s: {idle_writes:.0f} writes "
              f"({idle_reconciles:.0f} reconciles ran)")
        print(f"operator RSS: {rss_idle_empty / 2**20:.0f} MiB empty, {rss_loaded / 2**20:.0f} MiB with "
              f"{n} objects + their {args.routes * 3} pods")
        return 0 if idle_writes == 0 else 2
    finally:
        if op:
            op.stop()
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
