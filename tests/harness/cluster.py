"""A real Kubernetes control plane for tests: etcd + kube-apiserver + kube-controller-manager on loopback.

The binaries are built once from Debian's source package by build_kube.sh and cached outside the clone.
There is no scheduler and no kubelet: pods stay Pending unless a test plays the kubelet by patching status.
The controller-manager runs the controllers whose behaviour users rely on (garbage collection, namespace
deletion, service-account tokens, Jobs, Deployments/ReplicaSets).
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from loraplane.local.processes import free_port  # noqa: E402  (re-exported for tests)

HERE = Path(__file__).resolve().parent
KUBE_VERSION = "v1.20.2"
CACHE = Path(os.environ.get("LORAPLANE_CACHE", Path.home() / ".cache" / "loraplane"))
BIN = CACHE / f"kube-{KUBE_VERSION}" / "bin"
ADMIN_TOKEN = "loraplane-test-admin-token"
CONTROLLERS = "garbagecollector,namespace,serviceaccount,serviceaccount-token,job,deployment,replicaset"


def ensure_binaries() -> Path:
    """Build (first time, ~10-15 min) or find the cached kube binaries; returns their folder."""
    if not (BIN / "kube-apiserver").exists() or not (BIN / "kube-controller-manager").exists() \
            or shutil.which("etcd") is None:
        subprocess.run(["bash", str(HERE / "build_kube.sh"), str(CACHE)], check=True)
    return BIN


@dataclass
class Cluster:
    workdir: Path
    port: int = 0
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    def kubeconfig_for_token(self, token: str, path: Path) -> Path:
        path.write_text(f"""apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {{server: "{self.server}", insecure-skip-tls-verify: true}}
users:
- name: user
  user: {{token: "{token}"}}
contexts:
- name: test
  context: {{cluster: test, user: user, namespace: default}}
current-context: test
""")
        return path

    def start(self, controllers: str = CONTROLLERS, apiserver_args: tuple[str, ...] = ()) -> "Cluster":
        """Start etcd, kube-apiserver (with `apiserver_args` added, e.g. an admission plugin) and the
        controller-manager running `controllers`; returns self once the apiserver is ready."""
        bin_dir = ensure_binaries()
        w = self.workdir
        (w / "logs").mkdir(parents=True, exist_ok=True)
        subprocess.run(["openssl", "genrsa", "-out", str(w / "sa.key"), "2048"], check=True,
                       capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", str(w / "sa.key"), "-pubout", "-out", str(w / "sa.pub")],
                       check=True, capture_output=True)
        (w / "tokens.csv").write_text(f'{ADMIN_TOKEN},admin,admin,"system:masters"\n')
        etcd_port, peer_port = free_port(), free_port()
        self.port = free_port()
        self._spawn("etcd", [
            "etcd", "--data-dir", str(w / "etcd"), "--name", "test",
            "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"test=http://127.0.0.1:{peer_port}",
            "--unsafe-no-fsync",  # test data: durability costs seconds per test on a slow disk
        ])
        self._spawn("kube-apiserver", [
            str(bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={self.port}", "--insecure-port=0",
            f"--cert-dir={w / 'certs'}",
            f"--token-auth-file={w / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={w / 'sa.pub'}",
            f"--service-account-signing-key-file={w / 'sa.key'}",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--disable-admission-plugins=ServiceAccount",
            "--enable-priority-and-fairness=false",
            *apiserver_args,
        ])
        self.kubeconfig_for_token(ADMIN_TOKEN, self.kubeconfig)
        self._wait_ready()
        # The serving cert is self-signed by the apiserver; the token controller needs a CA file to put in
        # service-account Secrets, and any PEM will do for tests that talk with insecure-skip-tls-verify.
        certs = sorted((w / "certs").glob("*.crt"))
        self._spawn("kube-controller-manager", [
            str(bin_dir / "kube-controller-manager"),
            f"--kubeconfig={self.kubeconfig}", "--leader-elect=false", "--port=0", "--secure-port=0",
            f"--controllers={controllers}",
            f"--service-account-private-key-file={w / 'sa.key'}",
            f"--root-ca-file={certs[0]}",
            "--concurrent-gc-syncs=5",
        ])
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.workdir / "logs" / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def _wait_ready(self, timeout: float = 90) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}; see {self.workdir}/logs/{name}.log:\n"
                                       + (self.workdir / "logs" / f"{name}.log").read_text()[-3000:])
            req = urllib.request.Request(f"{self.server}/readyz",
                                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            try:
                with urllib.request.urlopen(req, context=ctx, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"kube-apiserver not ready after {timeout}s; logs in {self.workdir}/logs")

    def stop(self) -> None:
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            stop_process(self.procs.pop(name, None), grace=10)


def stop_process(proc: subprocess.Popen | None, grace: float = 15) -> None:
    """SIGTERM `proc` if it still runs, SIGKILL it after `grace` seconds, and reap it (None: nothing to do)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_cluster(workdir: Path | None = None) -> Cluster:
    workdir = workdir or Path(tempfile.mkdtemp(prefix="loraplane-kube-"))
    return Cluster(workdir).start()


if __name__ == "__main__":  # manual use: python tests/harness/cluster.py  -> prints a kubeconfig path
    c = start_cluster()
    print(f"KUBECONFIG={c.kubeconfig}  (Ctrl-C stops it)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        c.stop()
