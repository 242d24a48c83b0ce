"""A real Kubernetes control plane for tests: etcd + kube-apiserver + kube-controller-manager (+ kube-scheduler).

The binaries are built once from Debian's source package by build_kube.sh and cached outside the clone.
By default (the `apiserver` tests) there is no scheduler and no kubelet: pods stay Pending unless a test plays
the kubelet by patching status, and the controller-manager runs CONTROLLERS (garbage collection, namespace
deletion, service-account tokens, Jobs, Deployments/ReplicaSets).

`Cluster(..., bind_address=<test bridge address>).start(controllers=USER_CONTROLLERS, scheduler=True)` is the
control plane of the `e2e` tests (tests/support/e2e.py): the controllers a user's cluster runs for our objects
(add Services → Endpoints/EndpointSlices, PVC binding, the root-CA ConfigMap, pod GC) and the real scheduler;
tests/harness/node.py then plays the kubelet. The API server is served with a certificate of our own CA
(`Cluster.ca_file`) valid for 127.0.0.1, the bind address, the `kubernetes` Service's first IP and
kubernetes.default.svc[.cluster.local], so in-cluster clients in pods verify TLS as they would in a cluster.
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
# What a user's cluster runs for our objects (FineTuneJob → Job → Pods + PVC; ModelRoute → Deployment →
# ReplicaSet → Pods, Services → Endpoints): the e2e control plane. `persistentvolume-binder` binds the claims
# the node stand-in provisions volumes for; `root-ca-cert-publisher` writes kube-root-ca.crt in every namespace;
# `nodelifecycle` lifts the not-ready taint the API server puts on new Nodes once they report Ready;
# `horizontalpodautoscaling` runs the HPAs of autoscaled routes (without a metrics API here: it must not fight the
# router's wake-up from zero, tests/e2e/test_flows.py test_scale_from_zero).
USER_CONTROLLERS = CONTROLLERS + (",endpoint,endpointslice,endpointslicemirroring,statefulset,cronjob,"
                                  "ttl-after-finished,podgc,persistentvolume-binder,pvc-protection,"
                                  "root-ca-cert-publisher,disruption,nodelifecycle,horizontalpodautoscaling")
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
KUBERNETES_SERVICE_IP = "10.0.0.1"   # the first address of SERVICE_CLUSTER_IP_RANGE: the `kubernetes` Service


BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")


def ensure_binaries() -> Path:
    """Build (first time, ~10-15 min; only the missing ones later) or find the cached kube binaries; returns
    their folder."""
    if any(not (BIN / b).exists() for b in BINARIES) or shutil.which("etcd") is None:
        subprocess.run(["bash", str(HERE / "build_kube.sh"), str(CACHE)], check=True)
    return BIN


def make_serving_cert(workdir: Path, ips: list[str], dns: list[str]) -> tuple[Path, Path, Path]:
    """A test CA and an API-server serving certificate signed by it, valid for `ips` and `dns` names.

    Returns (ca.crt, apiserver.crt, apiserver.key) under `workdir` (EC P-256 keys: fast to make). Raises
    CalledProcessError (with openssl's output) when openssl fails."""
    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=workdir)

    ca_key, ca_crt = workdir / "ca.key", workdir / "ca.crt"
    key, csr, crt = workdir / "apiserver.key", workdir / "apiserver.csr", workdir / "apiserver.crt"
    ossl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(ca_key))
    ossl("req", "-x509", "-new", "-key", str(ca_key), "-subj", "/CN=loraplane-test-ca", "-days", "7",
         "-out", str(ca_crt))
    ossl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key))
    ossl("req", "-new", "-key", str(key), "-subj", "/CN=kube-apiserver", "-out", str(csr))
    san = ",".join([*(f"IP:{ip}" for ip in ips), *(f"DNS:{d}" for d in dns)])
    ext = workdir / "apiserver.ext"
    ext.write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature\n")
    ossl("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial",
         "-days", "7", "-extfile", str(ext), "-out", str(crt))
    return ca_crt, crt, key


@dataclass
class Cluster:
    """etcd + kube-apiserver + kube-controller-manager (+ kube-scheduler) as child processes, logs in
    `workdir/logs`. `bind_address`: where the API server listens (loopback, or a test bridge address so pods in
    network namespaces reach it too)."""

    workdir: Path
    port: int = 0
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    bind_address: str = "127.0.0.1"

    @property
    def server(self) -> str:
        return f"https://{self.bind_address}:{self.port}"

    @property
    def ca_file(self) -> Path:
        """The CA that signed the API server's serving certificate (what pods get as ca.crt)."""
        return self.workdir / "ca.crt"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    def kubeconfig_for_token(self, token: str, path: Path) -> Path:
        """Write a kubeconfig for `token` at `path` (TLS verified against `ca_file` once the cluster made it)."""
        tls = f'certificate-authority: "{self.ca_file}"' if self.ca_file.exists() else "insecure-skip-tls-verify: true"
        path.write_text(f"""apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {{server: "{self.server}", {tls}}}
users:
- name: user
  user: {{token: "{token}"}}
contexts:
- name: test
  context: {{cluster: test, user: user, namespace: default}}
current-context: test
""")
        return path

    def start(self, controllers: str = CONTROLLERS, scheduler: bool = False, pod_admission: bool = False,
              apiserver_args: tuple[str, ...] = ()) -> "Cluster":
        """Start the processes and wait for /readyz; `controllers` is kube-controller-manager's --controllers,
        `scheduler` also starts kube-scheduler. `pod_admission` turns on what a user's API server does to pods
        (the ServiceAccount admission plugin, with BoundServiceAccountTokenVolume: every pod gets the projected
        kube-api-access volume — TokenRequest token, kube-root-ca.crt, namespace — as from v1.21 on); off, pods
        are stored as written (the `apiserver` tests, which never run pods). `apiserver_args` are added to
        kube-apiserver's (e.g. an admission plugin). Raises RuntimeError (with the log tail) if a process exits."""
        bin_dir = ensure_binaries()
        w = self.workdir
        (w / "logs").mkdir(parents=True, exist_ok=True)
        _, serving_crt, serving_key = make_serving_cert(
            w, sorted({"127.0.0.1", self.bind_address, KUBERNETES_SERVICE_IP}),
            ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
             "kubernetes.default.svc.cluster.local"])
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
            f"--bind-address={self.bind_address}", f"--advertise-address={self.bind_address}",
            f"--secure-port={self.port}", "--insecure-port=0",
            f"--tls-cert-file={serving_crt}", f"--tls-private-key-file={serving_key}",
            f"--token-auth-file={w / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={w / 'sa.pub'}",
            f"--service-account-signing-key-file={w / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            *(["--feature-gates=BoundServiceAccountTokenVolume=true"] if pod_admission
              else ["--disable-admission-plugins=ServiceAccount"]),
            "--enable-priority-and-fairness=false",
            *apiserver_args,
        ])
        self.kubeconfig_for_token(ADMIN_TOKEN, self.kubeconfig)
        self._wait_ready()
        # The CA that signed the serving certificate: what service-account Secrets and kube-root-ca.crt carry.
        self._spawn("kube-controller-manager", [
            str(bin_dir / "kube-controller-manager"),
            f"--kubeconfig={self.kubeconfig}", "--leader-elect=false", "--port=0", "--secure-port=0",
            f"--controllers={controllers}",
            f"--service-account-private-key-file={w / 'sa.key'}",
            f"--root-ca-file={self.ca_file}",
            "--concurrent-gc-syncs=5",
        ])
        if scheduler:
            self._spawn("kube-scheduler", [
                str(bin_dir / "kube-scheduler"), f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
                "--port=0", "--secure-port=0",
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
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
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
