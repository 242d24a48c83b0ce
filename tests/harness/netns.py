"""Network plumbing of the node stand-in (tests/harness/node.py, which plays the kubelet in `e2e` tests): one
test bridge per test run, one network namespace + veth per pod, and the sweep of what a crashed run left.

Only addresses of the test bridge (a /24 out of 10.213.0.0/16 that no route of the machine covers) and
loopback are used. Every name carries the run id, so concurrent test runs on one machine never touch each
other's objects, and the sweep removes only runs whose owning process is gone:

    bridge      lpbr<run>             host side address 10.213.K.1/24
    namespace   lpn<run>-<n>          pod address 10.213.K.<n+1>, eth0 inside, default route via the bridge
    veth        lpv<run><n>           host end, attached to the bridge
    state       /run/loraplane-node/<run>/   owner.pid, mountpoints (host folders created as bind targets)

Needs root, iproute2 (`ip`) and util-linux (`unshare`, `nsenter`, `mount`); tests/bootstrap.sh installs them.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

STATE_ROOT = Path("/run/loraplane-node")
SUPERNET = ipaddress.ip_network("10.213.0.0/16")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `ip ARGS`; raises RuntimeError with ip's stderr when it fails and `check` is set."""
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def available() -> str | None:
    """None when this machine can run the node stand-in; otherwise why not (for pytest.skip)."""
    if os.geteuid() != 0:
        return "the node stand-in needs root (network and mount namespaces)"
    for tool in ("ip", "unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"the node stand-in needs `{tool}` (tests/bootstrap.sh installs iproute2/util-linux)"
    return None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): with the pid, an identity
    that a reused pid does not share. None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = ip("-4", "-o", "addr", "show").stdout + ip("-4", "route", "show", "table", "all", check=False).stdout
    nets = []
    for token in out.split():
        if "/" in token or token.count(".") == 3:
            try:
                nets.append(ipaddress.ip_network(token, strict=False))
            except ValueError:
                pass
    return nets


@dataclass
class Bridge:
    """The test bridge of one run: `name`, host address `gateway` in `network` (a /24)."""

    run_id: str
    name: str
    network: ipaddress.IPv4Network
    state_dir: Path

    @property
    def gateway(self) -> str:
        """The host side address (where the API server and the hosts' `kubernetes.default.svc` point)."""
        return str(self.network.network_address + 1)

    @classmethod
    def create(cls) -> "Bridge":
        """Sweep leftovers of dead runs, then create this run's bridge on a /24 no route of the machine uses."""
        sweep()
        run_id = secrets.token_hex(2)
        state = STATE_ROOT / run_id
        state.mkdir(parents=True, exist_ok=False)
        (state / "owner.pid").write_text(str(os.getpid()))
        used = _used_networks()
        start = int(run_id, 16) % 256
        for k in range(256):
            net = ipaddress.ip_network(f"10.213.{(start + k) % 256}.0/24")
            if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
                break
        else:
            raise RuntimeError("no free /24 in 10.213.0.0/16 for the test bridge")
        bridge = cls(run_id, f"lpbr{run_id}", net, state)
        ip("link", "add", bridge.name, "type", "bridge")
        ip("addr", "add", f"{bridge.gateway}/24", "dev", bridge.name)
        ip("link", "set", bridge.name, "up")
        return bridge

    def to_json(self) -> str:
        """What the node agent process needs to use this bridge (Bridge.from_json reads it)."""
        return json.dumps({"run_id": self.run_id, "name": self.name, "network": str(self.network),
                           "state_dir": str(self.state_dir)})

    @classmethod
    def from_json(cls, text: str) -> "Bridge":
        b = json.loads(text)
        return cls(b["run_id"], b["name"], ipaddress.ip_network(b["network"]), Path(b["state_dir"]))

    def netns_name(self, n: int) -> str:
        return f"lpn{self.run_id}-{n}"

    def veth_name(self, n: int) -> str:
        return f"lpv{self.run_id}{n}"

    def pod_address(self, n: int) -> str:
        """The address of pod slot `n` (1..253)."""
        if not 1 <= n <= 253:
            raise ValueError(f"pod slot {n} outside 1..253")
        return str(self.network.network_address + 1 + n)

    def add_pod(self, n: int, hosts: str) -> tuple[str, str]:
        """Create namespace + veth for pod slot `n` with `hosts` as its /etc/hosts; returns (netns, address)."""
        ns, veth, addr = self.netns_name(n), self.veth_name(n), self.pod_address(n)
        self.remove_pod(n)
        etc = Path("/etc/netns") / ns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(hosts)
        # No DNS server: names resolve from the hosts file only; a lookup that misses fails at once.
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        ip("netns", "add", ns)
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("link", "set", veth, "master", self.name, "up")
        ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "route", "add", "default", "via", self.gateway)
        return ns, addr

    def remove_pod(self, n: int) -> None:
        """Kill what still runs in pod slot `n`'s namespace and remove namespace, veth and /etc/netns files."""
        _remove_netns(self.netns_name(n))
        ip("link", "del", self.veth_name(n), check=False)

    def remember_process(self, pid: int) -> None:
        """Record a process of this run (control plane, node agent) so the sweep of a crashed run kills it."""
        with open(self.state_dir / "processes", "a") as f:
            f.write(f"{pid} {_start_time(pid)}\n")

    def remember_mountpoint(self, path: str) -> None:
        """Record a host folder/file created as a bind target, so the sweep removes it (when still empty)."""
        with open(self.state_dir / "mountpoints", "a") as f:
            f.write(path + "\n")

    def destroy(self) -> None:
        """Remove every namespace, link and mount point of this run, and the run's state folder."""
        _destroy_run(self.run_id)


def _remove_netns(ns: str) -> None:
    pids = ip("netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    ip("netns", "del", ns, check=False)
    shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


def _destroy_run(run_id: str) -> None:
    state = STATE_ROOT / run_id
    processes = state / "processes"
    if processes.exists():
        for line in processes.read_text().splitlines():
            pid, _, started = line.partition(" ")
            if pid.isdigit() and int(pid) != os.getpid() and _start_time(int(pid)) == started:
                try:
                    os.killpg(int(pid), signal.SIGKILL) if os.getpgid(int(pid)) == int(pid) \
                        else os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass
    for ns in ip("netns", "list", check=False).stdout.split("\n"):
        name = ns.split(" ")[0]
        if name.startswith(f"lpn{run_id}-"):
            _remove_netns(name)
    for line in ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            name = parts[1].strip().split("@")[0]
            if name.startswith(f"lpv{run_id}"):
                ip("link", "del", name, check=False)
    ip("link", "del", f"lpbr{run_id}", check=False)
    record = state / "mountpoints"
    if record.exists():
        # Deepest first; only what is empty (a folder) or empty (a file) is ours to remove.
        for path in sorted(set(record.read_text().split()), key=len, reverse=True):
            p = Path(path)
            try:
                if p.is_dir() and not p.is_symlink():
                    p.rmdir()
                elif p.is_file() and p.stat().st_size == 0:
                    p.unlink()
            except OSError:
                pass
    shutil.rmtree(state, ignore_errors=True)


def sweep() -> list[str]:
    """Remove the objects of every earlier run whose owner process is gone (a crashed or killed test run);
    returns their run ids. Objects of live runs (a concurrent test session) are left alone."""
    swept = []
    # Objects whose run has no state folder at all (it was removed by hand): nobody owns them.
    names = [line.split(" ")[0] for line in ip("netns", "list", check=False).stdout.splitlines()]
    names += [line.split(":")[1].strip().split("@")[0] for line in ip("-o", "link", "show", check=False)
              .stdout.splitlines() if line.count(":") >= 2]
    orphans = {m.group(1) for n in names if (m := re.match(r"lp(?:n|v|br)([0-9a-f]{4})", n))}
    for run_id in orphans:
        if not (STATE_ROOT / run_id).exists():
            _destroy_run(run_id)
            swept.append(run_id)
    if STATE_ROOT.exists():
        for state in STATE_ROOT.iterdir():
            try:
                owner = int((state / "owner.pid").read_text())
            except (OSError, ValueError):
                owner = 0
            if owner and _pid_alive(owner):
                continue
            _destroy_run(state.name)
            swept.append(state.name)
    return swept
