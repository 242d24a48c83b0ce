"""Fixtures for tests marked `e2e`: one control plane with a real scheduler and a node stand-in per session.

    def test_x(e2e_plane, e2e_namespace):
        e2e_plane.api                # kubernetes.client.ApiClient, cluster-admin
        e2e_plane.kubeconfig         # admin kubeconfig (for `kubectl --kubeconfig`, kopf, helm)
        e2e_plane.server             # https://<bridge address>:<port>, reachable from the host and from pods
        e2e_plane.cluster            # harness.cluster.Cluster (ca_file, kubeconfig_for_token(token, path), ...)
        e2e_plane.bridge             # harness.netns.Bridge (gateway = the host's address on the test bridge)
        e2e_plane.nodes              # ["node-1"]: Node names the stand-in registered (taint/label them freely)
        e2e_plane.pod_log(ns, pod, container, restart=None)   # like `kubectl logs [--previous]`
        e2e_plane.pod_log_path(...)  # the file itself (container stdout+stderr)
        e2e_plane.wait(fn, timeout, what)  # poll fn() until truthy; returns its value; TimeoutError with `what`
        e2e_namespace                # a fresh namespace (deleted afterwards; pods are stopped by the node)

Start-up order: the test bridge (tests/harness/netns.py, which first sweeps what crashed runs left) → etcd,
kube-apiserver bound to the bridge address, kube-controller-manager with USER_CONTROLLERS, kube-scheduler
(tests/harness/cluster.py) → the node agent process (tests/harness/node.py; its module docstring documents what
it does, the image table and its limits). Everything stops in reverse order at session end, from a pytest
finalizer and, should that not run, from atexit; a run killed outright is swept by the next one.

Tests are skipped (with the reason) where the stand-in cannot run: not root, or `ip`/`unshare` missing
(tests/bootstrap.sh installs them on CI). The node's container restart back-off is shortened to
E2E_BACKOFF_BASE seconds (the kubelet's is 10 s) so crash-loop tests stay short.
"""

from __future__ import annotations

import atexit
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness.cluster import USER_CONTROLLERS, Cluster, stop_process
from harness.netns import Bridge, available
from harness.node import pod_log, pod_log_path

NODE_SCRIPT = Path(__file__).resolve().parents[1] / "harness" / "node.py"
E2E_BACKOFF_BASE = 2.0
E2E_BACKOFF_MAX = 20.0


@dataclass
class E2EPlane:
    """A running control plane + node stand-in (see the module docstring for the attributes)."""

    workdir: Path
    bridge: Bridge
    cluster: Cluster
    nodes: list[str]
    agent: subprocess.Popen | None = None
    api: Any = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def kubeconfig(self) -> Path:
        return self.cluster.kubeconfig

    @property
    def server(self) -> str:
        return self.cluster.server

    @property
    def node_workdir(self) -> Path:
        return self.workdir / "node"

    def pod_log(self, namespace: str, pod: str, container: str, restart: int | None = None) -> str:
        return pod_log(self.node_workdir, namespace, pod, container, restart)

    def pod_log_path(self, namespace: str, pod: str, container: str, restart: int | None = None) -> Path | None:
        return pod_log_path(self.node_workdir, namespace, pod, container, restart)

    def agent_log(self) -> str:
        p = self.workdir / "agent.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def wait(self, fn: Callable[[], Any], timeout: float = 60, what: str = "condition", tick: float = 0.2) -> Any:
        """Poll `fn` until it returns something truthy (returned); TimeoutError naming `what` otherwise. Fails
        at once with the agent's log tail if the node agent died."""
        deadline = time.monotonic() + timeout
        while True:
            value = fn()
            if value:
                return value
            if self.agent is not None and self.agent.poll() is not None:
                raise RuntimeError(f"the node agent exited ({self.agent.returncode}):\n{self.agent_log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not reached in {timeout:.0f}s")
            time.sleep(tick)

    def start(self, nodes: int = 1) -> "E2EPlane":
        t0 = time.monotonic()
        self.cluster.start(controllers=USER_CONTROLLERS, scheduler=True, pod_admission=True)
        for p in self.cluster.procs.values():
            self.bridge.remember_process(p.pid)
        self.timings["control_plane_s"] = time.monotonic() - t0
        from kubernetes import client, config
        self.api = config.new_client_from_config(config_file=str(self.cluster.kubeconfig))
        bridge_json = self.workdir / "bridge.json"
        bridge_json.write_text(self.bridge.to_json())
        argv = [sys.executable, str(NODE_SCRIPT), "--kubeconfig", str(self.cluster.kubeconfig),
                "--workdir", str(self.node_workdir), "--bridge-json", str(bridge_json),
                "--api-port", str(self.cluster.port), "--ca-file", str(self.cluster.ca_file),
                "--owner-pid", str(__import__("os").getpid()),
                "--backoff-base", str(E2E_BACKOFF_BASE), "--backoff-max", str(E2E_BACKOFF_MAX)]
        for n in self.nodes:
            argv += ["--node", n]
        with open(self.workdir / "agent.log", "ab") as out:
            self.agent = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.bridge.remember_process(self.agent.pid)
        core = client.CoreV1Api(self.api)

        def nodes_ready() -> bool:
            ready = 0
            for n in core.list_node().items:
                conds = {c.type: c.status for c in n.status.conditions or []}
                ready += n.metadata.name in self.nodes and conds.get("Ready") == "True"
            return ready == len(self.nodes)
        self.wait(nodes_ready, 60, "nodes Ready")
        # Pods need the `default` ServiceAccount (token) and the scheduler must see the node: wait for both.
        self.wait(lambda: any(sa.metadata.name == "default" for sa in
                              core.list_namespaced_service_account("default").items), 60, "default ServiceAccount")
        self.timings["plane_and_node_s"] = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Stop the node agent (it stops every pod and removes their namespaces), then the control plane, then
        the bridge and whatever a crashed process left in it. Safe to call twice."""
        if self.agent is not None:
            stop_process(self.agent, grace=60)
            self.agent = None
        if self.api is not None:
            self.api.close()
            self.api = None
        self.cluster.stop()
        self.bridge.destroy()


def start_plane(workdir: Path, nodes: list[str] | None = None) -> E2EPlane:
    """Create the bridge, start control plane + node stand-in; stops what it started if start-up fails."""
    bridge = Bridge.create()
    plane = E2EPlane(workdir, bridge, Cluster(workdir / "kube", bind_address=bridge.gateway), nodes or ["node-1"])
    atexit.register(plane.stop)
    try:
        return plane.start()
    except BaseException:
        plane.stop()
        raise


@pytest.fixture(scope="session")
def e2e_plane(tmp_path_factory) -> E2EPlane:
    """The session's control plane with a real scheduler and the node stand-in (see the module docstring)."""
    why = available()
    if why:
        pytest.skip(why)
    plane = start_plane(tmp_path_factory.mktemp("e2e"))
    print(f"\ne2e control plane + node ready in {plane.timings['plane_and_node_s']:.1f}s "
          f"(control plane {plane.timings['control_plane_s']:.1f}s) at {plane.server}")
    try:
        yield plane
    finally:
        plane.stop()


_ns_counter = iter(range(1_000_000))


@pytest.fixture
def e2e_namespace(e2e_plane) -> str:
    """A fresh namespace on the e2e control plane; deleted afterwards (its pods stopped by the node)."""
    from kubernetes import client

    core = client.CoreV1Api(e2e_plane.api)
    name = f"e2e{int(time.time()) % 100000}-{next(_ns_counter)}"
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)
