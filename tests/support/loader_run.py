"""Run the loader as users do (`python -m loraplane.loader --table FILE`) beside a test vLLM server."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from harness.cluster import stop_process
from loraplane.api.wire.serving import DesiredAdapter, ServingTable
from loraplane.local.tinymodel import MODEL_NAME
from support.vllm_server import VllmServer, free_port

SETTLED = ("Ready", "Incompatible", "Failed")


def desired(name: str, path: Path, version: str = "v1", **kw) -> DesiredAdapter:
    return DesiredAdapter(served_name=f"{name}--{version}", adapter=name, version=version, uri=str(path),
                          base_model=kw.pop("base_model", MODEL_NAME), **kw)


class LoaderRun:
    def __init__(self, server: VllmServer, workdir: Path, *extra_args: str):
        self.server = server
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.table_path = self.workdir / "serving.json"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args)
        self.generation = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "loader.log"

    def set_table(self, adapters: list[DesiredAdapter]) -> ServingTable:
        """Write a new table (atomically, as a ConfigMap update would arrive) and return it."""
        self.generation += 1
        engine = self.server.route.spec.engine
        table = ServingTable(route="tiny", generation=self.generation, base_model=MODEL_NAME,
                             served_model_name=self.server.served_name, model_path=str(self.server.model_dir),
                             max_lora_rank=engine.max_lora_rank, max_loras=engine.max_loras, adapters=adapters)
        tmp = self.table_path.with_suffix(".tmp")
        tmp.write_text(table.to_json())
        os.replace(tmp, self.table_path)
        return table

    def start(self) -> None:
        if not self.table_path.exists():
            self.set_table([])
        cmd = [sys.executable, "-m", "loraplane.loader", "--table", str(self.table_path),
               "--vllm-url", self.server.base_url, "--cache-dir", str(self.workdir / "cache"),
               "--port", str(self.port), "--host", "127.0.0.1", "--pod-name", "replica-0", *self.extra_args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self.wait(lambda s: s is not None, timeout=60)

    def stop(self) -> None:
        stop_process(self.proc)

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=5) as resp:
            return resp.read().decode()

    def status(self) -> dict | None:
        try:
            return json.loads(self.get("/status"))
        except OSError:
            return None

    def wait(self, predicate, timeout: float = 120, interval: float = 0.1) -> dict:
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"loader exited: {self.log_tail()}")
            status = self.status()
            if predicate(status):
                return status
            time.sleep(interval)
        raise TimeoutError(f"loader status never matched; last: {json.dumps(status, indent=1)}\n{self.log_tail()}")

    def wait_settled(self, timeout: float = 120) -> dict:
        """Until the current table is applied and every adapter is in a final state on a live engine."""
        return self.wait(lambda s: s is not None and s["generation"] == self.generation and s["engine_ready"]
                         and all(a["state"] in SETTLED for a in s["adapters"].values()), timeout)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@contextlib.contextmanager
def ready_loader(server: VllmServer, workdir: Path, adapters: dict[str, Path]):
    """A LoaderRun beside `server` whose table lists each of `adapters` (name -> artifact directory) as version v1,
    started and settled with every one Ready (AssertionError otherwise); stopped on exit."""
    run = LoaderRun(server, workdir)
    try:
        run.set_table([desired(name, path) for name, path in adapters.items()])
        run.start()
        status = run.wait_settled(timeout=300)
        assert {n: a["state"] for n, a in status["adapters"].items()} == {f"{n}--v1": "Ready" for n in adapters}
        yield run
    finally:
        run.stop()


def openai(server: VllmServer, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(server.base_url + path, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def complete(server: VllmServer, model: str, prompt: str, max_tokens: int = 12) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return openai(server, "/v1/completions", body)["choices"][0]["text"]


def engine_adapters(server: VllmServer) -> set[str]:
    return {m["id"] for m in openai(server, "/v1/models")["data"] if m.get("parent")}
