"""Child processes of a local run (trainer, vLLM, loader, router): started in their own process group,
logged to a file, waited on over HTTP, and always stopped (Ctrl-C included)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path


class ProcessFailed(RuntimeError):
    """A child process exited or missed its deadline; the message carries its log tail."""

    pass


def _complete_lines(data: bytes) -> tuple[list[bytes], bytes]:
    """`data` split after each \\n or \\r: (the complete lines, with their ending; the rest)."""
    lines, start = [], 0
    for i, byte in enumerate(data):
        if byte in (10, 13):
            lines.append(data[start:i + 1])
            start = i + 1
    return lines, data[start:]


class ManagedProcess:
    """One child process of a local run, in its own session (process group), output appended to `log_path`."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None):
        self.name, self.argv, self.env, self.log_path, self.cwd = name, argv, env, Path(log_path), cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ManagedProcess":
        """Start the process in the background, output to its log; returns self."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # A new session: Ctrl-C in the terminal reaches only us, and we stop the whole group in order.
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.cwd, start_new_session=True)
        return self

    def run_foreground(self, hide: Callable[[bytes], bool] | None = None) -> int:
        """Run to completion, showing the output live (progress bars) and keeping all of it in the log. `hide`:
        lines (each ending in \\n or \\r, so a progress bar still redraws) not to show, e.g. what the caller
        prints itself; the log keeps them."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, cwd=self.cwd, start_new_session=True)
            pending = b""
            for chunk in iter(lambda: self.proc.stdout.read1(4096), b""):
                log.write(chunk)
                pending += chunk
                shown, pending = _complete_lines(pending)
                out = b"".join(line for line in shown if hide is None or not hide(line))
                if out:
                    sys.stderr.buffer.write(out)
                    sys.stderr.flush()
            if pending and (hide is None or not hide(pending)):
                sys.stderr.buffer.write(pending)
                sys.stderr.flush()
            return self.proc.wait()

    @property
    def running(self) -> bool:
        """True while the process has been started and has not exited."""
        return self.proc is not None and self.proc.poll() is None

    def wait_until(self, ready: Callable[[], bool], timeout: float, tick: Callable[[float], None] | None = None,
                   what: str = "ready") -> float:
        """Poll `ready` until it holds; fail early (with the log tail) if the process exits."""
        started = time.monotonic()
        while True:
            elapsed = time.monotonic() - started
            if not self.running:
                code = self.proc.returncode if self.proc else None
                raise ProcessFailed(f"{self.name} exited with code {code} before it was {what}; "
                                    f"log {self.log_path}:\n{self.log_tail()}")
            if ready():
                return elapsed
            if elapsed > timeout:
                raise ProcessFailed(f"{self.name} not {what} after {timeout:.0f}s; log {self.log_path}:\n"
                                    f"{self.log_tail()}")
            if tick:
                tick(elapsed)
            time.sleep(0.5)

    def stop(self, grace: float = 20) -> None:
        """SIGTERM the process group, SIGKILL it after `grace` seconds; nothing when not running."""
        if not self.running:
            return
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash would."""
        if self.running:
            self._signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 40) -> str:
        """The last `lines` lines of the log (empty when it cannot be read)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_ok(url: str, timeout: float = 2) -> bool:
    """True when a GET of `url` answers 2xx within `timeout` seconds; False on errors and other statuses."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except OSError:
        return False
