"""The trainer: a FineTuneJob in, a PEFT adapter directory (plus provenance.json) out.

Run it as `python -m loraplane.trainer --config finetunejob.yaml` (what the pod runs) or
`loraplane train -f finetunejob.yaml`. Library use:

    from loraplane.trainer import run_training, load_job, resolve_runtime
    result = run_training(job, resolve_runtime(job, output_dir=Path("out")))

Heavy imports (torch, transformers, peft) happen inside the functions, so importing this package is cheap.
"""

from __future__ import annotations

from loraplane.storage.digest import sha256_dir as artifact_sha256
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


__all__ = [
    "EXIT_CODES", "EXIT_INTERNAL", "EXIT_OK", "EXIT_PREEMPTED", "DatasetAccessDenied", "DatasetNotFound",
    "DatasetUnavailable", "InvalidConfig", "InvalidDataset", "ModelNotFound", "OutOfMemory", "OutputWriteFailed",
    "Runtime", "TargetModulesNotFound", "TrainerError", "artifact_sha256", "job_from_dict", "load_job",
    "resolve_runtime", "run_training",
]
