"""Categorised trainer failures: a `reason` the operator copies into status.failure, and an exit code per reason.

Every failure the trainer can foresee is raised as a `TrainerError` subclass whose message names the field at
fault and the fix. `python -m loraplane.trainer` turns it into `{"reason", "message"}` JSON on the Kubernetes
termination-message path and exits with `EXIT_CODES[reason]`, so the operator can classify a failed pod from
either its termination message or its exit code.
"""

from __future__ import annotations

from loraplane.api.reasons import Reason
from loraplane.api.redaction import scrubbed
from loraplane.api.wire.trainer import (  # noqa: F401  (re-exported: the trainer's public names)
    DEFAULT_TERMINATION_LOG, EXIT_CODES, EXIT_INTERNAL, EXIT_OK, EXIT_PREEMPTED, FAILURES, NOT_RETRYABLE_EXIT_CODES,
    REASONS_BY_EXIT_CODE, TERMINATION_LOG_ENV, TERMINATION_MESSAGE_LIMIT, TerminationMessage, termination_log_path,
    write_termination_message,
)


class TrainerError(Exception):
    """Base of categorised failures. `reason` is CamelCase (a Condition reason); `exit_code` is unique."""

    reason = Reason.InternalError  # subclasses name their own; the base is what an unforeseen failure reports
    exit_code = EXIT_INTERNAL
    # False: the input is wrong, so a new pod would fail the same way (the Job's podFailurePolicy fails at once).
    retryable = True

    def __init__(self, message: str):
        # Messages quote URIs and store errors: scrubbed here, so the log line, stderr and the termination
        # message (every sink of `message`, str(exc) and as_dict()) never carry a credential.
        message = scrubbed(message)
        super().__init__(message)
        self.message = message

    def termination_message(self) -> TerminationMessage:
        """What the trainer writes on the termination-message path for this failure."""
        return TerminationMessage(reason=self.reason, message=self.message)

    def as_dict(self) -> dict[str, str]:
        """termination_message() in its wire form: {"reason", "message"}."""
        return self.termination_message().to_json()


class InvalidConfig(TrainerError):
    """The FineTuneJob (or a runtime flag) is invalid or does not fit the model."""

    reason = Reason.InvalidConfig
    exit_code, retryable = FAILURES[reason]


class InvalidDataset(TrainerError):
    """The dataset exists but its content cannot be trained on (bad JSON, wrong fields, empty, too long)."""

    reason = Reason.InvalidDataset
    exit_code, retryable = FAILURES[reason]


class DatasetNotFound(TrainerError):
    """Nothing at the dataset location (missing file, HTTP 404, no such S3 key or hub dataset)."""

    reason = Reason.DatasetNotFound
    exit_code, retryable = FAILURES[reason]


class DatasetAccessDenied(TrainerError):
    """The dataset exists but the credentials do not allow reading it (HTTP 401/403, S3 AccessDenied)."""

    reason = Reason.DatasetAccessDenied
    exit_code, retryable = FAILURES[reason]


class DatasetUnavailable(TrainerError):
    """The dataset could not be fetched for a transient reason (network, server error); a retry may work."""

    reason = Reason.DatasetUnavailable
    exit_code, retryable = FAILURES[reason]


class ModelNotFound(TrainerError):
    """The base model is not at its location, or not in the cache while offline."""

    reason = Reason.ModelNotFound
    exit_code, retryable = FAILURES[reason]


class TargetModulesNotFound(TrainerError):
    """spec.method.targetModules names modules the model does not have (or that are not linear layers)."""

    reason = Reason.TargetModulesNotFound
    exit_code, retryable = FAILURES[reason]


class OutOfMemory(TrainerError):
    """The accelerator (or the process's memory limit) could not hold a training step."""

    reason = Reason.OutOfMemory
    exit_code, retryable = FAILURES[reason]


class OutputWriteFailed(TrainerError):
    """The adapter could not be written or uploaded to spec.output.uri."""

    reason = Reason.OutputWriteFailed
    exit_code, retryable = FAILURES[reason]


ERRORS: tuple[type[TrainerError], ...] = (
    InvalidConfig, InvalidDataset, DatasetNotFound, DatasetAccessDenied, DatasetUnavailable, ModelNotFound,
    TargetModulesNotFound, OutOfMemory, OutputWriteFailed,
)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA/MPS OOM, Python MemoryError, or the CPU allocator refusing an allocation."""
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


assert {cls.reason for cls in ERRORS} == set(FAILURES), "every failure in the wire table has its exception class"
