"""Session-wide fixtures. Expensive servers (kube-apiserver, vLLM) start once per session, not per test.

Area-specific fixtures live in tests/support/*.py and are registered here as plugins.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # `harness` and `support` are importable from tests and benchmarks

# Training and inference on these 2-core machines: one thread is much faster than two fighting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest_plugins = [
    "support.kube",
    "support.tiny_model",
    "support.vllm_server",
    "support.s3",
    "support.e2e",
]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT
