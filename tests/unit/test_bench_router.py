"""tests/bench/bench_router.py's verdict and its floor proxy: the exit code says whether issue 17's target holds,
and the floor that splits our CPU per request into kernel + loop cost and routing features is a working proxy
(a floor that dropped or garbled answers would be cheap for the wrong reason)."""

from __future__ import annotations

import http.client
import importlib.util
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_router.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_router", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows(**cpu: float) -> dict:
    names = {"ours": "ours", "rr": "vllm-router round-robin", "ca": "vllm-router cache-aware",
             "floor": "floor (no features)"}
    return {names[k]: {"cpu_us_per_request": v} for k, v in cpu.items()}


def test_verdict_judges_against_round_robin_only(bench):
    lines, missed = bench.verdict(rows(ours=30.0, rr=40.0, ca=20.0))
    assert missed   # 0.75 of round robin; cache-aware (0.5 x 20 = 10) is not the anchor, nor what passes it
    assert lines == ["ours / vllm-router round-robin: CPU per request x0.75 (ABOVE the target of <= 0.5)"]
    lines, missed = bench.verdict(rows(ours=20.0, rr=40.0))
    assert not missed and "within" in lines[0]


def test_verdict_misses_when_nothing_was_measured(bench):
    # A target that answered nothing has NaN CPU per request: that is no evidence the target holds.
    _, missed = bench.verdict(rows(ours=math.nan, rr=40.0))
    assert missed


def test_verdict_places_the_floor(bench):
    lines, missed = bench.verdict(rows(floor=15.0, ours=28.0, rr=40.0))
    assert missed
    assert lines[1].startswith("floor (no features) / vllm-router round-robin: x0.38 ")
    assert lines[1].endswith("ours - floor: 13.0 us of routing features per request")


def test_floor_proxy_relays_answers_whole_on_kept_alive_connections(bench, tmp_path):
    stub_port, floor_port = bench.free_port(), bench.free_port()
    procs = [subprocess.Popen([sys.executable, str(BENCH), "--_stub", str(stub_port)])]
    try:
        bench.wait_http(f"http://127.0.0.1:{stub_port}/health", 30, procs[0])
        procs.append(subprocess.Popen([sys.executable, str(BENCH), "--_floor", str(floor_port), str(stub_port)]))
        bench.wait_http(f"http://127.0.0.1:{floor_port}/health", 30, procs[1])
        conn = http.client.HTTPConnection("127.0.0.1", floor_port, timeout=10)
        body = b'{"model": "v1", "prompt": "hi", "max_tokens": 16}'
        for _ in range(3):   # one connection: each answer is relayed whole and the next request goes up after it
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (200, bench.COMPLETION)
        conn.request("GET", "/v1/models")
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, bench.MODELS)
        conn.close()
    finally:
        for p in procs:
            p.terminate()
        deadline = time.monotonic() + 10
        for p in procs:
            p.wait(max(0.1, deadline - time.monotonic()))
