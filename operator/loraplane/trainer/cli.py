"""`python -m loraplane.trainer --config FILE` (in a FineTuneJob's pod) and `loraplane train -f FILE` (locally):
the same parser, the same code.

Exit status: 0 success; EXIT_PREEMPTED (75) after SIGTERM once a checkpoint is saved; otherwise the code of the
failure's reason (loraplane.trainer.errors.EXIT_CODES), with {"reason","message"} JSON on the termination
message path ($LORAPLANE_TERMINATION_LOG, default /dev/termination-log).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from loraplane.api.reasons import Reason
from loraplane.api.redaction import install_log_redaction, scrubbed
from loraplane.api.wire.trainer import TerminationMessage
from loraplane.trainer.errors import EXIT_INTERNAL, EXIT_OK, EXIT_PREEMPTED, TrainerError, write_termination_message

log = logging.getLogger("loraplane.trainer")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the trainer: the FineTuneJob config and local overrides of the model, data and output
    paths (each also from its LORAPLANE_* variable), progress/result files and output switches."""
    p.add_argument("-f", "--config", type=Path, default=os.environ.get("LORAPLANE_CONFIG"),
                   help="the FineTuneJob manifest (YAML or JSON) [env LORAPLANE_CONFIG]")
    p.add_argument("--model-dir", type=Path, help="local directory of the base model, overriding "
                   "spec.baseModel [env LORAPLANE_MODEL_DIR]")
    p.add_argument("--dataset-path", type=Path, help="local dataset file, overriding spec.dataset "
                   "[env LORAPLANE_DATASET_PATH]")
    p.add_argument("--validation-path", type=Path, help="local validation file [env LORAPLANE_VALIDATION_PATH]")
    p.add_argument("--evaluation-path", type=Path, help="local evaluation set, overriding "
                   "spec.evaluation.dataset [env LORAPLANE_EVALUATION_PATH]")
    p.add_argument("-o", "--output-dir", type=Path, help="where the adapter directory is written (default: "
                   "spec.output.uri when local) [env LORAPLANE_OUTPUT_DIR]")
    p.add_argument("--checkpoint-dir", type=Path, help="resumable checkpoints (default: <output-dir>.checkpoints) "
                   "[env LORAPLANE_CHECKPOINT_DIR]")
    p.add_argument("--progress-file", type=Path, help="JSON progress file (default: <checkpoint-dir>/progress.json)")
    p.add_argument("--result-file", type=Path, help="result JSON (default: <checkpoint-dir>/result.json)")
    p.add_argument("--no-progress-bar", action="store_true", help="no tqdm bar (the progress file is still written)")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")


# Library messages that say nothing a user can act on, each matched exactly (anything else still shows):
# - bitsandbytes' CPU backend tries an optional faster 4-bit kernel from the `kernels` package at import (peft
#   imports bitsandbytes even for plain LoRA) and warns when it is missing; its own fallback is used.
# - peft's save_pretrained looks for the base model's config.json under base_model_name_or_path (the spec's
#   identity, e.g. loraplane/tiny-llama, not a local path) to see whether the vocabulary was resized; the trainer
#   never resizes it, so peft's assumption ("not modified") is right.
_QUIET_LOGS = {"bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community"}
_QUIET_WARNINGS = (r"Could not find a config file in .* - will assume that the vocabulary was not modified", "peft")


class _DropPrefix(logging.Filter):
    """Drops the records of one logger whose message starts with `prefix`."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102 - logging hook
        return not str(record.msg).startswith(self.prefix)


def quiet_library_noise() -> None:
    """Silence the libraries' messages that are noise for every run (_QUIET_LOGS, _QUIET_WARNINGS: matched by
    logger and message, so every other warning and error still shows) and transformers' "Loading weights"
    progress bar (the trainer draws its own bar and writes progress.json). Idempotent."""
    import warnings

    for name, prefix in _QUIET_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropPrefix(prefix))
    message, module = _QUIET_WARNINGS
    warnings.filterwarnings("ignore", message=message, category=UserWarning, module=module)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:   # the trainer's own check reports a missing transformers
        return
    hf_logging.disable_progress_bar()


def train_main(args: argparse.Namespace) -> int:
    """Run training; returns the exit status (0, EXIT_PREEMPTED, or the failure reason's code) after
    writing the termination message. An unforeseen exception becomes InternalError (OOM: OutOfMemory)."""
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_redaction()   # log lines quote URIs and store errors: no credential reaches the pod log
    quiet_library_noise()
    try:
        return _run(args)
    except TrainerError as exc:
        log.error("%s: %s", exc.reason, exc.message)
        write_termination_message(exc.as_dict())
        print(json.dumps(exc.as_dict()), file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # a bug or an unforeseen failure: still tell the operator something useful
        print(scrubbed(traceback.format_exc()), file=sys.stderr, end="")   # the pod log: no credentials
        from loraplane.trainer.errors import is_out_of_memory

        if is_out_of_memory(exc):
            from loraplane.trainer.errors import OutOfMemory

            err = OutOfMemory(f"out of memory: {exc}; lower spec.training.batchSize or maxSeqLength")
            write_termination_message(err.as_dict())
            return err.exit_code
        write_termination_message(TerminationMessage(
            reason=Reason.InternalError, message=f"{type(exc).__name__}: {str(exc)[:2000]} (see the pod log)").to_json())
        return EXIT_INTERNAL


def _run(args: argparse.Namespace) -> int:
    from loraplane.storage.uri import Scheme
    from loraplane.trainer.config import dump_json_atomic, load_config, resolve_runtime, spec_uri
    from loraplane.trainer.errors import InvalidConfig

    if not args.config:
        raise InvalidConfig("no config: pass --config FILE (a FineTuneJob manifest) or set LORAPLANE_CONFIG")
    job, previous = load_config(args.config)
    runtime = resolve_runtime(job, output_dir=args.output_dir, checkpoint_dir=args.checkpoint_dir,
                              model_dir=args.model_dir, dataset_path=args.dataset_path,
                              validation_path=args.validation_path, progress_file=args.progress_file,
                              result_file=args.result_file, progress_bar=not args.no_progress_bar,
                              evaluation_path=getattr(args, "evaluation_path", None), previous=previous)
    from loraplane.trainer.run import run_training, upload_s3

    result = run_training(job, runtime)
    if result.preempted:
        message = result.message().to_json()
        write_termination_message(message)
        dump_json_atomic(runtime.result_file, message)
        log.warning("preempted at step %d; exiting with %d", result.global_step, EXIT_PREEMPTED)
        return EXIT_PREEMPTED
    if result.output_dir is None:
        return EXIT_OK  # a non-zero rank of a distributed run: rank 0 writes the artifact
    uri = job.spec.output.uri or str(result.output_dir)
    if job.spec.output.uri and spec_uri(uri, "spec.output.uri").scheme == Scheme.S3:
        upload_s3(result.output_dir, uri)
    message = result.message(artifact_uri=uri).to_json()
    dump_json_atomic(runtime.result_file, message)
    write_termination_message(message)
    print(f"adapter: {result.output_dir}")
    print(f"artifact sha256: {result.artifact_sha256}")
    if result.evaluation is not None:
        print(f"evaluation: {result.evaluation.summary()}")
    print(f"result: {runtime.result_file}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """`python -m loraplane.trainer [ARGS]`: the same program as `loraplane train`, without the CLI package."""
    parser = argparse.ArgumentParser(prog="python -m loraplane.trainer",
                                     description="Fine-tune a LoRA/QLoRA adapter as described by a FineTuneJob.")
    add_train_arguments(parser)
    return train_main(parser.parse_args(argv))
