"""What a CPU-only machine adds to the vLLM container the builders make. Nothing else differs from a replica
in the cluster; tests (tests/support/vllm_server.py) and `loraplane run` both start vLLM through here."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from loraplane.builders.common import SCRATCH_ENV

CPU_ENGINE_ENV = {
    "VLLM_TARGET_DEVICE": "cpu",
    "HF_HUB_OFFLINE": "1",           # local models only; never reach for the hub
    "OMP_NUM_THREADS": "1",          # shared 2-core machines: one thread is faster than two fighting
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    # The CPU build runs the model eagerly anyway (compilation mode NONE); what remains of torch.compile are
    # sampler helpers compiled lazily on first use: the first request asking for log-probabilities (every
    # loader smoke test) paid 2 s on a quiet 2-core box, up to 20 s on a busy one, importing and running
    # inductor. Eager, the same request takes milliseconds (docs/loader.md, "Readiness").
    "TORCH_COMPILE_DISABLE": "1",
}
# A small KV cache instead of a GPU memory fraction (VLLM_CPU_KVCACHE_SPACE takes whole GiB only).
CPU_ENGINE_ARGS = ["--kv-cache-memory-bytes", "128M", "--host", "127.0.0.1"]


def engine_process(command: list[str], env: list[dict[str, Any]], port: int, hf_home: Path) -> tuple[list[str], dict]:
    """The builder's vLLM command/env made runnable here: this venv's python, CPU env, small KV cache, a local
    port (argparse keeps the last --port/--host) and a local HF_HOME instead of the pod's model volume."""
    argv = [sys.executable, *command[1:], *CPU_ENGINE_ARGS, "--port", str(port)]
    full_env = dict(os.environ)
    # HOME and TMPDIR point at the pod's scratch volume in a cluster; here the process keeps its own.
    full_env.update({e["name"]: e["value"] for e in env if "value" in e and e["name"] not in SCRATCH_ENV})
    full_env.update(CPU_ENGINE_ENV)
    full_env["HF_HOME"] = str(hf_home)
    return argv, full_env
