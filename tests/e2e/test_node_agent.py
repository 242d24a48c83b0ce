"""The node stand-in (tests/harness/node.py) is honest: what it reports is what the processes did.

Each test runs real pods on the e2e control plane (tests/support/e2e.py: kube-apiserver, kube-scheduler,
controller-manager, the node agent) and checks the pod's reported status against what its processes did.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def core(plane):
    from kubernetes import client
    return client.CoreV1Api(plane.api)


def pod_obj(name: str, containers: list[dict], restart: str = "Never", **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": spec.pop("labels", {})},
            "spec": {"restartPolicy": restart, "containers": containers, "terminationGracePeriodSeconds": 5, **spec}}


def sh(name: str, script: str, image: str = "busybox", **extra) -> dict:
    return {"name": name, "image": image, "command": ["sh", "-c", script], **extra}


def read(plane, ns: str, name: str):
    return core(plane).read_namespaced_pod(name, ns)


def wait_phase(plane, ns: str, name: str, phases=("Succeeded", "Failed"), timeout: float = 60):
    def done():
        p = read(plane, ns, name)
        return p if p.status.phase in phases else None
    return plane.wait(done, timeout, f"pod {ns}/{name} in {phases}")


def ready(pod) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def gone(plane, ns: str, name: str) -> bool:
    from kubernetes.client.rest import ApiException
    try:
        read(plane, ns, name)
        return False
    except ApiException as exc:
        return exc.status == 404


def test_exit_code_and_termination_message_are_reported(e2e_plane, e2e_namespace):
    """A container exiting 3 is reported with exit code 3, reason Error and its termination message; with
    FallbackToLogsOnError and no message file, the tail of its log is the message."""
    api = core(e2e_plane)
    api.create_namespaced_pod(e2e_namespace, pod_obj("exit3", [
        sh("main", "echo started; echo 'disk full on /output' > /dev/termination-log; exit 3")]))
    api.create_namespaced_pod(e2e_namespace, pod_obj("fallback", [
        sh("main", "echo 'Traceback: boom'; exit 2", terminationMessagePolicy="FallbackToLogsOnError")]))
    api.create_namespaced_pod(e2e_namespace, pod_obj("ok", [sh("main", "echo fine")]))

    pod = wait_phase(e2e_plane, e2e_namespace, "exit3")
    assert pod.status.phase == "Failed"
    term = pod.status.container_statuses[0].state.terminated
    assert (term.exit_code, term.reason, term.message) == (3, "Error", "disk full on /output\n")
    assert not ready(pod)
    assert e2e_plane.pod_log(e2e_namespace, "exit3", "main") == "started\n"

    pod = wait_phase(e2e_plane, e2e_namespace, "fallback")
    term = pod.status.container_statuses[0].state.terminated
    assert (term.exit_code, term.message) == (2, "Traceback: boom")

    pod = wait_phase(e2e_plane, e2e_namespace, "ok")
    term = pod.status.container_statuses[0].state.terminated
    assert (pod.status.phase, term.exit_code, term.reason) == ("Succeeded", 0, "Completed")


def test_failing_readiness_probe_never_becomes_ready(e2e_plane, e2e_namespace):
    """A server whose readiness probe fails (404) runs but is never Ready and is not an endpoint of its
    Service; the same server probed on a path that answers becomes Ready (so the check can fail)."""
    api = core(e2e_plane)
    server = ["python3", "-m", "http.server", "8080", "--directory", "/srv"]

    def web(name: str, path: str) -> dict:
        return pod_obj(name, [{"name": "web", "image": "python:3.11", "command": server,
                               "volumeMounts": [{"name": "srv", "mountPath": "/srv"}],
                               "readinessProbe": {"httpGet": {"path": path, "port": 8080}, "periodSeconds": 1,
                                                  "failureThreshold": 1}}],
                       restart="Always", labels={"app": name}, volumes=[{"name": "srv", "emptyDir": {}}])
    api.create_namespaced_pod(e2e_namespace, web("never", "/missing"))
    api.create_namespaced_pod(e2e_namespace, web("good", "/"))
    api.create_namespaced_service(e2e_namespace, {"metadata": {"name": "never"}, "spec": {
        "selector": {"app": "never"}, "ports": [{"port": 8080, "targetPort": 8080}]}})

    e2e_plane.wait(lambda: ready(read(e2e_plane, e2e_namespace, "good")), 60, "the good server Ready")
    # The failing one: running and probed (its server logs the 404s), and never Ready meanwhile.
    # Watched for at least 4 s and until its server has logged a probe's 404 (a loaded machine may take longer
    # than 4 s to send the first one; the pod must stay unready all along either way).
    started = time.monotonic()
    probed = False
    while not probed or time.monotonic() < started + 4:
        pod = read(e2e_plane, e2e_namespace, "never")
        assert not ready(pod), pod.status
        probed = probed or '"GET /missing HTTP/1.1" 404' in e2e_plane.pod_log(e2e_namespace, "never", "web")
        assert time.monotonic() < started + 60, "the readiness probe never reached the server in 60 s"
        time.sleep(0.2)
    assert pod.status.phase == "Running" and pod.status.container_statuses[0].state.running
    assert pod.status.container_statuses[0].ready is False
    ep = api.read_namespaced_endpoints("never", e2e_namespace)
    assert all(not s.addresses for s in ep.subsets or [])
    assert [a.ip for s in ep.subsets for a in s.not_ready_addresses or []] == [pod.status.pod_ip]


def test_pod_reachable_from_host_and_from_another_pod_by_service_name(e2e_plane, e2e_namespace):
    """A pod listens on its real port at its own address: the host reaches podIP:8080, another pod reaches it
    through the Service's name (hosts kept current from Endpoints), in short and fully qualified form."""
    api = core(e2e_plane)
    api.create_namespaced_pod(e2e_namespace, pod_obj("web-0", [{
        "name": "web", "image": "python:3.11", "workingDir": "/srv",
        "command": ["sh", "-c", "echo hello-from-$(POD_NAME) > index.html && exec python3 -m http.server 8080"],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "volumeMounts": [{"name": "srv", "mountPath": "/srv"}],
        "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}],
        restart="Always", labels={"app": "web"}, volumes=[{"name": "srv", "emptyDir": {}}]))
    api.create_namespaced_service(e2e_namespace, {"metadata": {"name": "web"}, "spec": {
        "selector": {"app": "web"}, "ports": [{"port": 8080, "targetPort": 8080}]}})
    e2e_plane.wait(lambda: ready(read(e2e_plane, e2e_namespace, "web-0")), 60, "web-0 Ready")
    pod_ip = read(e2e_plane, e2e_namespace, "web-0").status.pod_ip
    assert pod_ip.startswith(str(e2e_plane.bridge.network.network_address)[:-1])
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{pod_ip}:8080/index.html", timeout=5) as r:
        assert r.read() == b"hello-from-web-0\n"
    e2e_plane.wait(lambda: [s for s in api.read_namespaced_endpoints("web", e2e_namespace).subsets or []
                            if s.addresses], 30, "Endpoints of web")
    client_script = ("import urllib.request as u\n"
                     f"for host in ('web', 'web.{e2e_namespace}.svc.cluster.local'):\n"
                     "    print(host, u.urlopen(f'http://{host}:8080/index.html', timeout=5).read().decode().strip())\n")
    api.create_namespaced_pod(e2e_namespace, pod_obj("client", [
        {"name": "c", "image": "python:3.11", "command": ["python3", "-c", client_script]}], restart="OnFailure"))
    pod = wait_phase(e2e_plane, e2e_namespace, "client", ("Succeeded",))
    assert e2e_plane.pod_log(e2e_namespace, "client", "c", pod.status.container_statuses[0].restart_count) == (
        f"web hello-from-web-0\nweb.{e2e_namespace}.svc.cluster.local hello-from-web-0\n")


def test_secret_volume_env_and_service_account_token_inside_the_pod_only(e2e_plane, e2e_namespace):
    """A Secret volume and the projected service-account token sit at their real paths inside the pod (and not
    on the host), also behind an emptyDir at /tmp; env valueFrom resolves; the token authenticates to the API server at kubernetes.default.svc
    with TLS verified against the mounted ca.crt."""
    api = core(e2e_plane)
    api.create_namespaced_secret(e2e_namespace, {"metadata": {"name": "creds"}, "stringData": {"password": "hunter2"}})
    e2e_plane.wait(lambda: [s for s in api.list_namespaced_service_account(e2e_namespace).items
                            if s.metadata.name == "default"], 30, "default ServiceAccount")
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    probe = (
        "import json, os, ssl, urllib.request as u\n"
        "print(open('/etc/creds/password').read(), os.environ['PASSWORD'], os.environ['GREETING'])\n"
        f"print(open('{sa}/namespace').read())\n"
        f"ctx = ssl.create_default_context(cafile='{sa}/ca.crt')\n"
        "url = 'https://kubernetes.default.svc:' + os.environ['KUBERNETES_SERVICE_PORT'] + '/api/v1/nodes'\n"
        f"req = u.Request(url, headers={{'Authorization': 'Bearer ' + open('{sa}/token').read()}})\n"
        "try:\n    u.urlopen(req, context=ctx)\n"
        "except u.HTTPError as e:\n    print(e.code, json.loads(e.read())['message'])\n")
    api.create_namespaced_pod(e2e_namespace, pod_obj("reader", [{
        "name": "c", "image": "python:3.11", "command": ["python3", "-c", probe],
        "env": [{"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "GREETING", "value": "hi-$(NS)-$$(NS)"}],
        # /tmp first, as the chart's operator pod has it: the node's work folder (the volumes' sources) is under
        # /tmp in tests, and the mounts after it must still find their sources.
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, {"name": "creds", "mountPath": "/etc/creds"}]}],
        volumes=[{"name": "tmp", "emptyDir": {}}, {"name": "creds", "secret": {"secretName": "creds"}}]))
    pod = wait_phase(e2e_plane, e2e_namespace, "reader")
    out = e2e_plane.pod_log(e2e_namespace, "reader", "c")
    assert pod.status.phase == "Succeeded", out
    assert out.splitlines() == [
        f"hunter2 hunter2 hi-{e2e_namespace}-$(NS)", e2e_namespace,
        f'403 nodes is forbidden: User "system:serviceaccount:{e2e_namespace}:default" cannot list resource '
        '"nodes" in API group "" at the cluster scope']
    assert not Path("/etc/creds/password").exists()
    assert not Path(f"{sa}/token").exists()


def test_graceful_deletion_sigterm_then_sigkill(e2e_plane, e2e_namespace):
    """Deleting a pod sends SIGTERM and waits for it (the object goes once it exited); a process ignoring
    SIGTERM is SIGKILLed after the grace period; both pod objects are then deleted for good."""
    api = core(e2e_plane)
    api.create_namespaced_pod(e2e_namespace, pod_obj("polite", [
        sh("c", "trap 'echo got TERM; exit 0' TERM; echo up; while true; do sleep 0.1; done")], restart="Always"))
    api.create_namespaced_pod(e2e_namespace, pod_obj("stubborn", [
        sh("c", "trap 'echo ignoring TERM' TERM; echo up; while true; do sleep 0.1; done")], restart="Always",
        terminationGracePeriodSeconds=3))
    for name in ("polite", "stubborn"):
        e2e_plane.wait(lambda n=name: e2e_plane.pod_log(e2e_namespace, n, "c") == "up\n", 60, f"{name} up")
    t0 = time.monotonic()
    api.delete_namespaced_pod("polite", e2e_namespace, grace_period_seconds=30)
    api.delete_namespaced_pod("stubborn", e2e_namespace)
    e2e_plane.wait(lambda: gone(e2e_plane, e2e_namespace, "polite"), 30, "polite deleted")
    polite_s = time.monotonic() - t0
    e2e_plane.wait(lambda: gone(e2e_plane, e2e_namespace, "stubborn"), 30, "stubborn deleted")
    stubborn_s = time.monotonic() - t0
    assert e2e_plane.pod_log(e2e_namespace, "polite", "c") == "up\ngot TERM\n"
    assert "ignoring TERM" in e2e_plane.pod_log(e2e_namespace, "stubborn", "c")
    assert polite_s < 5, polite_s               # it exited on SIGTERM: no waiting out the 30 s grace
    assert 3 <= stubborn_s < 10, stubborn_s     # SIGKILL after the 3 s grace period


def test_init_containers_run_in_order_before_containers(e2e_plane, e2e_namespace):
    """Init containers run one after the other, each to completion, before the containers; a failing init
    container (restartPolicy Never) fails the pod and its containers never start."""
    api = core(e2e_plane)
    vol = [{"name": "w", "emptyDir": {}}]
    mount = [{"name": "w", "mountPath": "/work"}]
    api.create_namespaced_pod(e2e_namespace, pod_obj("ordered", [sh("main", "cat /work/order", volumeMounts=mount)],
        initContainers=[sh("first", "sleep 1; echo first >> /work/order", volumeMounts=mount),
                        sh("second", "echo second >> /work/order", volumeMounts=mount)], volumes=vol))
    api.create_namespaced_pod(e2e_namespace, pod_obj("broken", [sh("main", "echo should-not-run")],
        initContainers=[sh("setup", "echo cannot; exit 7")]))
    pod = wait_phase(e2e_plane, e2e_namespace, "ordered")
    assert pod.status.phase == "Succeeded"
    assert e2e_plane.pod_log(e2e_namespace, "ordered", "main") == "first\nsecond\n"
    inits = pod.status.init_container_statuses
    assert [(s.name, s.state.terminated.reason) for s in inits] == [("first", "Completed"), ("second", "Completed")]
    assert inits[0].state.terminated.finished_at <= inits[1].state.terminated.started_at

    pod = wait_phase(e2e_plane, e2e_namespace, "broken")
    assert pod.status.phase == "Failed"
    assert pod.status.init_container_statuses[0].state.terminated.exit_code == 7
    assert pod.status.container_statuses[0].state.terminated is None
    assert e2e_plane.pod_log(e2e_namespace, "broken", "main") == ""


def test_crash_loop_back_off_and_restart_counts(e2e_plane, e2e_namespace):
    """A container that keeps exiting 1 under restartPolicy Always is restarted with growing back-off
    (CrashLoopBackOff between restarts), its restartCount counts the restarts and lastState has exit code 1."""
    from support.e2e import E2E_BACKOFF_BASE
    api = core(e2e_plane)
    api.create_namespaced_pod(e2e_namespace, pod_obj("crashy", [sh("c", "date +%s.%N; exit 1")], restart="Always"))
    seen_backoff = False

    def restarted_thrice():
        nonlocal seen_backoff
        s = read(e2e_plane, e2e_namespace, "crashy").status.container_statuses
        if s and s[0].state.waiting and s[0].state.waiting.reason == "CrashLoopBackOff":
            seen_backoff = True
        return s[0] if s and s[0].restart_count >= 3 else None
    status = e2e_plane.wait(restarted_thrice, 60, "three restarts")
    assert seen_backoff
    assert status.last_state.terminated.exit_code == 1
    e2e_plane.wait(lambda: e2e_plane.pod_log(e2e_namespace, "crashy", "c", 3), 10, "the fourth run's output")
    starts = [float(e2e_plane.pod_log(e2e_namespace, "crashy", "c", n)) for n in range(4)]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    # The kubelet's schedule: restart at once, then base, then 2*base (each plus the poll tick).
    assert gaps[0] < E2E_BACKOFF_BASE, gaps
    assert E2E_BACKOFF_BASE <= gaps[1] < 2 * E2E_BACKOFF_BASE, gaps
    assert 2 * E2E_BACKOFF_BASE <= gaps[2] < 3 * E2E_BACKOFF_BASE, gaps
    assert read(e2e_plane, e2e_namespace, "crashy").status.phase == "Running"


def test_configmap_volume_follows_updates(e2e_plane, e2e_namespace):
    """A configMap volume is kept in sync: the running container sees the new value after an update."""
    api = core(e2e_plane)
    api.create_namespaced_config_map(e2e_namespace, {"metadata": {"name": "cfg"}, "data": {"mode": "one"}})
    api.create_namespaced_pod(e2e_namespace, pod_obj("watcher", [
        sh("c", "last=; while true; do v=$(cat /etc/cfg/mode); [ \"$v\" = \"$last\" ] || echo $v; last=$v; "
                "sleep 0.2; done", volumeMounts=[{"name": "cfg", "mountPath": "/etc/cfg"}])], restart="Always",
        volumes=[{"name": "cfg", "configMap": {"name": "cfg"}}]))
    e2e_plane.wait(lambda: e2e_plane.pod_log(e2e_namespace, "watcher", "c") == "one\n", 60, "first value")
    api.patch_namespaced_config_map("cfg", e2e_namespace, {"data": {"mode": "two"}})
    e2e_plane.wait(lambda: e2e_plane.pod_log(e2e_namespace, "watcher", "c") == "one\ntwo\n", 15, "updated value")
    assert not Path("/etc/cfg/mode").exists()


def test_sweep_removes_what_a_crashed_run_left_and_spares_live_runs():
    """A run whose owning process died (a killed test session) leaves a bridge, a pod namespace with a process
    in it and a mount point: the next run's sweep removes them all; a live run's objects stay."""
    import subprocess

    from harness.netns import Bridge, available, ip, sweep
    why = available()
    if why:
        pytest.skip(why)
    dead = subprocess.Popen(["true"])
    dead.wait()
    crashed, live = Bridge.create(), Bridge.create()
    try:
        (crashed.state_dir / "owner.pid").write_text(str(dead.pid))
        ns, _ = crashed.add_pod(1, "127.0.0.1 localhost\n")
        proc = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "600"], start_new_session=True)
        crashed.remember_process(proc.pid)
        mountpoint = Path(f"/tmp/lp-sweep-test-{crashed.run_id}/a/b")
        mountpoint.mkdir(parents=True)
        crashed.remember_mountpoint(str(mountpoint.parent.parent))
        crashed.remember_mountpoint(str(mountpoint.parent))
        crashed.remember_mountpoint(str(mountpoint))
        live_ns, _ = live.add_pod(1, "127.0.0.1 localhost\n")

        swept = sweep()

        assert crashed.run_id in swept and live.run_id not in swept
        assert proc.wait(5) == -9
        netns = ip("netns", "list").stdout
        assert ns not in netns and live_ns in netns
        links = ip("-o", "link", "show").stdout
        assert crashed.name not in links and crashed.veth_name(1) not in links and live.name in links
        assert not mountpoint.parent.parent.exists() and not crashed.state_dir.exists()
    finally:
        crashed.destroy()
        live.destroy()
    assert live.name not in ip("-o", "link", "show").stdout and not live.state_dir.exists()


def test_job_with_a_claim_and_a_deployment_run_through_the_real_controllers(e2e_plane, e2e_namespace):
    """The user controllers and the scheduler drive the node: a Job's pod writes into a PVC (bound through a
    volume the node provisions) and completes the Job; a pod of a Deployment reads the same claim, and when
    deleted its ReplicaSet replaces it with a new pod that runs too."""
    from kubernetes import client
    api, batch, apps = core(e2e_plane), client.BatchV1Api(e2e_plane.api), client.AppsV1Api(e2e_plane.api)
    api.create_namespaced_persistent_volume_claim(e2e_namespace, {"metadata": {"name": "data"}, "spec": {
        "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
    claim = [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]
    mount = [{"name": "data", "mountPath": "/data"}]
    batch.create_namespaced_job(e2e_namespace, {"metadata": {"name": "writer"}, "spec": {"backoffLimit": 0,
        "template": {"spec": {"restartPolicy": "Never", "volumes": claim, "containers": [
            sh("w", "echo written-by-job > /data/out", volumeMounts=mount,
               resources={"limits": {"nvidia.com/gpu": "1"}})]}}}})

    def job_complete():
        st = batch.read_namespaced_job_status("writer", e2e_namespace).status
        return any(c.type == "Complete" and c.status == "True" for c in st.conditions or [])
    e2e_plane.wait(job_complete, 60, "Job writer Complete")
    assert api.read_namespaced_persistent_volume_claim("data", e2e_namespace).status.phase == "Bound"

    labels = {"app": "reader"}
    apps.create_namespaced_deployment(e2e_namespace, {"metadata": {"name": "reader"}, "spec": {
        "replicas": 1, "selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}, "spec": {
            "volumes": claim, "terminationGracePeriodSeconds": 1, "containers": [
                sh("r", "cat /data/out; exec sleep 600", volumeMounts=mount)]}}}})

    def reader_pods(ready_only: bool = True):
        pods = api.list_namespaced_pod(e2e_namespace, label_selector="app=reader").items
        return [p for p in pods if not p.metadata.deletion_timestamp and (ready(p) or not ready_only)]
    first = e2e_plane.wait(reader_pods, 60, "reader Ready")[0]
    e2e_plane.wait(lambda: e2e_plane.pod_log(e2e_namespace, first.metadata.name, "r") == "written-by-job\n", 10,
                   "reader output")
    api.delete_namespaced_pod(first.metadata.name, e2e_namespace)
    second = e2e_plane.wait(lambda: [p for p in reader_pods() if p.metadata.uid != first.metadata.uid], 60,
                            "replacement Ready")[0]
    assert second.status.pod_ip and second.spec.node_name in e2e_plane.nodes
    e2e_plane.wait(lambda: gone(e2e_plane, e2e_namespace, first.metadata.name), 30, "first reader deleted")


def test_scheduler_honours_the_taints_and_labels_tests_set_on_the_node(e2e_plane, e2e_namespace):
    """A NoSchedule taint on the node keeps a pod without the toleration Pending (Unschedulable) while one that
    tolerates it runs; a nodeSelector on a label the node lacks stays Pending until the label is added."""
    api = core(e2e_plane)
    node = e2e_plane.nodes[0]
    taint = {"key": "loraplane.io/test", "value": "x", "effect": "NoSchedule"}
    original = api.read_node(node).spec.taints
    api.patch_node(node, {"spec": {"taints": [*(t.to_dict() for t in original or []), taint]}})
    try:
        api.create_namespaced_pod(e2e_namespace, pod_obj("blocked", [sh("c", "echo ran")]))
        api.create_namespaced_pod(e2e_namespace, pod_obj("tolerant", [sh("c", "echo ran")], tolerations=[
            {"key": "loraplane.io/test", "operator": "Equal", "value": "x", "effect": "NoSchedule"}],
            nodeSelector={"loraplane.io/pool": "blue"}))
        pod = e2e_plane.wait(lambda: [c for c in read(e2e_plane, e2e_namespace, "blocked").status.conditions or []
                                      if c.type == "PodScheduled" and c.reason == "Unschedulable"], 30,
                             "blocked Unschedulable")[0]
        assert "taint" in pod.message
        time.sleep(1)
        assert read(e2e_plane, e2e_namespace, "tolerant").status.phase == "Pending"   # no such label yet
        api.patch_node(node, {"metadata": {"labels": {"loraplane.io/pool": "blue"}}})
        assert wait_phase(e2e_plane, e2e_namespace, "tolerant").status.phase == "Succeeded"
        assert read(e2e_plane, e2e_namespace, "blocked").status.phase == "Pending"
    finally:
        api.patch_node(node, {"metadata": {"labels": {"loraplane.io/pool": None}}})
        kept = [t.to_dict() for t in api.read_node(node).spec.taints or [] if t.key != taint["key"]]
        api.patch_node(node, {"spec": {"taints": kept or None}})   # Node taints have no merge key: replaced
    assert wait_phase(e2e_plane, e2e_namespace, "blocked").status.phase == "Succeeded"


def test_exec_startup_and_liveness_probes_run_inside_the_container(e2e_plane, e2e_namespace):
    """Exec probes see the container's own mounts: the startup probe holds `started` (and Ready) back until
    the container made its marker; when the liveness marker goes, the container is restarted (SIGTERM, exit
    143, restartCount 1) and starts over."""
    api = core(e2e_plane)
    script = ("echo run; sleep 1; touch /state/started /state/alive; "
              "[ -f /state/second ] && exec sleep 600; touch /state/second; sleep 2; rm /state/alive; exec sleep 600")
    api.create_namespaced_pod(e2e_namespace, pod_obj("probed", [sh(
        "c", script, volumeMounts=[{"name": "state", "mountPath": "/state"}],
        startupProbe={"exec": {"command": ["test", "-f", "/state/started"]}, "periodSeconds": 1,
                      "failureThreshold": 30},
        livenessProbe={"exec": {"command": ["test", "-f", "/state/alive"]}, "periodSeconds": 1,
                       "failureThreshold": 1})], restart="Always", volumes=[{"name": "state", "emptyDir": {}}]))
    e2e_plane.wait(lambda: e2e_plane.pod_log(e2e_namespace, "probed", "c") == "run\n", 60, "first run")
    status = read(e2e_plane, e2e_namespace, "probed").status.container_statuses[0]
    assert status.started is False and status.ready is False       # the marker is 1 s away
    e2e_plane.wait(lambda: read(e2e_plane, e2e_namespace, "probed").status.container_statuses[0].started, 10,
                   "started")

    def restarted():
        s = read(e2e_plane, e2e_namespace, "probed").status.container_statuses[0]
        return s if s.restart_count == 1 and s.ready else None
    status = e2e_plane.wait(restarted, 30, "restarted by the liveness probe, then Ready")
    assert status.last_state.terminated.exit_code == 143 and status.last_state.terminated.reason == "Error"
    assert not Path("/state/started").exists()   # the mount point may exist on the host, empty


def test_headless_service_name_resolves_to_every_ready_pod(e2e_plane, e2e_namespace):
    """A headless Service's name resolves, inside a pod, to the address of every ready pod behind it."""
    api = core(e2e_plane)
    for i in range(2):
        api.create_namespaced_pod(e2e_namespace, pod_obj(f"h-{i}", [{
            "name": "web", "image": "python:3.11", "command": ["python3", "-m", "http.server", "8080"],
            "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}], restart="Always",
            labels={"app": "h"}))
    api.create_namespaced_service(e2e_namespace, {"metadata": {"name": "h"}, "spec": {
        "clusterIP": "None", "selector": {"app": "h"}, "ports": [{"port": 8080}]}})
    ips = sorted(e2e_plane.wait(lambda: [p.status.pod_ip for p in api.list_namespaced_pod(
        e2e_namespace, label_selector="app=h").items if ready(p)] if all(ready(read(e2e_plane, e2e_namespace, f"h-{i}"))
        for i in range(2)) else None, 60, "both Ready"))
    e2e_plane.wait(lambda: sum(len(s.addresses or []) for s in
                               api.read_namespaced_endpoints("h", e2e_namespace).subsets or []) == 2, 30, "2 endpoints")
    resolve = "import socket; print(' '.join(sorted({a[4][0] for a in socket.getaddrinfo('h', 8080)})))"
    api.create_namespaced_pod(e2e_namespace, pod_obj("resolver", [
        {"name": "c", "image": "python:3.11", "command": ["python3", "-c", resolve]}]))
    wait_phase(e2e_plane, e2e_namespace, "resolver")
    assert e2e_plane.pod_log(e2e_namespace, "resolver", "c").split() == ips


def test_a_volume_over_an_ancestor_of_the_checkout_does_not_hide_the_image_environment(e2e_plane, e2e_namespace):
    """Found by a fresh-clone CI run: the clone lived under /tmp and the chart's operator pod mounts an emptyDir at
    /tmp, which hid the checkout and its .venv inside the pod (`exec: loraplane: not found`). Wherever the
    checkout is, a volume mounted over its top-level folder leaves the image table's environment visible, while
    the volume itself is the pod's own (empty, writable)."""
    from harness.node import ROOT

    top = "/" + ROOT.resolve().parts[1]       # e.g. /tmp for /tmp/ci/..., /work for /work/main
    script = (f"import loraplane, pathlib; p = pathlib.Path({top!r}) / 'written-by-pod'; p.write_text('x'); "
              "print('ok')")
    api = core(e2e_plane)
    api.create_namespaced_pod(e2e_namespace, pod_obj("covered", [
        {"name": "main", "image": "python:3.11", "command": ["python3", "-c", script],
         "volumeMounts": [{"name": "scratch", "mountPath": top}]}],
        volumes=[{"name": "scratch", "emptyDir": {}}]))
    pod = wait_phase(e2e_plane, e2e_namespace, "covered")
    log = e2e_plane.pod_log(e2e_namespace, "covered", "main")
    assert pod.status.phase == "Succeeded", log
    assert log.startswith("ok"), log
    assert not (Path(top) / "written-by-pod").exists()   # the write went to the pod's emptyDir, not the host
