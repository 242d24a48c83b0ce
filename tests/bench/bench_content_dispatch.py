"""In-process cost of content routing by rules (issue 15): Python CPU time of `Router.dispatch` per request for a
plain named request and for one routed by bench_orchestration's rules, over its held-out prompts, with
`Exchange.start` stubbed (no I/O: what the router does before the first byte goes to vLLM).

    PYTHONPATH=operator .venv/bin/python tests/bench/bench_content_dispatch.py [ROUNDS] [--profile]

Prints the minimum over ROUNDS (default 9) of CPU µs per request for each and the difference; `--profile` adds
cProfile's top frames per kind. The whole router process (HTTP, upstream) is measured by
bench_orchestration.py --skip-vllm.
"""

from __future__ import annotations

import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "bench"))

import bench_orchestration as bo  # noqa: E402

from loraplane.api.wire.serving import ServingTable  # noqa: E402
from loraplane.router import dispatch as d  # noqa: E402
from loraplane.router.client_protocol import Request  # noqa: E402
from loraplane.router.exchange import Exchange  # noqa: E402
from loraplane.router.replicas import Replica, ReplicaPool  # noqa: E402
from loraplane.router.server import Router  # noqa: E402
from support.orchestration_data import split  # noqa: E402


class _Conn:
    exchange = None
    transport = object()

    def respond_error(self, *args, **kwargs):
        raise AssertionError(f"refused: {args}")


def main() -> int:
    Exchange.start = lambda self: None   # no I/O: the request stops where it would be sent
    pool = ReplicaPool()
    replica = Replica("http://127.0.0.1:9", None)
    replica.engine_ready, replica.polled, replica.ready = True, True, frozenset({"base"})
    pool.replicas = [replica]
    router = Router(pool)
    router.set_table(ServingTable.model_validate(bo.table("base", classifier=None, embedding_url=None)))
    _, held = split()
    bodies = {name: [json.dumps({"model": model, "prompt": p.text, "max_tokens": 1, "temperature": 0}).encode()
                     for p in held] for name, model in (("plain", bo.PLAIN), ("rules", bo.content_name("rules")))}
    conn = _Conn()

    def run(name: str, n: int) -> float:
        bs = bodies[name]
        reqs = []
        for i in range(n):
            q = Request()
            q.method, q.path, q.body = b"POST", b"/v1/completions", [bs[i % len(bs)]]
            q.size = len(q.body[0])
            reqs.append(q)
        started = time.process_time()
        for q in reqs:
            d.dispatch(router, conn, q)
        return (time.process_time() - started) / n * 1e6

    rounds = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 9
    for name in bodies:
        run(name, 2000)
    best = {name: min(run(name, 20000) for _ in range(rounds)) for name in bodies}
    print(f"dispatch CPU per request (min of {rounds} rounds): plain {best['plain']:.2f} us, "
          f"rules {best['rules']:.2f} us, rules add {best['rules'] - best['plain']:+.2f} us")
    if "--profile" in sys.argv:
        for name in bodies:
            prof = cProfile.Profile()
            prof.enable()
            run(name, 50000)
            prof.disable()
            print(f"==== {name}")
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
