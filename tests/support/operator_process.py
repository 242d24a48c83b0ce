"""The real operator (`loraplane operator`) as a subprocess, for the apiserver tests and the benchmark."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from harness.cluster import free_port, stop_process
from support.paths import ROOT


class OperatorProcess:
    """`loraplane operator` against a kubeconfig; the 1.20 test server serves HPA v2beta2 and PDB v1beta1."""

    def __init__(self, kubeconfig: Path, log_path: Path, resync_seconds: float = 3.0, extra_env=None):
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.port = free_port()
        self.resync_seconds = resync_seconds
        self.extra_env = extra_env or {}
        self.image = "loraplane:test"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "OperatorProcess":
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), **self.extra_env}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loraplane.cli", "operator", "--hpa-api-version", "autoscaling/v2beta2",
             "--pdb-api-version", "policy/v1beta1", "--pod-failure-policy", "false", "--metrics-port", str(self.port),
             "--resync-seconds", str(self.resync_seconds), "--image", self.image],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"operator exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"operator not healthy after {timeout}s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no cleanup, the way a node loss or OOM kill ends it."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        stop_process(self.proc)

    def restart(self) -> None:
        self.kill()
        self.start()

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric_sum(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
