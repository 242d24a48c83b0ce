"""Router overhead, side by side in one run: direct to the backend, our router, vllm-router, LiteLLM proxy.

    .venv/bin/python tests/bench/bench_router.py [--duration 3] [--rounds 3] [--only ours,vllm-router]
    .venv/bin/python tests/bench/bench_router.py --vllm     # real vLLM backend: router throughput vs direct

Every target is measured with the same load generator against the same fast stub backend (two stub
replicas answering canned OpenAI completions in microseconds), so what shows is each proxy's own cost.
Proxies run on core 0; stubs and the load generator on core 1 (taskset). Runs are interleaved: each
round measures every target once per phase, so drift on this shared machine hits all alike.

Reported per target: CPU time per proxied request (utime+stime of the proxy's process tree over all
phases / requests), latency p50/p99 at concurrency 1 and what it adds over direct, requests/s at 16 and
64 concurrent connections.

Our router runs with every routing feature on: API key check, weighted canary split (90/10), sticky
header (varying per request), adapter-aware least-loaded replica choice over two replicas polled every
second, metrics per model and backend, usage token counting.

"floor (no features)" (`run_floor`) is a minimal uvloop + httptools proxy that does nothing but relay: no
proxy built on this event loop and parser costs less here, so it splits our CPU per request into the part no
code of ours can remove (the kernel's loopback TCP, mostly in the two sends, which also deliver the segment
and wake the peer, plus one loop pass and two parses) and what the routing features cost (`ours - floor`).

vllm-router (PyPI `vllm-router`, the vLLM project's Rust router) and LiteLLM (`litellm[proxy]`) pin
dependencies that conflict with ours: they go into a separate venv, ~/.cache/loraplane/bench-venv, made
on first run.

Exits 3 when our CPU per request is above TARGET_CPU_RATIO (0.5) times vllm-router round-robin's (issue 17's
target), 0 otherwise. Not met: three consecutive default runs on 2026-12-07 measured 0.72, 0.77 and 0.73 (ours
30-33 us, vllm-router round-robin 40-43 us, the floor 16-17 us: 0.39-0.40 of vllm-router), each exit 3. Most of
a request's CPU here is the kernel's (the loopback sends); our routing features cost 13-16 us above the floor,
and 0.5 would need them at ~4 us (docs/router.md, "Design and cost", has the profile). Compiling the request path
with Cython as it is, or dropping the one extra syscall per request (the pre-reuse poll), measured no gain
(docs/router.md lists the runs): the target needs the request path out of CPython.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH_VENV = Path.home() / ".cache" / "loraplane" / "bench-venv"
# Exact versions: a benchmark must be repeatable (and litellm had compromised releases on PyPI: pin one
# known good).
PEERS = ["vllm-router==0.1.17", "litellm[proxy]==1.81.13"]
PROXY_CORE, LOAD_CORE = "0", "1"

COMPLETION = json.dumps({
    "id": "cmpl-bench", "object": "text_completion", "created": 1, "model": "m",
    "choices": [{"index": 0, "text": " hello there, this is a canned completion", "logprobs": None,
                 "finish_reason": "length", "stop_reason": None}],
    "usage": {"prompt_tokens": 5, "total_tokens": 21, "completion_tokens": 16}}).encode()
MODELS = json.dumps({"object": "list", "data": [{"id": n, "object": "model", "created": 1, "owned_by": "vllm"}
                                                 for n in ("base", "v1", "v2")]}).encode()
METRICS = (b'vllm:num_requests_running{engine="0",model_name="base"} 0.0\n'
           b'vllm:num_requests_waiting{engine="0",model_name="base"} 0.0\n')


# ---- the stub backend and the load generator: uvloop + httptools (C parser), microseconds per request ----

def run_stub(port: int) -> None:
    import httptools
    import uvloop

    def response(body: bytes, ctype: bytes = b"application/json") -> bytes:
        return (b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\n\r\n" + body)

    canned = {b"/v1/models": response(MODELS), b"/metrics": response(METRICS, b"text/plain"),
              b"/health": response(b"")}
    completion = response(COMPLETION)

    class Stub(asyncio.Protocol):
        def connection_made(self, transport):
            self.t = transport
            self.p = httptools.HttpRequestParser(self)
            self.url = b""

        def on_url(self, url):
            self.url = url

        def on_message_complete(self):
            self.t.write(canned.get(self.url.split(b"?")[0], completion))
            if not self.p.should_keep_alive():
                self.t.close()

        def data_received(self, data):
            try:
                self.p.feed_data(data)
            except httptools.HttpParserError:
                self.t.close()

    async def main():
        server = await asyncio.get_running_loop().create_server(Stub, "127.0.0.1", port, backlog=1024)
        await server.serve_forever()

    uvloop.run(main())


def run_floor(port: int, upstream_ports: list[int]) -> None:
    """The floor under any proxy built like ours: a minimal uvloop + httptools HTTP/1.1 proxy with no feature at
    all (no key, no routing, no rewrite, no metrics, no usage): each client connection gets one kept-alive
    upstream connection (round robin over the stubs on first use); a request's bytes go up as they came and the
    answer's bytes come back as they came, each after one parse. What it costs is the kernel's loopback TCP (two
    sends, two receives, the wake-ups of the peers) plus one event-loop pass and two parses per request: no
    proxy on this event loop and parser can cost less, so `ours - floor` is what the routing features cost."""
    import httptools
    import uvloop

    turn = [0]

    def nodelay(transport):
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    class Up(asyncio.Protocol):
        def __init__(self, client):
            self.client, self.parser, self.buf = client, httptools.HttpResponseParser(self), []

        def connection_made(self, transport):
            self.t = transport
            nodelay(transport)

        def data_received(self, data):
            self.buf.append(data)
            self.parser.feed_data(data)

        def on_message_complete(self):
            self.client.t.write(b"".join(self.buf))
            self.buf = []

    class Client(asyncio.Protocol):
        def connection_made(self, transport):
            self.t, self.parser, self.buf, self.up = transport, httptools.HttpRequestParser(self), [], None
            nodelay(transport)

        def data_received(self, data):
            self.buf.append(data)
            self.parser.feed_data(data)

        def on_message_complete(self):
            data, self.buf = b"".join(self.buf), []
            if self.up is not None:
                self.up.t.write(data)
                return
            turn[0] += 1
            asyncio.get_running_loop().create_task(self.connect(data, upstream_ports[turn[0] % len(upstream_ports)]))

        async def connect(self, data, upstream_port):
            _, self.up = await asyncio.get_running_loop().create_connection(lambda: Up(self), "127.0.0.1",
                                                                             upstream_port)
            self.up.t.write(data)

    async def main():
        server = await asyncio.get_running_loop().create_server(Client, "127.0.0.1", port, backlog=1024)
        await server.serve_forever()

    uvloop.run(main())


def run_load(url: str, concurrency: int, duration: float, requests: list[bytes]) -> dict:
    """Closed-loop load: `concurrency` keep-alive connections, each sending the next request when the
    previous answer is complete. Returns latencies (s) and status counts."""
    import httptools
    import uvloop
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    stop_at = [0.0]

    class Client(asyncio.Protocol):
        def __init__(self, idx):
            self.i = idx
            self.done = asyncio.get_running_loop().create_future()

        def connection_made(self, transport):
            self.t = transport
            self.send()

        def send(self):
            self.p = httptools.HttpResponseParser(self)
            self.t0 = time.perf_counter()
            self.t.write(requests[self.i % len(requests)])
            self.i += concurrency

        def on_message_complete(self):
            now = time.perf_counter()
            latencies.append(now - self.t0)
            code = self.p.get_status_code()
            statuses[code] = statuses.get(code, 0) + 1
            if now < stop_at[0]:
                self.send()
            else:
                self.t.close()

        def data_received(self, data):
            self.p.feed_data(data)

        def connection_lost(self, exc):
            if not self.done.done():
                self.done.set_result(None)

    async def main():
        loop = asyncio.get_running_loop()
        stop_at[0] = time.perf_counter() + duration
        conns = [await loop.create_connection(lambda i=i: Client(i), parts.hostname, parts.port)
                 for i in range(concurrency)]
        await asyncio.wait_for(asyncio.gather(*(p.done for _, p in conns)), duration + 60)

    started = time.perf_counter()
    uvloop.run(main())
    return {"latencies": latencies, "statuses": statuses, "elapsed": time.perf_counter() - started}


def build_requests(host: str, path: str, model: str, headers: dict[str, str], sticky: str | None) -> list[bytes]:
    body = json.dumps({"model": model, "prompt": "Say hello to the benchmark", "max_tokens": 16}).encode()
    out = []
    for i in range(64):
        h = {"Host": host, "Content-Type": "application/json", "Content-Length": str(len(body)), **headers}
        if sticky:
            h[sticky] = f"user-{i}"
        out.append(f"POST {path} HTTP/1.1\r\n".encode()
                   + "".join(f"{k}: {v}\r\n" for k, v in h.items()).encode() + b"\r\n" + body)
    return out


# ---- process helpers ----

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen, ok=(200,), headers=None) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}")
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status in ok:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not answering after {timeout}s")


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime of a process and all its descendants (children reaped included)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system + getattr(t, "children_user", 0) + getattr(t, "children_system", 0)
        except psutil.NoSuchProcess:
            pass
    return total


def start(cmd: list[str], core: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(["taskset", "-c", core, *cmd], stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def ensure_bench_venv() -> Path:
    marker = BENCH_VENV / ".loraplane-peers"
    if marker.exists() and marker.read_text() == "\n".join(PEERS):
        return BENCH_VENV
    print(f"creating {BENCH_VENV} with {', '.join(PEERS)} (once; a few minutes)", flush=True)
    if BENCH_VENV.exists():
        shutil.rmtree(BENCH_VENV)
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", str(BENCH_VENV)], check=True)
    subprocess.run([str(BENCH_VENV / "bin" / "pip"), "install", "-q", *PEERS], check=True)
    marker.write_text("\n".join(PEERS))
    return BENCH_VENV


# Our router's CPU per request against vllm-router's round-robin, with every feature of ours on (issue 17: the
# router is what the project exists for, measured against the best peer). The run exits 3 above it.
TARGET_CPU_RATIO = 0.5

# ---- targets ----

class Target:
    name = ""
    proc: subprocess.Popen | None = None
    port = 0
    path = "/v1/completions"
    model = "chat"
    headers: dict[str, str] = {}
    sticky: str | None = None

    def requests(self) -> list[bytes]:
        return build_requests(f"127.0.0.1:{self.port}", self.path, self.model, self.headers, self.sticky)

    def cpu(self) -> float:
        return tree_cpu_seconds(self.proc.pid) if self.proc else 0.0

    def close(self) -> None:
        if self.proc:
            stop(self.proc)


class Direct(Target):
    name = "direct"
    model = "v1"

    def __init__(self, stub_port: int):
        self.port = stub_port


class Ours(Target):
    name = "ours"
    sticky = "X-Session"
    headers = {"Authorization": "Bearer bench-key"}

    def __init__(self, stub_ports: list[int], work: Path):
        (work / "keys").write_text("bench-key\nanother-key\n")
        table = {"route": "bench", "generation": 1, "base_model": "tiny", "served_model_name": "base",
                 "max_lora_rank": 16, "max_loras": 4,
                 "models": [{"name": "chat", "backends": [{"served_name": "v1", "adapter": "a", "weight": 90},
                                                          {"served_name": "v2", "adapter": "a", "weight": 10}]}],
                 "router": {"sticky_header": "X-Session"}}
        (work / "serving.json").write_text(json.dumps(table))
        self.port = free_port()
        cmd = [sys.executable, "-m", "loraplane.router", "--table", str(work / "serving.json"),
               "--api-keys-file", str(work / "keys"), "--host", "127.0.0.1", "--port", str(self.port),
               "--log-level", "WARNING"]
        for p in stub_ports:
            cmd += ["--replica", f"http://127.0.0.1:{p},none"]
        self.proc = start(cmd, PROXY_CORE, work / "ours.log")
        wait_http(f"http://127.0.0.1:{self.port}/readyz", 60, self.proc)


class Floor(Target):
    """`run_floor`: the least any proxy on uvloop + httptools costs here (not a router: no verdict on it)."""
    name = "floor (no features)"
    model = "v1"

    def __init__(self, stub_ports: list[int], work: Path):
        self.port = free_port()
        self.proc = start([sys.executable, __file__, "--_floor", str(self.port), *map(str, stub_ports)], PROXY_CORE,
                          work / "floor.log")
        wait_http(f"http://127.0.0.1:{self.port}/health", 30, self.proc)


class VllmRouter(Target):
    name = "vllm-router"

    def __init__(self, venv: Path, stub_ports: list[int], work: Path, policy: str = "round_robin"):
        self.name = f"vllm-router {policy.replace('_', '-')}"
        self.port = free_port()
        cmd = [str(venv / "bin" / "vllm-router"), "--host", "127.0.0.1", "--port", str(self.port),
               "--policy", policy, "--worker-urls", *[f"http://127.0.0.1:{p}" for p in stub_ports],
               "--prometheus-port", str(free_port())]
        self.proc = start(cmd, PROXY_CORE, work / f"vllm-router-{policy}.log")
        wait_http(f"http://127.0.0.1:{self.port}/health", 60, self.proc)


class LiteLLM(Target):
    name = "litellm"

    def __init__(self, venv: Path, stub_ports: list[int], work: Path):
        self.port = free_port()
        cfg = {"model_list": [{"model_name": "chat",
                               "litellm_params": {"model": "text-completion-openai/v1",
                                                  "api_base": f"http://127.0.0.1:{p}/v1", "api_key": "x"}}
                              for p in stub_ports],
               "litellm_settings": {"drop_params": True, "set_verbose": False},
               "general_settings": {}}
        (work / "litellm.yaml").write_text(json.dumps(cfg))
        cmd = [str(venv / "bin" / "litellm"), "--config", str(work / "litellm.yaml"), "--host", "127.0.0.1",
               "--port", str(self.port), "--num_workers", "1"]
        self.proc = start(cmd, PROXY_CORE, work / "litellm.log",
                          env={"LITELLM_LOG": "ERROR", "DISABLE_SCHEMA_UPDATE": "true", "LITELLM_TELEMETRY": "False",
                               # no network here: use the cost map shipped in the wheel
                               "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
        wait_http(f"http://127.0.0.1:{self.port}/health/liveliness", 180, self.proc)


def load(target: Target, concurrency: int, duration: float) -> dict:
    """Run the load generator in its own process on the load core; returns its result."""
    payload = json.dumps({"url": f"http://127.0.0.1:{target.port}", "concurrency": concurrency,
                          "duration": duration, "requests": [r.decode("latin-1") for r in target.requests()]})
    out = subprocess.run(["taskset", "-c", LOAD_CORE, sys.executable, __file__, "--_load"], input=payload.encode(),
                         capture_output=True, check=True)
    return json.loads(out.stdout)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def bench_real_vllm(args) -> int:
    """Requests/s with a real vLLM backend, direct vs through our router (interleaved rounds)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from loraplane.local.tinymodel import tiny_model_path
    from support.vllm_server import VllmServer, tiny_route

    work = Path(tempfile.mkdtemp(prefix="bench-router-vllm-"))
    model_dir = tiny_model_path()
    server = VllmServer(tiny_route(model_dir), model_dir, work / "vllm")
    targets: list[Target] = []
    try:
        print(f"vLLM started in {server.start():.0f}s", file=sys.stderr)
        direct = Direct(server.port)
        direct.model = server.served_name
        ours = Ours.__new__(Ours)
        (work / "keys").write_text("bench-key\n")
        table = {"route": "bench", "generation": 1, "base_model": "tiny", "served_model_name": server.served_name,
                 "max_lora_rank": 16, "max_loras": 4,
                 "models": [{"name": "chat", "backends": [{"served_name": server.served_name, "weight": 100}]}],
                 "router": {"sticky_header": "X-Session"}}
        (work / "serving.json").write_text(json.dumps(table))
        ours.port = free_port()
        ours.proc = start([sys.executable, "-m", "loraplane.router", "--table", str(work / "serving.json"),
                           "--api-keys-file", str(work / "keys"), "--host", "127.0.0.1", "--port", str(ours.port),
                           "--log-level", "WARNING", "--replica", f"{server.base_url},none"], "0-1", work / "ours.log")
        wait_http(f"http://127.0.0.1:{ours.port}/readyz", 60, ours.proc)
        targets = [direct, ours]
        for t in targets:
            res = load(t, 4, 2.0)
            if set(res["statuses"]) != {"200"}:
                raise RuntimeError(f"{t.name}: warm-up answered {res['statuses']}; see logs in {work}")
        rps: dict[str, list[float]] = {t.name: [] for t in targets}
        cpu = {t.name: [0.0, 0] for t in targets}
        for rnd in range(args.rounds):
            for t in targets:
                before = t.cpu()
                res = load(t, 8, args.duration)
                cpu[t.name][0] += t.cpu() - before
                cpu[t.name][1] += len(res["latencies"])
                rps[t.name].append(len(res["latencies"]) / res["elapsed"])
            print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(f"{n} {v[-1]:.1f} req/s" for n, v in rps.items()),
                  file=sys.stderr, flush=True)
        d, o = statistics.median(rps["direct"]), statistics.median(rps["ours"])
        print(f"\nreal vLLM (CPU, tiny model, 16 tokens per request, 8 concurrent; {args.rounds} interleaved rounds "
              f"x {args.duration:g}s): direct {d:.1f} req/s, through our router {o:.1f} req/s: ratio {o / d:.3f} "
              f"(target >= 0.97); router CPU {cpu['ours'][0] / max(1, cpu['ours'][1]) * 1e6:.0f} us/request")
    finally:
        for t in targets:
            t.close()
        server.stop()
    return 0


def verdict(summary: dict[str, dict]) -> tuple[list[str], bool]:
    """The lines that judge a run (`summary`: target name -> its row, `cpu_us_per_request` in it) and whether
    the target was missed: ours / vllm-router round-robin's CPU per request against TARGET_CPU_RATIO, and, when
    the floor ran, where that ratio's floor lies and what our routing features cost above it."""
    lines, missed = [], False
    ours = summary.get("ours")
    for name, row in summary.items():
        if not name.startswith("vllm-router round") or ours is None:
            continue
        ratio = ours["cpu_us_per_request"] / row["cpu_us_per_request"]
        missed |= not ratio <= TARGET_CPU_RATIO   # NaN (nothing measured) misses too
        lines.append(f"ours / {name}: CPU per request x{ratio:.2f} "
                     f"({'within' if ratio <= TARGET_CPU_RATIO else 'ABOVE'} the target of <= {TARGET_CPU_RATIO})")
        floor = summary.get(Floor.name)
        if floor is not None:
            lines.append(f"{Floor.name} / {name}: x{floor['cpu_us_per_request'] / row['cpu_us_per_request']:.2f} "
                         "(no proxy on this event loop and parser can go below it); ours - floor: "
                         f"{ours['cpu_us_per_request'] - floor['cpu_us_per_request']:.1f} us of routing features "
                         "per request")
    return lines, missed


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--_load":
        spec = json.loads(sys.stdin.read())
        res = run_load(spec["url"], spec["concurrency"], spec["duration"],
                       [r.encode("latin-1") for r in spec["requests"]])
        out = (json.dumps(res) + "\n").encode()
        while out:  # after uvloop.run a write to the pipe can come back short; print() then lost the rest
            out = out[os.write(1, out):]
        return 0
    if len(sys.argv) > 2 and sys.argv[1] == "--_stub":
        run_stub(int(sys.argv[2]))
        return 0
    if len(sys.argv) > 3 and sys.argv[1] == "--_floor":
        run_floor(int(sys.argv[2]), [int(p) for p in sys.argv[3:]])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated subset: direct,floor,ours,vllm-router,litellm")
    ap.add_argument("--vllm-router-policies", default="round_robin,cache_aware")
    ap.add_argument("--vllm", action="store_true",
                    help="instead: throughput through our router vs direct against a real vLLM (CPU) server on the "
                         "tiny model (starts it: 1-2 minutes)")
    args = ap.parse_args()
    if args.vllm:
        return bench_real_vllm(args)
    wanted = set(filter(None, args.only.split(","))) or {"direct", "floor", "ours", "vllm-router", "litellm"}
    if os.cpu_count() < 2:
        print("needs 2 cores (proxies and load on different cores)", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="bench-router-"))
    stubs, targets = [], []
    try:
        ports = [free_port(), free_port()]
        for p in ports:
            proc = start([sys.executable, __file__, "--_stub", str(p)], LOAD_CORE, work / f"stub-{p}.log")
            stubs.append(proc)
            wait_http(f"http://127.0.0.1:{p}/health", 30, proc)
        if "direct" in wanted:
            targets.append(Direct(ports[0]))
        if "floor" in wanted:
            targets.append(Floor(ports, work))
        if "ours" in wanted:
            targets.append(Ours(ports, work))
        if wanted & {"vllm-router", "litellm"}:
            venv = ensure_bench_venv()
            if "vllm-router" in wanted:
                for policy in filter(None, args.vllm_router_policies.split(",")):
                    targets.append(VllmRouter(venv, ports, work, policy))
            if "litellm" in wanted:
                targets.append(LiteLLM(venv, ports, work))
        for t in targets:  # warm up (connections, caches, JITs) and check that it answers 200
            res = load(t, 4, 1.0)
            if set(res["statuses"]) != {"200"}:
                raise RuntimeError(f"{t.name}: warm-up answered {res['statuses']}; see logs in {work}")

        phases = [1, 16, 64]
        results = {t.name: {c: [] for c in phases} for t in targets}
        cpu = {t.name: {c: [0.0, 0] for c in phases} for t in targets}   # CPU seconds, requests per phase
        for rnd in range(args.rounds):
            for c in phases:
                for t in targets:
                    before = t.cpu()
                    res = load(t, c, args.duration if t.name != "litellm" else max(args.duration, 3.0))
                    cpu[t.name][c][0] += t.cpu() - before
                    n = len(res["latencies"])
                    cpu[t.name][c][1] += n
                    bad = {k: v for k, v in res["statuses"].items() if k != "200"}
                    if bad:
                        print(f"  {t.name} c={c}: non-200 answers {bad}", file=sys.stderr)
                    results[t.name][c].append({"rps": n / res["elapsed"], "p50": percentile(res["latencies"], .5),
                                               "p99": percentile(res["latencies"], .99)})
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)

        def med(name, c, key):
            return statistics.median(r[key] for r in results[name][c])

        direct50 = med("direct", 1, "p50") if "direct" in results else 0.0
        direct99 = med("direct", 1, "p99") if "direct" in results else 0.0
        print(f"\nrouter overhead vs a stub backend ({args.rounds} interleaved rounds x {args.duration:g}s per "
              f"phase; medians; proxy on core {PROXY_CORE}, stubs + load on core {LOAD_CORE})")
        hdr = f"{'target':28} {'CPU/req':>10} {'p50 c=1':>9} {'+p50':>8} {'p99 c=1':>9} {'+p99':>8} " \
              f"{'req/s c=16':>11} {'req/s c=64':>11}"
        print(hdr)
        print("-" * len(hdr))
        summary = {}

        def cpu_us_of(t, cs):
            secs, n = sum(cpu[t.name][c][0] for c in cs), sum(cpu[t.name][c][1] for c in cs)
            return secs / max(1, n) * 1e6 if t.proc else float("nan")

        for t in targets:
            cpu_us = cpu_us_of(t, phases)
            p50, p99 = med(t.name, 1, "p50"), med(t.name, 1, "p99")
            row = {"cpu_us_per_request": cpu_us, "p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3,
                   "added_p50_ms": (p50 - direct50) * 1e3, "added_p99_ms": (p99 - direct99) * 1e3,
                   "rps_16": med(t.name, 16, "rps"), "rps_64": med(t.name, 64, "rps"),
                   # The same CPU per request by concurrency: the total above weighs each by its request count.
                   "cpu_us_per_request_by_concurrency": {c: cpu_us_of(t, [c]) for c in phases}}
            summary[t.name] = row
            cpu_s = "-" if t.proc is None else (f"{cpu_us:8.0f}us" if cpu_us < 10000 else f"{cpu_us / 1000:7.1f}ms")
            print(f"{t.name:28} {cpu_s:>10} {row['p50_ms']:8.3f}m {row['added_p50_ms']:7.3f}m "
                  f"{row['p99_ms']:8.3f}m {row['added_p99_ms']:7.3f}m {row['rps_16']:11.0f} {row['rps_64']:11.0f}")
        print("\nCPU per request by concurrency:")
        for t in targets:
            if t.proc is not None and t.name != "litellm":
                by_c = summary[t.name]["cpu_us_per_request_by_concurrency"]
                print(f"  {t.name:26} " + "  ".join(f"c={c} {v:5.1f}us" for c, v in by_c.items()))
        lines, missed = verdict(summary)
        print("\n" + "\n".join(lines) if lines else "")
        (work / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"(logs and summary.json in {work})")
        if missed:
            return 3
    finally:
        for t in targets:
            t.close()
        for s in stubs:
            stop(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
