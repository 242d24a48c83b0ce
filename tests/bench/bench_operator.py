"""The operator at scale against the real kube-apiserver (v1.20.2 + controller-manager, built locally).

    .venv/bin/python tests/bench/bench_operator.py [--adapters 1000] [--routes 50] [--idle 25] [--rounds 3]
        [--enforce-ratio 1.5 (0: off)]

Creates N ModelRoutes and M Adapters in one namespace (each route selects M/N adapters by label and
references one by name) with the operator already running, then measures, in one run:
- time for every object to reach a settled status (observedGeneration current, adapters listing their
  route, every route's serving ConfigMap holding its adapters), next to the time the API server took
  just to accept the creates (the floor any operator shares);
- API writes the operator made: per object and per reconcile, by resource;
- writes during an idle period, after the operator restarted, that spans at least two full resyncs (target: 0;
  the settle itself runs with the production resync period, so no resync falls inside it);
- the operator's resident memory;
- the anchor: a minimal kopf operator (tests/bench/minimal_operator.py: two server-side applies and one
  status patch per object, tuned) settling the same N objects of the same kinds on the same API server
  build, interleaved with loraplane's (loraplane, minimal, loraplane, minimal, ...; a fresh cluster for each
  side of each round, so neither sees the other's objects), and the ratio of operator CPU per object
  loraplane/minimal (target in issue 17: <= 1.5).

Measured 2026-12-07 (2-core machine shared with other work; docs/operator.md, Scale): idle writes 0 in every
round (they were 50, one engine key Secret create per route, before the Secret was named after the route's
uid), 1.91-1.94 writes per object (minimal: 3.00). Before the last changes, three-round runs gave 1.44 and 1.49
(and two-round runs 1.41, 1.62, 1.55). Since an Adapter's own status write is no longer reconciled again and a
route tells an Adapter only what its status reads, a settle runs ~1,600 reconciles instead of ~3,600; two sets
of three consecutive three-round runs then gave 1.46, 1.42, 1.73 (exit 0, 0, 3) and 1.28, 1.24, 1.45 (exit 0,
0, 0): loraplane 2.44-3.55 ms per object, minimal 1.76-2.92 ms, load average 0.8-2.2. On the final code (the
echo skip disarmed by any later reconcile, nested status keys removed with null) three consecutive runs on a
quiet machine gave 1.41, 1.38, 1.38 (exit 0 each; loraplane 2.21-2.65 ms, minimal 1.59-1.91 ms, ~1,600
reconciles per settle); after the next stop's changes (the Adapter also follows its FineTuneJob's existence)
1.39 (exit 0; loraplane 2.18-2.33 ms, minimal 1.60-1.73 ms). Loraplane's CPU per object still moves by a third between rounds when other work
shares the machine, so the margin depends on it.

Exits 0 only when both targets hold: 2 on writes while idle (loraplane), 3 when the ratio is above
--enforce-ratio (default 1.5; `--enforce-ratio 0` reports it without failing), 1 when a side does not settle.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from harness.cluster import free_port, start_cluster, stop_process
from loraplane.controllers.settings import OperatorSettings
from support.kube import install_crds
from support.operator_process import OperatorProcess, cpu_seconds, rss_bytes

G, V, NS = "loraplane.io", "v1alpha1", "bench"
MINIMAL = Path(__file__).resolve().parent / "minimal_operator.py"
PLURAL = {"ModelRoute": "modelroutes", "Adapter": "adapters"}


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


class NotSettled(Exception):
    pass


def create_all(custom, docs) -> float:
    """Create the objects 8 at a time; returns the seconds the API server took to accept them."""
    def create(doc):
        custom.create_namespaced_custom_object(G, V, NS, PLURAL[doc["kind"]], doc)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(create, docs))
    return time.perf_counter() - t0


def wait_settled(check, t0: float, timeout: float, tail) -> float:
    """Poll check() -> (done, state) until done; returns seconds since t0."""
    deadline = time.monotonic() + timeout
    state, last_print = "", 0.0
    while time.monotonic() < deadline:
        done, state = check()
        if done:
            return time.perf_counter() - t0
        if time.perf_counter() - last_print > 5:
            last_print = time.perf_counter()
            print(f"  {last_print - t0:5.1f} s: {state}", flush=True)
        time.sleep(0.5)
    raise NotSettled(f"NOT settled after {timeout}s: {state}\n{tail()}")


def apiserver_writes(cluster) -> dict[str, float]:
    """The API server's own count of non-GET requests by verb and resource (apiserver_request_total)."""
    import ssl

    from harness.cluster import ADMIN_TOKEN
    from prometheus_client.parser import text_string_to_metric_families

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    req = urllib.request.Request(f"{cluster.server}/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "apiserver_request_total" and s.labels.get("verb") in ("PATCH", "APPLY", "PUT", "POST",
                                                                                 "DELETE"):
                key = f"{s.labels['verb']} {s.labels['resource']}" + (
                    f"/{s.labels['subresource']}" if s.labels.get("subresource") else "")
                out[key] = out.get(key, 0) + s.value
    return out


def top_own_frames(raw: Path, n: int = 10) -> list[tuple[float, str]]:
    """py-spy's raw (collapsed) stacks -> the n functions with the most samples as the innermost frame."""
    import re

    own: dict[str, int] = {}
    total = 0
    for line in (raw.read_text() if raw.exists() else "").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = re.sub(r":\d+\)$", ")", stack.split(";")[-1])  # per function, not per line
        own[leaf] = own.get(leaf, 0) + int(count)
        total += int(count)
    return [(c / max(total, 1), f) for f, c in sorted(own.items(), key=lambda kv: -kv[1])[:n]]


def run_loraplane(args, work: Path, profile: bool = False) -> dict:
    """One loraplane side: fresh cluster, operator, N objects, settle, counters, idle window."""
    from kubernetes import client, config

    cluster = start_cluster(work / "kube")
    op = None
    try:
        api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        install_crds(api)
        core, custom, apps = client.CoreV1Api(api), client.CustomObjectsApi(api), client.AppsV1Api(api)
        core.create_namespace({"metadata": {"name": NS}})
        resync = args.idle / 2.5
        # The settle runs with the operator's production resync period (OperatorSettings: 600 s), so its CPU is the
        # work one burst of objects costs, as for the minimal operator (which never resyncs). The resyncs are
        # measured in the idle phase below, by a restarted operator with a short period.
        op = OperatorProcess(cluster.kubeconfig, work / "operator.log",
                             resync_seconds=OperatorSettings().resync_seconds).start()
        rss_idle_empty = rss_bytes(op.proc.pid)
        w0 = op.metric_sum("loraplane_operator_api_writes_total")
        r0 = op.metric_sum("loraplane_operator_reconciles_total")

        docs = [route(i) for i in range(args.routes)] + [adapter(j, args.routes) for j in range(args.adapters)]
        cpu0 = cpu_seconds(op.proc.pid)
        apiserver = cluster.procs["kube-apiserver"].pid
        api_cpu0 = cpu_seconds(apiserver)
        spy = None
        if profile:  # py-spy samples the operator (not pausing it) from the creates until settled
            spy = subprocess.Popen([args.py_spy, "record", "--nonblocking", "--format", "raw", "-r", str(args.py_spy_rate),
                                    "-o", str(work / "profile.txt"), "-p", str(op.proc.pid)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
        t0 = time.perf_counter()
        t_created = create_all(custom, docs)
        per_route = args.adapters // args.routes
        t_settled = wait_settled(lambda: settled(custom, core, apps, args.adapters, args.routes, per_route),
                                 t0, args.timeout, op.log_tail)
        cpu_settle = cpu_seconds(op.proc.pid) - cpu0
        api_cpu = cpu_seconds(apiserver) - api_cpu0
        if spy:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
            print(f"py-spy profile of the settle (not counted in the ratio): {work / 'profile.txt'}; "
                  "top frames by own time:")
            for share, frame in top_own_frames(work / "profile.txt"):
                print(f"    {share:6.1%}  {frame}")
        load = os.getloadavg()[0]
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

        # Idle: a restarted operator (it must find every child as it left it: one read each, no write) through
        # at least two full resyncs (each re-reconciles everything and re-reads every child).
        op.stop()
        op = OperatorProcess(cluster.kubeconfig, work / "operator-idle.log", resync_seconds=resync).start()
        w1 = op.metric_sum("loraplane_operator_api_writes_total")
        r1 = op.metric_sum("loraplane_operator_reconciles_total")
        cpu_idle0 = cpu_seconds(op.proc.pid)
        time.sleep(args.idle)
        cpu_idle = cpu_seconds(op.proc.pid) - cpu_idle0
        idle_writes = op.metric_sum("loraplane_operator_api_writes_total") - w1
        idle_reconciles = op.metric_sum("loraplane_operator_reconciles_total") - r1

        n = args.adapters + args.routes
        print(f"[loraplane] objects: {args.routes} ModelRoutes + {args.adapters} Adapters "
              f"({per_route} adapters per route)")
        print(f"creates accepted by the API server: {t_created:6.1f} s  ({n / t_created:6.0f} objects/s)")
        print(f"all settled (status + serving tables): {t_settled:6.1f} s  ({n / t_settled:6.0f} objects/s); "
              f"ratio settled/created {t_settled / t_created:4.2f}")
        print(f"CPU while settling: operator {cpu_settle:.1f} s ({cpu_settle / t_settled:.0%} of one core, "
              f"{cpu_settle / n * 1000:.2f} ms per object), kube-apiserver {api_cpu:.1f} s; "
              f"machine load average {load:.1f}")
        print(f"operator writes: {writes:.0f} total, {writes / n:.2f} per object, "
              f"{writes / max(reconciles, 1):.3f} per reconcile ({reconciles:.0f} reconciles)")
        for k, v in sorted(by_resource.items(), key=lambda kv: -kv[1]):
            print(f"    {v:7.0f}  {k}")
        print(f"idle {args.idle:.0f} s after a restart, resync every {resync:.0f} s: {idle_writes:.0f} writes "
              f"({idle_reconciles:.0f} reconciles ran; operator CPU {cpu_idle:.1f} s, "
              f"{cpu_idle / max(idle_reconciles, 1) * 1000:.2f} ms per reconcile)")
        print(f"operator RSS: {rss_idle_empty / 2**20:.0f} MiB empty, {rss_loaded / 2**20:.0f} MiB with "
              f"{n} objects + their {args.routes * 3} pods", flush=True)
        return {"cpu_per_object": cpu_settle / n, "settle_s": t_settled, "writes_per_object": writes / n,
                "idle_writes": idle_writes, "api_cpu": api_cpu}
    finally:
        if op:
            op.stop()
        cluster.stop()


def minimal_settled(custom, core, n: int) -> tuple[bool, str]:
    ok = 0
    for plural in ("adapters", "modelroutes"):
        for o in custom.list_namespaced_custom_object(G, V, NS, plural)["items"]:
            if (o.get("status") or {}).get("observedGeneration") == o["metadata"]["generation"]:
                ok += 1
    sel = "app.kubernetes.io/managed-by=minimal-bench"
    cms = len(core.list_namespaced_config_map(NS, label_selector=sel).items)
    svcs = len(core.list_namespaced_service(NS, label_selector=sel).items)
    return ok == n and cms == n and svcs == n, f"status {ok}/{n}, configmaps {cms}/{n}, services {svcs}/{n}"


def run_minimal(args, work: Path) -> dict:
    """One anchor side: fresh cluster, minimal_operator.py under `kopf run --standalone`, same N objects."""
    from kubernetes import client, config

    cluster = start_cluster(work / "kube")
    proc = None
    log_path = work / "minimal.log"
    try:
        api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        install_crds(api)
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        core.create_namespace({"metadata": {"name": NS}})
        port = free_port()
        env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kopf", "run", "--standalone", "--quiet", "--namespace", NS,
                 "--liveness", f"http://127.0.0.1:{port}/healthz", str(MINIMAL)],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        tail = lambda: log_path.read_text(errors="replace")[-4000:]
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise NotSettled(f"minimal operator not up (rc {proc.poll()}):\n{tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.2)
        time.sleep(2)  # watches established
        rss_empty = rss_bytes(proc.pid)
        docs = [route(i) for i in range(args.routes)] + [adapter(j, args.routes) for j in range(args.adapters)]
        n = len(docs)
        writes0 = apiserver_writes(cluster)
        cpu0 = cpu_seconds(proc.pid)
        apiserver = cluster.procs["kube-apiserver"].pid
        api_cpu0 = cpu_seconds(apiserver)
        t0 = time.perf_counter()
        t_created = create_all(custom, docs)
        t_settled = wait_settled(lambda: minimal_settled(custom, core, n), t0, args.timeout, tail)
        cpu_settle = cpu_seconds(proc.pid) - cpu0
        api_cpu = cpu_seconds(apiserver) - api_cpu0
        load = os.getloadavg()[0]
        time.sleep(3)
        writes1 = apiserver_writes(cluster)
        # The operator's writes as the API server counted them: applies/patches (the bench's own writes are
        # the POSTs of the objects; the controller-manager writes nothing here but its service account).
        by_resource = {k: writes1[k] - writes0.get(k, 0) for k in writes1
                       if k.split()[0] in ("PATCH", "APPLY", "PUT") and writes1[k] - writes0.get(k, 0)}
        writes = sum(by_resource.values())
        rss_loaded = rss_bytes(proc.pid)
        print(f"[minimal kopf] objects: {args.routes} ModelRoutes + {args.adapters} Adapters")
        print(f"creates accepted by the API server: {t_created:6.1f} s  ({n / t_created:6.0f} objects/s)")
        print(f"all settled (status + 2 children each): {t_settled:6.1f} s  ({n / t_settled:6.0f} objects/s); "
              f"ratio settled/created {t_settled / t_created:4.2f}")
        print(f"CPU while settling: operator {cpu_settle:.1f} s ({cpu_settle / t_settled:.0%} of one core, "
              f"{cpu_settle / n * 1000:.2f} ms per object), kube-apiserver {api_cpu:.1f} s; "
              f"machine load average {load:.1f}")
        print(f"operator writes (API server count): {writes:.0f} total, {writes / n:.2f} per object")
        for k, v in sorted(by_resource.items(), key=lambda kv: -kv[1]):
            print(f"    {v:7.0f}  {k}")
        print(f"operator RSS: {rss_empty / 2**20:.0f} MiB empty, {rss_loaded / 2**20:.0f} MiB with {n} objects",
              flush=True)
        return {"cpu_per_object": cpu_settle / n, "settle_s": t_settled, "writes_per_object": writes / n,
                "api_cpu": api_cpu}
    finally:
        stop_process(proc)
        cluster.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--routes", type=int, default=50)
    p.add_argument("--idle", type=float, default=25, help="idle seconds measured (resync every idle/2.5 s)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of (loraplane, minimal), interleaved (default 3: the median of three leaves out one "
                        "round disturbed by other work on the machine, on either side)")
    p.add_argument("--no-minimal", action="store_true", help="loraplane only (no anchor, no ratio)")
    p.add_argument("--py-spy", metavar="PY_SPY", default=None,
                   help="profile loraplane's operator during one extra settle (after the rounds) with this py-spy")
    p.add_argument("--py-spy-rate", type=int, default=100, help="py-spy samples per second (default 100)")
    p.add_argument("--enforce-ratio", type=float, default=1.5, metavar="R",
                   help="exit 3 when loraplane/minimal operator CPU per object is above R (default 1.5, issue 17's "
                        "target; 0 turns the check off)")
    args = p.parse_args()

    warnings.filterwarnings("ignore", message="Unverified HTTPS request")
    work = Path(tempfile.mkdtemp(prefix="bench-operator-"))
    ours: list[dict] = []
    anchor: list[dict] = []
    try:
        for rnd in range(args.rounds):
            print(f"--- round {rnd + 1}/{args.rounds}: loraplane", flush=True)
            ours.append(run_loraplane(args, work / f"r{rnd}-loraplane"))
            if not args.no_minimal:
                print(f"--- round {rnd + 1}/{args.rounds}: minimal kopf operator", flush=True)
                anchor.append(run_minimal(args, work / f"r{rnd}-minimal"))
    except NotSettled as e:
        print(e)
        return 1

    n = args.adapters + args.routes
    ms = lambda xs: " ".join(f"{x * 1000:.2f}" for x in xs)
    lp = statistics.median(r["cpu_per_object"] for r in ours)
    print(f"=== {n} objects, {args.rounds} round(s) interleaved, fresh cluster per side per round")
    print(f"loraplane operator CPU per object: median {lp * 1000:.2f} ms (rounds: {ms([r['cpu_per_object'] for r in ours])}); "
          f"writes per object {statistics.median(r['writes_per_object'] for r in ours):.2f}; "
          f"settle {statistics.median(r['settle_s'] for r in ours):.1f} s")
    idle = max(r["idle_writes"] for r in ours)
    rc = 0 if idle == 0 else 2
    if anchor:
        mn = statistics.median(r["cpu_per_object"] for r in anchor)
        ratio = lp / mn
        print(f"minimal kopf operator CPU per object: median {mn * 1000:.2f} ms "
              f"(rounds: {ms([r['cpu_per_object'] for r in anchor])}); "
              f"writes per object {statistics.median(r['writes_per_object'] for r in anchor):.2f}; "
              f"settle {statistics.median(r['settle_s'] for r in anchor):.1f} s")
        print(f"ratio loraplane/minimal operator CPU per object: {ratio:.2f} (target <= 1.5"
              + (f", enforced at {args.enforce_ratio}" if args.enforce_ratio else ", not enforced")
              + ")")
        if args.enforce_ratio and ratio > args.enforce_ratio and rc == 0:
            rc = 3
    print(f"idle writes (loraplane, worst round): {idle:.0f} (target 0)", flush=True)
    if args.py_spy:
        print("--- profile: loraplane (py-spy; not part of the measurements above)", flush=True)
        try:
            run_loraplane(args, work / "profile-loraplane", profile=True)
        except NotSettled as e:
            print(e)
    return rc


if __name__ == "__main__":
    sys.exit(main())
