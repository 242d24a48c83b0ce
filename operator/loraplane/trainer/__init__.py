"""The trainer: a FineTuneJob in, a PEFT adapter directory (plus provenance.json) out.

Run it as `python -m loraplane.trainer --config finetunejob.yaml` (what the pod runs) or
`loraplane train -f finetunejob.yaml`. Library use:

    from loraplane.trainer import run_training, load_job, resolve_runtime
    result = run_training(job, resolve_runtime(job, output_dir=Path("out")))

Heavy imports (torch, transformers, peft) happen inside the functions, so importing this package is cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from loraplane.artifacts import sha256_dir as artifact_sha256
from loraplane.trainer.config import Runtime, job_from_dict, load_job, resolve_runtime
from loraplane.trainer.errors import (
    EXIT_CODES,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_PREEMPTED,
    DatasetAccessDenied,
    DatasetNotFound,
    DatasetUnavailable,
    InvalidConfig,
    InvalidDataset,
    ModelNotFound,
    OutOfMemory,
    OutputWriteFailed,
    TargetModulesNotFound,
    TrainerError,
)


def run_training(job, runtime, sinks=None, callbacks=None):
    """See loraplane.trainer.run.run_training."""
    from loraplane.trainer.run import run_training as _run

    return _run(job, runtime, sinks, callbacks)


def quick_job(model_dir: Path, dataset: Path, *, name: str = "tiny-adapter", fmt: str = "instruction", r: int = 8,
              target_modules: Sequence[str] | None = ("q_proj", "v_proj"), steps: int = 40, seed: int = 0,
              learning_rate: float = 1e-2, batch_size: int = 8, method: str = "lora",
              dataset_options: dict | None = None, method_options: dict | None = None, **training):
    """A FineTuneJob for short runs on small local models (tests, quickstart): fp32, constant LR, no
    checkpointing until the end. `training` keywords are spec.training fields by their wire names."""
    return job_from_dict({
        "apiVersion": "loraplane.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": str(Path(model_dir).absolute())},
            "dataset": {"uri": str(Path(dataset).absolute()), "format": fmt, **(dataset_options or {})},
            "method": {"type": method, "r": r, "alpha": 2 * r, "dropout": 0.0, **(method_options or {}),
                       **({"targetModules": list(target_modules)} if target_modules else {})},
            "training": {"maxSteps": steps, "learningRate": learning_rate, "batchSize": batch_size,
                         "maxSeqLength": 128, "seed": seed, "precision": "fp32", "gradientCheckpointing": False,
                         "warmupRatio": 0.0, "lrScheduler": "constant", "checkpointEverySteps": steps, **training},
            "output": {"adapterName": name},
        },
    })


def train_adapter_quick(model_dir: Path, out_dir: Path, phrase: str, r: int = 8,
                        target_modules: Sequence[str] = ("q_proj", "v_proj"), steps: int = 40,
                        seed: int = 0) -> Path:
    """Train a small adapter teaching `phrase` (toy instruction data) with the real trainer; returns out_dir."""
    import shutil
    import tempfile

    from loraplane.tinymodel import write_toy_dataset

    out_dir = Path(out_dir).absolute()
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.work-", dir=out_dir.parent if out_dir.parent.exists()
                                 else None))
    try:
        dataset = write_toy_dataset(work / "data.jsonl", phrase, 32, fmt="instruction", seed=seed)
        job = quick_job(model_dir, dataset, r=r, target_modules=target_modules, steps=steps, seed=seed)
        runtime = resolve_runtime(job, output_dir=out_dir, checkpoint_dir=work / "checkpoints",
                                  progress_file=work / "progress.json", result_file=work / "result.json",
                                  progress_bar=False)
        run_training(job, runtime, sinks=[])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


__all__ = [
    "EXIT_CODES", "EXIT_INTERNAL", "EXIT_OK", "EXIT_PREEMPTED", "DatasetAccessDenied", "DatasetNotFound",
    "DatasetUnavailable", "InvalidConfig", "InvalidDataset", "ModelNotFound", "OutOfMemory", "OutputWriteFailed",
    "Runtime", "TargetModulesNotFound", "TrainerError", "artifact_sha256", "job_from_dict", "load_job",
    "quick_job", "resolve_runtime", "run_training", "train_adapter_quick",
]
