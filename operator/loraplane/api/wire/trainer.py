"""What the trainer tells the operator when its pod ends: exit codes and the termination message.

The trainer (`python -m loraplane.trainer`) exits with one code per failure reason and writes
`{"reason", "message"}` JSON to the Kubernetes termination-message path; `loraplane fetch-model` (the
ModelRoute's init container) writes the same shape. The operator classifies a failed pod from either, and the
training Job's podFailurePolicy (builders) is derived from the same table, so the three can never disagree.

Exit codes: 0 is success; 64-78 follow the spirit of sysexits.h; each reason has its own code.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loraplane.api.evaluation import EvaluationResult
from loraplane.api.reasons import Reason, quoted_reason, reason_or_unknown
from loraplane.api.redaction import redacted

EXIT_OK = 0
EXIT_INTERNAL = 70          # EX_SOFTWARE: a bug or an unforeseen failure (traceback in the log)
EXIT_PREEMPTED = 75         # EX_TEMPFAIL: SIGTERM received, checkpoint saved; rerun to resume
TERMINATION_LOG_ENV = "LORAPLANE_TERMINATION_LOG"
# The trainer's --allow-insecure-http (plain http:// and loopback sources), set by the Job builder from the
# chart's operator.allowInsecureHttp; read by storage.fetchers.FetchPolicy.from_env.
INSECURE_HTTP_ENV = "LORAPLANE_ALLOW_INSECURE_HTTP"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
# Kubernetes keeps at most 4096 bytes of a termination message (core/v1 ContainerStateTerminated.message).
TERMINATION_MESSAGE_LIMIT = 4096


class Failure(NamedTuple):
    """One categorised trainer failure: its exit code, and whether a new pod could succeed (False: the input
    is wrong, so the Job's podFailurePolicy fails the run at once)."""

    exit_code: int
    retryable: bool


# reason -> (exit code, retryable). The reasons are documented in api/reasons.py.
FAILURES: dict[Reason, Failure] = {
    Reason.InvalidConfig: Failure(64, False),
    Reason.InvalidDataset: Failure(65, False),
    Reason.DatasetNotFound: Failure(66, False),
    Reason.DatasetAccessDenied: Failure(77, False),
    Reason.DatasetUnavailable: Failure(69, True),
    Reason.ModelNotFound: Failure(67, False),
    Reason.TargetModulesNotFound: Failure(68, False),
    Reason.OutOfMemory: Failure(71, True),
    Reason.OutputWriteFailed: Failure(73, True),
}
# reason -> exit code, including the two outcomes that are not errors of the input.
EXIT_CODES: dict[Reason, int] = {
    **{reason: f.exit_code for reason, f in FAILURES.items()},
    Reason.Preempted: EXIT_PREEMPTED,
    Reason.InternalError: EXIT_INTERNAL,
}
REASONS_BY_EXIT_CODE: dict[int, Reason] = {code: reason for reason, code in EXIT_CODES.items()}
# Exit codes of input errors: retrying cannot help.
NOT_RETRYABLE_EXIT_CODES: tuple[int, ...] = tuple(sorted(f.exit_code for f in FAILURES.values() if not f.retryable))
assert len(REASONS_BY_EXIT_CODE) == len(EXIT_CODES), "exit codes must be unique per reason"


def termination_log_path() -> Path:
    """Where this container's termination message goes: $LORAPLANE_TERMINATION_LOG, else /dev/termination-log."""
    return Path(os.environ.get(TERMINATION_LOG_ENV) or DEFAULT_TERMINATION_LOG)


def write_termination_message(payload: dict) -> bool:
    """Write `payload` as JSON where Kubernetes picks up the termination message; False if not writable.

    Credentials in URLs of `message` are redacted (api.redaction). A `message` that would push the JSON past
    TERMINATION_MESSAGE_LIMIT bytes is cut (UTF-8 safe) and ends
    in " …", so the reason always survives. A success message still too long loses DROPPABLE_FIELDS, in order
    (Kubernetes would otherwise cut the JSON itself and the operator could not read any of it), then the
    evaluation's message is shortened and its per-label scores left out (`_fit_evaluation`).
    """
    for name in DROPPABLE_FIELDS:
        if _json_bytes(payload) <= TERMINATION_MESSAGE_LIMIT:
            break
        payload = {k: v for k, v in payload.items() if k != name}
    payload = _fit_evaluation(payload)
    if isinstance(payload.get("message"), str):
        payload = {**payload, "message": redacted(payload["message"], TERMINATION_MESSAGE_LIMIT)}
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


def _json_bytes(value: Any) -> int:
    """Bytes of `value` as written (compact JSON, non-ASCII escaped)."""
    return len(json.dumps(value, separators=(",", ":")).encode())


def _fit_evaluation(payload: dict) -> dict:
    """`payload` with its `evaluation` made to fit TERMINATION_MESSAGE_LIMIT when the whole does not: the
    evaluation's `message` (up to 1024 characters, 6 bytes each once escaped) shortened, ending in " …", then the
    per-label accuracies (EvaluationScores.labels, up to ~600 bytes) left out. A success message with the
    longest artifact URI and both at their limits is ~9 KiB; the scores themselves are what the rollout needs."""
    evaluation = payload.get("evaluation")
    over = _json_bytes(payload) - TERMINATION_MESSAGE_LIMIT
    if over <= 0 or not isinstance(evaluation, dict):
        return payload
    note = evaluation.get("message")
    if isinstance(note, str) and note:
        budget = _json_bytes(note) - over
        lo, hi = 0, len(note)   # the longest prefix whose JSON form (with " …") fits the budget
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _json_bytes(note[:mid] + " …") <= budget:
                lo = mid
            else:
                hi = mid - 1
        evaluation = {**evaluation, "message": note[:lo].rstrip() + " …"}
        payload = {**payload, "evaluation": evaluation}
    if _json_bytes(payload) > TERMINATION_MESSAGE_LIMIT:
        evaluation = {k: ({kk: vv for kk, vv in v.items() if kk != "labels"} if isinstance(v, dict) else v)
                      for k, v in evaluation.items()}
        payload = {**payload, "evaluation": evaluation}
    return payload


class _Wire(BaseModel):
    # Fields a newer or older trainer adds are ignored (pods of another version may still be running after an
    # upgrade); the ones defined here have exactly one spelling, the camelCase alias.
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)


class ArtifactInfo(_Wire):
    """Where the trained adapter was written and its directory digest (storage.digest.sha256_dir)."""

    uri: str
    sha256: str | None = None


class PreviousVersion(_Wire):
    """The Adapter version a run would replace, which the trainer scores too (spec.evaluation.comparePrevious).

    The operator writes it into the trainer's config (the `previousVersion` key next to the FineTuneJob manifest,
    builders.finetunejob.trainer_config) when the Adapter exists and its status.artifact.uri is known: the version
    served when the run's configuration was rendered."""

    uri: str
    version: str | None = None
    sha256: str | None = None


# Key of the trainer config (beside apiVersion, kind, metadata, spec) that holds a PreviousVersion.
PREVIOUS_VERSION_KEY = "previousVersion"
# Fields of a success message left out, in this order, when the message would not fit TERMINATION_MESSAGE_LIMIT
# (they are in the artifact's provenance.json too); the artifact, the reason and the evaluation are kept.
DROPPABLE_FIELDS = ("libraryVersions", "metrics")


# What a termination message's reason must look like to be read as one (else the text is a log tail).
TERMINATION_REASON = r"^[A-Z][A-Za-z0-9]*$"


class TerminationMessage(_Wire):
    """The JSON a loraplane container writes as its termination message and result file (trainer, fetch-model).

    - success (trainer): reason `Succeeded`, `artifact`, `datasetSha256`, `metrics`, `libraryVersions`,
      `completedAt`, and `evaluation` (api.evaluation.EvaluationResult) when spec.evaluation is set;
    - preemption (trainer): reason `Preempted`, `message`, `step`;
    - failure: a reason of `FAILURES` (or `InternalError`, `ModelFetchFailed`) and `message`.
    It must fit TERMINATION_MESSAGE_LIMIT bytes (write_termination_message cuts `message`).
    """

    reason: str = Field(pattern=TERMINATION_REASON)
    message: str = ""
    step: int | None = None
    artifact: ArtifactInfo | None = None
    dataset_sha256: str | None = Field(default=None, alias="datasetSha256")
    metrics: dict[str, Any] = Field(default_factory=dict)
    library_versions: dict[str, str] = Field(default_factory=dict, alias="libraryVersions")
    completed_at: str | None = Field(default=None, alias="completedAt")
    evaluation: EvaluationResult | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_reason(cls, data):
        # Read from a container's termination message (whatever image ran): a well-formed reason this operator
        # does not know becomes UnknownReason, quoted in the message, never a condition reason or metric label as
        # it is. A malformed one fails the pattern below: the text is then not ours (a log tail).
        if isinstance(data, dict) and isinstance(reason := data.get("reason"), str) \
                and re.fullmatch(TERMINATION_REASON, reason) and reason_or_unknown(reason) == Reason.UnknownReason:
            message = data.get("message") if isinstance(data.get("message"), str) else ""
            data = {**data, "reason": Reason.UnknownReason.value,
                    "message": f"(reported reason {quoted_reason(reason)}) {message}".rstrip()}
        return data

    def to_json(self) -> dict[str, Any]:
        """The wire form: camelCase keys, unset fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=True)

    @classmethod
    def parse(cls, text: str | None) -> "TerminationMessage | None":
        """The message in `text` (a container's terminated.message), or None when it is absent or not ours.

        Fields a trainer of another version adds are ignored, inside `evaluation` too (an api.evaluation model,
        which forbids unknown fields): the fields the errors name as unknown are left out and the rest is read
        again, so one new field never makes a whole success message (artifact digest, evaluation) unreadable."""
        if not text:
            return None
        try:
            return cls.model_validate_json(text.strip())
        except (ValidationError, ValueError) as exc:
            extra = [e["loc"] for e in exc.errors() if e["type"] == "extra_forbidden"] \
                if isinstance(exc, ValidationError) else []
        if not extra:
            return None
        try:
            doc = json.loads(text)
        except ValueError:
            return None
        for loc in extra:
            parent: Any = doc
            for part in loc[:-1]:
                parent = parent.get(part) if isinstance(parent, dict) else (
                    parent[part] if isinstance(parent, list) and isinstance(part, int) and part < len(parent)
                    else None)
            if isinstance(parent, dict):
                parent.pop(loc[-1], None)
        try:
            return cls.model_validate(doc)
        except (ValidationError, ValueError):
            return None
