"""Categorised trainer failures: a `reason` the operator copies into status.failure, and an exit code per reason.

Every failure the trainer can foresee is raised as a `TrainerError` subclass whose message names the field at
fault and the fix. `python -m loraplane.trainer` turns it into `{"reason", "message"}` JSON on the Kubernetes
termination-message path and exits with `EXIT_CODES[reason]`, so the operator can classify a failed pod from
either its termination message or its exit code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Exit codes. 0 is success; 64-78 follow the spirit of sysexits.h; each reason has its own code.
EXIT_OK = 0
EXIT_INTERNAL = 70          # EX_SOFTWARE: a bug or an unforeseen failure (traceback in the log)
EXIT_PREEMPTED = 75         # EX_TEMPFAIL: SIGTERM received, checkpoint saved; rerun to resume
TERMINATION_LOG_ENV = "LORAPLANE_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
# Kubernetes keeps at most 4096 bytes of a termination message.
TERMINATION_MESSAGE_LIMIT = 4096


class TrainerError(Exception):
    """Base of categorised failures. `reason` is CamelCase (a Condition reason); `exit_code` is unique."""

    reason = "TrainerError"
    exit_code = EXIT_INTERNAL
    # False: the input is wrong, so a new pod would fail the same way (the Job's podFailurePolicy fails at once).
    retryable = True

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def as_dict(self) -> dict[str, str]:
        return {"reason": self.reason, "message": self.message}


class InvalidConfig(TrainerError):
    """The FineTuneJob (or a runtime flag) is invalid or does not fit the model."""

    reason, exit_code = "InvalidConfig", 64
    retryable = False


class InvalidDataset(TrainerError):
    """The dataset exists but its content cannot be trained on (bad JSON, wrong fields, empty, too long)."""

    reason, exit_code = "InvalidDataset", 65
    retryable = False


class DatasetNotFound(TrainerError):
    """Nothing at the dataset location (missing file, HTTP 404, no such S3 key or hub dataset)."""

    reason, exit_code = "DatasetNotFound", 66
    retryable = False


class DatasetAccessDenied(TrainerError):
    """The dataset exists but the credentials do not allow reading it (HTTP 401/403, S3 AccessDenied)."""

    reason, exit_code = "DatasetAccessDenied", 77
    retryable = False


class DatasetUnavailable(TrainerError):
    """The dataset could not be fetched for a transient reason (network, server error); a retry may work."""

    reason, exit_code = "DatasetUnavailable", 69


class ModelNotFound(TrainerError):
    """The base model is not at its location, or not in the cache while offline."""

    reason, exit_code = "ModelNotFound", 67
    retryable = False


class TargetModulesNotFound(TrainerError):
    """spec.method.targetModules names modules the model does not have (or that are not linear layers)."""

    reason, exit_code = "TargetModulesNotFound", 68
    retryable = False


class OutOfMemory(TrainerError):
    """The accelerator (or the process's memory limit) could not hold a training step."""

    reason, exit_code = "OutOfMemory", 71


class OutputWriteFailed(TrainerError):
    """The adapter could not be written or uploaded to spec.output.uri."""

    reason, exit_code = "OutputWriteFailed", 73


ERRORS: tuple[type[TrainerError], ...] = (
    InvalidConfig, InvalidDataset, DatasetNotFound, DatasetAccessDenied, DatasetUnavailable, ModelNotFound,
    TargetModulesNotFound, OutOfMemory, OutputWriteFailed,
)
# reason -> exit code, including the two outcomes that are not errors of the input.
EXIT_CODES: dict[str, int] = {
    **{cls.reason: cls.exit_code for cls in ERRORS},
    "Preempted": EXIT_PREEMPTED,
    "InternalError": EXIT_INTERNAL,
}
REASONS_BY_EXIT_CODE: dict[int, str] = {code: reason for reason, code in EXIT_CODES.items()}
# Exit codes of input errors: retrying cannot help.
NOT_RETRYABLE_EXIT_CODES: tuple[int, ...] = tuple(sorted(cls.exit_code for cls in ERRORS if not cls.retryable))
assert len(REASONS_BY_EXIT_CODE) == len(EXIT_CODES), "exit codes must be unique per reason"


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA/MPS OOM, Python MemoryError, or the CPU allocator refusing an allocation."""
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def termination_log_path() -> Path:
    return Path(os.environ.get(TERMINATION_LOG_ENV) or DEFAULT_TERMINATION_LOG)


def write_termination_message(payload: dict) -> bool:
    """Write `payload` as JSON where Kubernetes picks up the termination message; False if not writable."""
    data = json.dumps(payload, separators=(",", ":"))
    if len(data.encode()) > TERMINATION_MESSAGE_LIMIT and "message" in payload:
        room = TERMINATION_MESSAGE_LIMIT - len(data.encode()) + len(payload["message"].encode()) - 20
        payload = {**payload, "message": payload["message"].encode()[: max(room, 0)].decode(errors="ignore") + " …"}
        data = json.dumps(payload, separators=(",", ":"))
    try:
        with open(termination_log_path(), "w") as fh:
            fh.write(data)
    except OSError:
        return False  # not in a pod (or the path is read-only): the log and the exit code still tell
    return True
