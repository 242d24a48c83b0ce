"""Benchmark of the trainer against a bare peft training loop, and peak memory of LoRA vs QLoRA.

    OMP_NUM_THREADS=1 .venv/bin/python tests/bench/bench_trainer.py [--steps 150] [--rounds 3]

1. Step time: our trainer (transformers Trainer + our data pipeline, callbacks, progress sinks, checkpoint
   marker) vs the smallest correct peft loop (same model, LoRA config, data, collator, optimizer, batch size),
   on the tiny model, interleaved rounds in one process. A step is timed from one step end to the next, so
   data loading, logging and callbacks count; the first steps (warm-up) and the final save do not.
   Reported: median step time of each and their ratio (target <= 1.05), in wall-clock time and in this
   process's CPU time (steadier when other work shares the machine).
2. Peak memory, LoRA vs QLoRA (4-bit NF4): each in a fresh subprocess training a few steps on a randomly
   initialised ~100M-parameter Llama (the tiny model is too small for weights to matter), through the real
   trainer. Reported: weight bytes of the loaded model; peak RSS above the post-import baseline (sampled every
   5 ms) while loading and while training, with its anonymous part (fp32 LoRA weights stay in the mmapped
   safetensors file, so they count as file pages; 4-bit weights are anonymous memory); and torch.cuda peak
   allocations when a GPU is present (the number that matters for GPU sizing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Step time is measured on two models: the tiny test model (~0.5 M parameters, ~25 ms steps: the trainer's fixed
# per-step cost dominates) and a small one (~8 M parameters) whose steps are still CPU-sized but closer to real
# training, where that fixed cost is a smaller share. Both are reported.
SMALL = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=256)
MEDIUM = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
              num_key_value_heads=4, max_position_embeddings=256)


def bare_peft_loop(model_dir: Path, data: Path, steps: int, seed: int) -> list[float]:
    """The reference: a hand-written loop doing the same work, timestamps at each step end."""
    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraplane.api.finetunejob import DatasetSpec
    from loraplane.trainer import data as datamod

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = datamod.tokenize(datamod.read_file(data, "bench"), DatasetSpec(uri="/x"), tok, 128).rows
    collate = datamod.PaddingCollator(tok.pad_token_id)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                      task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    model.train()
    order: list[int] = []
    rng = random.Random(seed)
    stamps = [_now()]
    for _ in range(steps):
        if len(order) < 8:
            fresh = list(range(len(rows)))
            rng.shuffle(fresh)
            order += fresh
        batch = collate([rows[i] for i in order[:8]])
        del order[:8]
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # Trainer clips at 1.0 by default too
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # what a loop that logs its loss pays (Trainer reads it at each logging step)
        stamps.append(_now())
    return stamps


def our_trainer(model_dir: Path, data: Path, steps: int, seed: int, work: Path) -> list[float]:
    from loraplane.local.tinymodel import quick_job
    from loraplane.trainer import resolve_runtime, run_training
    from loraplane.trainer.progress import LocalSink

    from transformers import TrainerCallback

    stamps: list[tuple[float, float]] = []

    class StepClock(TrainerCallback):  # runs after our own callbacks at every step end
        def on_step_begin(self, args, state, control, **kwargs):
            if not stamps:
                stamps.append(_now())

        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(_now())

    job = quick_job(model_dir, data, steps=steps, seed=seed, learningRate=1e-3, checkpointEverySteps=steps)
    runtime = resolve_runtime(job, output_dir=work / "adapter", checkpoint_dir=work / "ck",
                              progress_file=work / "progress.json", progress_bar=False)
    # Our real local sink (JSON progress file) is part of what is measured.
    run_training(job, runtime, sinks=[LocalSink(runtime.progress_file, bar=False)], callbacks=[StepClock()])
    return stamps


def _now() -> tuple[float, float]:
    """Wall-clock and this process's CPU time: on a shared machine the CPU time is the steadier measure."""
    return time.perf_counter(), time.process_time()


def step_times(stamps: list[tuple[float, float]], warmup: int = 10) -> list[tuple[float, float]]:
    deltas = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:])]
    return deltas[warmup:]


def bench_steps(model_dir: Path, steps: int, rounds: int) -> dict:
    import shutil

    from loraplane.local.tinymodel import TOY_PHRASES, write_toy_dataset

    ours, bare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_toy_dataset(Path(tmp) / "train.jsonl", TOY_PHRASES[0], 256)
        for r in range(rounds):
            bare += step_times(bare_peft_loop(model_dir, data, steps, seed=r))
            work = Path(tmp) / f"run{r}"
            ours += step_times(our_trainer(model_dir, data, steps, seed=r, work=work))
            shutil.rmtree(work)
    out: dict = {"steps_per_round": steps, "rounds": rounds}
    for i, kind in enumerate(("wall", "cpu")):
        b, o = [d[i] for d in bare], [d[i] for d in ours]
        out[kind] = {"bare_peft_ms": round(statistics.median(b) * 1e3, 2),
                     "trainer_ms": round(statistics.median(o) * 1e3, 2),
                     "ratio": round(statistics.median(o) / statistics.median(b), 3),
                     "bare_p90_ms": round(statistics.quantiles(b, n=10)[-1] * 1e3, 2),
                     "trainer_p90_ms": round(statistics.quantiles(o, n=10)[-1] * 1e3, 2)}
    return out


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child_memory(method: str, model_dir: Path, work: Path) -> dict:
    """In a fresh process: train 3 steps with `method` and report memory."""
    import peft  # noqa: F401 - imports before the baseline
    import torch
    import transformers  # noqa: F401
    from transformers import Trainer  # noqa: F401

    from loraplane.local.tinymodel import TOY_PHRASES, write_toy_dataset
    from loraplane.local.tinymodel import quick_job
    from loraplane.trainer import resolve_runtime
    from loraplane.trainer import model as modelmod
    from loraplane.trainer.run import run_training

    weights: dict[str, int] = {}
    original = modelmod.wrap_peft

    def measure(model, job):  # weight bytes of the loaded (possibly quantised) base model
        weights["bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        return original(model, job)

    modelmod.wrap_peft = measure
    data = write_toy_dataset(work / "train.jsonl", TOY_PHRASES[0], 32)
    job = quick_job(model_dir, data, method=method, steps=3, target_modules=None, batchSize=4,
                    gradientCheckpointing=True, checkpointEverySteps=100)
    runtime = resolve_runtime(job, output_dir=work / "adapter", checkpoint_dir=work / "ck", progress_bar=False)
    from transformers import TrainerCallback

    marks: dict[str, int] = {}
    peaks = {(p, f): 0 for p in ("load", "train") for f in ("VmRSS", "RssAnon")}
    phase = ["load"]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for f in ("VmRSS", "RssAnon"):
                peaks[phase[0], f] = max(peaks[phase[0], f], _status_kib(f))
            stop.wait(0.005)

    class TrainBegins(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            phase[0] = "train"
            if torch.cuda.is_available():
                marks["cuda_load"] = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()

    baseline = {f: _status_kib(f) for f in ("VmRSS", "RssAnon")}
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run_training(job, runtime, sinks=[], callbacks=[TrainBegins()])
    finally:
        stop.set()
        sampler.join()
    out = {"method": method, "weight_mib": round(weights["bytes"] / 2**20, 1),
           **{f"{p}_peak_{'rss' if f == 'VmRSS' else 'anon'}_mib": round((peaks[p, f] - baseline[f]) / 1024, 1)
              for p in ("load", "train") for f in ("VmRSS", "RssAnon")}}
    if torch.cuda.is_available():
        out["cuda_load_peak_mib"] = round(marks["cuda_load"] / 2**20, 1)
        out["cuda_train_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def build_medium_model(path: Path, dims: dict = MEDIUM) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraplane.local.tinymodel import tiny_model_path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **dims))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def bench_memory() -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_medium_model(Path(tmp) / "medium")
        for method in ("lora", "qlora"):
            work = Path(tmp) / method
            work.mkdir()
            proc = subprocess.run([sys.executable, __file__, "--child", method, str(model_dir), str(work)],
                                  capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"{method} child failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--tiny-only", action="store_true", help="step time on the tiny model only")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "MODEL", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, model_dir, work = args.child
        print(json.dumps(child_memory(method, Path(model_dir), Path(work))))
        return 0
    import logging

    logging.disable(logging.WARNING)
    from loraplane.local.tinymodel import tiny_model_path

    report: dict = {"step_time": {}}
    with tempfile.TemporaryDirectory() as tmp:
        models = {"tiny": tiny_model_path()}
        if not args.tiny_only:
            models["small"] = build_medium_model(Path(tmp) / "small", SMALL)
        for label, model_dir in models.items():
            n = args.steps if label == "tiny" else max(20, args.steps // 5)
            steps = report["step_time"][label] = bench_steps(model_dir, n, args.rounds)
            for kind in ("wall", "cpu"):
                t = steps[kind]
                print(f"step time {label:5s} ({kind:4s})  bare peft loop {t['bare_peft_ms']} ms  |  loraplane trainer "
                      f"{t['trainer_ms']} ms  |  ratio {t['ratio']} (target <= 1.05; median over {args.rounds} "
                      f"interleaved rounds x {n} steps; p90 {t['bare_p90_ms']} / {t['trainer_p90_ms']} ms)")
    if not args.skip_memory:
        mem = bench_memory()
        for m in mem:
            cuda = (f"  CUDA peak load {m['cuda_load_peak_mib']} / train {m['cuda_train_peak_mib']} MiB"
                    if "cuda_train_peak_mib" in m else "")
            print(f"memory     {m['method']:5s}  weights {m['weight_mib']} MiB  peak RSS above the post-import baseline "
                  f"(anonymous part): loading {m['load_peak_rss_mib']} ({m['load_peak_anon_mib']}) MiB, training "
                  f"{m['train_peak_rss_mib']} ({m['train_peak_anon_mib']}) MiB{cuda}")
        lora, qlora = mem
        print(f"memory     qlora/lora  weights {qlora['weight_mib'] / lora['weight_mib']:.3f}  training peak RSS "
              f"{qlora['train_peak_rss_mib'] / max(lora['train_peak_rss_mib'], 1e-9):.3f}")
        report["memory"] = mem
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "operator"))
    sys.exit(main())
