"""One training run: FineTuneJob + Runtime in, a PEFT adapter directory with provenance.json out.

Engine: transformers' `Trainer` (see docs/trainer.md for why not TRL): checkpoints, resume, gradient
accumulation, mixed precision and torchrun/accelerate multi-GPU come from it; this module adds the parts a
FineTuneJob needs on top: data formats with loss masks, QLoRA/DoRA wiring, complete-checkpoint detection,
preemption, progress sinks, categorised errors and an atomically written, hashed artifact.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplane.api.common import now_rfc3339
from loraplane.api.evaluation import EvaluationResult
from loraplane.api.finetunejob import FineTuneJob
from loraplane.api.reasons import Reason
from loraplane.api.wire.trainer import ArtifactInfo, TerminationMessage
from loraplane.storage.digest import sha256_dir
from loraplane.trainer import checkpoints, data, evaluate as evalmod, model as modelmod, progress
from loraplane.trainer.config import Runtime, dump_json_atomic, spec_uri
from loraplane.trainer.errors import (
    InvalidConfig, InvalidDataset, OutOfMemory, OutputWriteFailed, TrainerError, is_out_of_memory,
)

log = logging.getLogger("loraplane.trainer")
PROVENANCE_FILE = "provenance.json"
KEEP_CHECKPOINTS = 2
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "tokenizers", "datasets", "loraplane")


@dataclass
class RunResult:
    """What a run produced. `preempted`: stopped by SIGTERM after saving a checkpoint (no adapter yet)."""

    preempted: bool
    global_step: int
    output_dir: Path | None = None
    artifact_sha256: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    log_history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: Path | None = None
    evaluation: EvaluationResult | None = None

    def message(self, artifact_uri: str | None = None) -> TerminationMessage:
        """The result (result file and termination message): what the operator copies into status."""
        if self.preempted:
            return TerminationMessage(
                reason=Reason.Preempted, step=self.global_step,
                message=f"stopped by a signal at step {self.global_step}; a checkpoint was saved and the next run "
                        "resumes from it")
        p = self.provenance
        return TerminationMessage(
            reason=Reason.Succeeded,
            artifact=ArtifactInfo(uri=artifact_uri or str(self.output_dir), sha256=self.artifact_sha256),
            dataset_sha256=p.get("dataset", {}).get("sha256"),
            metrics=p.get("metrics", {}),
            library_versions=p.get("libraryVersions", {}),
            completed_at=p.get("completedAt"),
            evaluation=self.evaluation,
        )


def library_versions() -> dict[str, str]:
    """Python's version and the installed version of each of LIBRARIES (missing ones left out), for provenance."""
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def planned_steps(n_train: int, job: FineTuneJob, world_size: int) -> int:
    """Optimizer steps of the run: spec.training.maxSteps, else epochs (default 1) x optimizer steps per epoch
    (batches of batch_size x world_size, divided by gradient accumulation); at least 1."""
    t = job.spec.training
    if t.max_steps:
        return t.max_steps
    batches = math.ceil(n_train / (t.batch_size * world_size))
    per_epoch = max(1, batches // t.gradient_accumulation_steps)
    return max(1, math.ceil(per_epoch * (t.epochs or 1.0)))


def effective_max_len(job: FineTuneJob, context: int | None) -> int:
    """The sequence length used: maxSeqLength, capped to the model's context (`context` tokens) when it
    was defaulted; raises InvalidConfig when an explicit maxSeqLength exceeds the context."""
    t = job.spec.training
    if context is None or t.max_seq_length <= context:
        return t.max_seq_length
    if "max_seq_length" in t.model_fields_set:
        raise InvalidConfig(f"spec.training.maxSeqLength={t.max_seq_length} exceeds the base model's context length "
                            f"({context} tokens); set it to at most {context}")
    log.info("maxSeqLength defaults to %d but the model's context is %d tokens: using %d",
             t.max_seq_length, context, context)
    return context


@dataclass
class Process:
    """This process's place in a (torchrun) distributed run: WORLD_SIZE processes, rank 0 is the main one."""

    world_size: int
    is_main: bool

    @classmethod
    def from_env(cls) -> "Process":
        """From torchrun's WORLD_SIZE and RANK (default: one process, the main one)."""
        return cls(int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")) == 0)


@dataclass
class BaseModel:
    """Step 1's result: where the base model is, its tokenizer and config, and the sequence length used."""

    source: modelmod.ModelSource
    tokenizer: Any
    config: Any
    max_len: int


@dataclass
class TrainingData:
    """Step 2's result: the tokenised training (and validation) examples and the planned optimizer steps."""

    train_source: data.Source
    train: data.Examples
    validation_source: data.Source | None
    validation: data.Examples | None
    total_steps: int
    evaluation: evalmod.EvalSet | None = None   # spec.evaluation.dataset, read and checked
    # A classification job without spec.evaluation.dataset: the validation records, asked as the router asks
    # (accuracy).
    validation_labels: evalmod.EvalSet | None = None


def run_training(job: FineTuneJob, runtime: Runtime, sinks: list | None = None,
                 callbacks: list | None = None) -> RunResult:
    """Train (or resume) and write the adapter. Raises TrainerError subclasses for every foreseen failure.

    `sinks`: progress sinks (default: from the runtime, local or cluster); `callbacks`: extra transformers
    TrainerCallbacks (benchmarks, embedding programs). The steps, cheapest checks first (a bad dataset fails
    before a 70B model loads): load_base_model, prepare_data, resume_point, load_peft_model, build_trainer,
    train, then (rank 0) collect_metrics, evaluation (spec.evaluation), provenance and write_adapter."""
    import transformers

    transformers.set_seed(job.spec.training.seed)
    runtime.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    scratch = runtime.checkpoint_dir / "inputs"
    process = Process.from_env()

    base = load_base_model(job, runtime, scratch)
    prepared = prepare_data(job, runtime, scratch, base, process.world_size)
    resume, mirror = resume_point(runtime)
    peft_model, targets, precision = load_peft_model(job, base.source)

    preemption = checkpoints.Preemption()
    tracker = progress.ProgressTracker(sinks if sinks is not None else default_sinks(runtime) if process.is_main
                                       else [])
    trainer = build_trainer(job, runtime, prepared, base, peft_model, precision,
                            [progress.make_callback(tracker),
                             checkpoints.make_callback(runtime.checkpoint_dir, KEEP_CHECKPOINTS, preemption,
                                                       mirror if process.is_main else None),
                             *(callbacks or [])],
                            keep_printer=runtime.in_cluster or (sinks is None and not runtime.progress_bar))
    started = time.monotonic()
    try:
        out = train(trainer, job, preemption, resume)
        if preemption.requested:
            return RunResult(preempted=True, global_step=trainer.state.global_step,
                             log_history=list(trainer.state.log_history), resumed_from=resume)
        metrics = collect_metrics(trainer, out, time.monotonic() - started, prepared, tracker)
    finally:
        tracker.close()
    if not trainer.is_world_process_zero():
        return RunResult(preempted=False, global_step=trainer.state.global_step)

    evaluation = run_evaluation(job, runtime, scratch, base, prepared, peft_model)
    record = provenance(job, base, prepared, targets, precision, metrics, resume, peft_model, process.world_size)
    if evaluation is not None:
        record["evaluation"] = evaluation.wire()
        if prepared.evaluation is not None:
            record["evaluationSet"] = {"uri": prepared.evaluation.uri, "sha256": prepared.evaluation.sha256,
                                       "records": prepared.evaluation.records,
                                       "examples": len(prepared.evaluation.examples)}
    sha = write_adapter(peft_model, runtime.output_dir, record)
    return RunResult(preempted=False, global_step=trainer.state.global_step, output_dir=runtime.output_dir,
                     artifact_sha256=sha, provenance=record, log_history=list(trainer.state.log_history),
                     resumed_from=resume, evaluation=evaluation)


def load_base_model(job: FineTuneJob, runtime: Runtime, scratch: Path) -> BaseModel:
    """Step 1, cheap: where the base model is (fetched into `scratch` when remote), its tokenizer and config,
    and the sequence length (spec.training.maxSeqLength bounded by the model's context). No weights load."""
    source = modelmod.resolve_source(job, runtime, scratch)
    tokenizer = modelmod.load_tokenizer(source)
    config = modelmod.load_config(source)
    return BaseModel(source, tokenizer, config, effective_max_len(job, modelmod.context_tokens(config)))


def prepare_data(job: FineTuneJob, runtime: Runtime, scratch: Path, base: BaseModel, world_size: int) -> TrainingData:
    """Step 2: read, check and tokenise the dataset (and the validation set: its own URI, or a seeded split),
    then plan the number of optimizer steps. Raises the Dataset* / InvalidDataset errors."""
    ds, t = job.spec.dataset, job.spec.training
    ref = ds.config_map_ref
    if ref is not None and runtime.dataset_path == runtime.configmap_root / ref.name / ref.key:
        # The path config.resolve_runtime derived from spec.dataset.configMapRef (not one the user passed).
        train_src = data.read_configmap_key(runtime.configmap_root, ref.name, ref.key, "spec.dataset.configMapRef")
    else:
        train_src = _read_dataset(ds.uri, runtime.dataset_path, scratch, runtime, "spec.dataset.uri")
    train_ex = data.tokenize(train_src, ds, base.tokenizer, base.max_len, packing=t.packing)
    classification = ds.format == "classification"
    labels = data.label_counts(train_src, ds) if classification else {}
    if classification and len(labels) < 2:
        raise InvalidDataset(f"spec.dataset.uri: every record has the label {next(iter(labels))!r} (field "
                             f"{ds.label_field!r}, spec.dataset.labelField); a classifier needs records of two or "
                             "more labels to learn to tell them apart")
    val_src, val_ex = None, None
    if ds.validation_uri or runtime.validation_path:
        val_src = _read_dataset(ds.validation_uri, runtime.validation_path, scratch, runtime,
                                "spec.dataset.validationUri")
        val_ex = data.tokenize(val_src, ds, base.tokenizer, base.max_len, packing=t.packing)
    elif ds.validation_split:
        train_ex, val_ex = data.split(train_ex, ds.validation_split, t.seed)
    ev = job.spec.evaluation
    eval_set = validation_labels = None
    context = modelmod.context_tokens(base.config) or base.max_len
    if ev is not None and ev.dataset is not None:
        # Read and checked now, before any weights load: a bad evaluation set fails the run before training.
        source = evalmod.read_source(ev, scratch, runtime.pvc_root, runtime.evaluation_path, runtime.configmap_root)
        eval_set = evalmod.prepare(ev, source, base.tokenizer, context, train_labels=labels)
    elif ev is not None and classification and val_ex is not None:
        # The held-out records (already checked as training records), by their lines in their source.
        where = "spec.dataset.validationUri" if val_src is not None else "spec.dataset.validationSplit"
        held = val_src or train_src
        validation_labels = evalmod.classification_set(held, evalmod.classification_examples(
            held, val_ex.lines[: ev.max_examples], ds.text_field, ds.label_field, base.tokenizer, context, where),
            labels)
    return TrainingData(train_src, train_ex, val_src, val_ex, planned_steps(len(train_ex.rows), job, world_size),
                        eval_set, validation_labels)


def resume_point(runtime: Runtime) -> tuple[Path | None, checkpoints.S3CheckpointMirror | None]:
    """Step 3: drop half-written checkpoints and find the newest complete one to resume from; with an S3
    mirror, restore from it first when it has a newer one (a replaced pod starts on an empty scratch volume).
    Returns (checkpoint to resume from or None, the mirror or None)."""
    mirror = (checkpoints.S3CheckpointMirror(runtime.checkpoint_uri, KEEP_CHECKPOINTS)
              if runtime.checkpoint_uri else None)
    checkpoints.remove_incomplete(runtime.checkpoint_dir)
    if mirror is not None:
        mirror.restore(runtime.checkpoint_dir)
    resume = checkpoints.latest_complete(runtime.checkpoint_dir)
    if resume:
        log.info("resuming from %s", resume)
    return resume, mirror


def load_peft_model(job: FineTuneJob, source: modelmod.ModelSource):
    """Step 4: choose the precision, load the base weights (4-bit for QLoRA) and wrap them with the LoRA
    adapter. Returns (peft model, target modules, precision); out of memory while loading is OutOfMemory."""
    t = job.spec.training
    precision = modelmod.choose_precision(t.precision)
    if precision.note:
        log.warning("%s", precision.note)
    try:
        base = modelmod.load_model(source, job.spec.method.type, precision, t.gradient_checkpointing)
        peft_model, targets = modelmod.wrap_peft(base, job)
    except TrainerError:
        raise
    except Exception as exc:
        if is_out_of_memory(exc):
            raise _oom(job, exc, "loading the base model") from exc
        raise
    return peft_model, targets, precision


def training_arguments(job: FineTuneJob, runtime: Runtime, prepared: TrainingData, precision) -> Any:
    """transformers.TrainingArguments from spec.training: checkpoints every checkpointEverySteps (rotated by
    loraplane once complete), evaluation when there is a validation set, no reporting integrations."""
    import torch
    from transformers import TrainingArguments

    t = job.spec.training
    total_steps, has_val = prepared.total_steps, prepared.validation is not None
    return TrainingArguments(
        output_dir=str(runtime.checkpoint_dir),
        max_steps=total_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=0.0,
        seed=t.seed,
        bf16=precision.used == "bf16",
        fp16=precision.used == "fp16",
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        save_strategy="steps",
        save_steps=t.checkpoint_every_steps,
        save_total_limit=None,  # rotation happens after a checkpoint is marked complete (checkpoints.rotate)
        eval_strategy="steps" if has_val else "no",
        eval_steps=(t.eval_every_steps or t.checkpoint_every_steps) if has_val else None,
        logging_steps=max(1, min(50, total_steps // 25)),  # ~25 loss readings a run; each costs a sync
        logging_first_step=True,
        include_num_input_tokens_seen="non_padding",  # kept in the trainer state: survives resume
        # Fused AdamW wins on GPUs; on CPUs, with many small LoRA tensors, the foreach one is ~10% faster a step.
        optim="adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


def build_trainer(job: FineTuneJob, runtime: Runtime, prepared: TrainingData, base: BaseModel, peft_model,
                  precision, callbacks: list, keep_printer: bool):
    """Step 5: the transformers Trainer (LoraplaneTrainer) over the prepared data, with `callbacks` (progress,
    checkpoint marking/mirroring, the caller's). `keep_printer`: keep transformers' PrinterCallback (in the
    cluster, and with --no-progress-bar, its printed lines are what `kubectl logs` shows); otherwise our
    progress sinks show progress instead."""
    _lean_per_step_calls(peft_model)
    trainer = _trainer_class()(
        model=peft_model, args=training_arguments(job, runtime, prepared, precision),
        train_dataset=prepared.train.rows,
        eval_dataset=prepared.validation.rows if prepared.validation else None,
        data_collator=data.PaddingCollator(base.tokenizer.pad_token_id),
        callbacks=callbacks,
    )
    if not keep_printer:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


def train(trainer, job: FineTuneJob, preemption: checkpoints.Preemption, resume: Path | None):
    """Step 6: run the training loop, from `resume` when set, with SIGTERM turned into "save and stop"
    (preemption.requested afterwards). Out of memory during a step is OutOfMemory. Returns transformers'
    TrainOutput."""
    preemption.install()
    try:
        return trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except TrainerError:
        raise
    except Exception as exc:
        if is_out_of_memory(exc):
            raise _oom(job, exc, f"training step {trainer.state.global_step}") from exc
        raise
    finally:
        preemption.uninstall()


def collect_metrics(trainer, out, train_seconds: float, prepared: TrainingData,
                    tracker: progress.ProgressTracker) -> dict[str, Any]:
    """Step 7: the run's metrics (losses, steps, epochs, seconds, tokens), plus a final evaluation (loss and
    perplexity) reported to the progress sinks when there is a validation set."""
    state = trainer.state
    metrics: dict[str, Any] = {"trainLoss": round(out.training_loss, 6), "steps": state.global_step,
                               "epochs": round(state.epoch or 0.0, 4), "trainSeconds": round(train_seconds, 3),
                               "tokensSeen": int(state.num_input_tokens_seen or 0)}
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    if losses:
        metrics["firstLoss"], metrics["finalLoss"] = round(losses[0], 6), round(losses[-1], 6)
    if prepared.validation:
        eval_loss = trainer.evaluate()["eval_loss"]
        metrics["evalLoss"] = round(eval_loss, 6)
        metrics["perplexity"] = round(math.exp(min(eval_loss, 50.0)), 4)
        if trainer.is_world_process_zero():
            tracker.report(step=state.global_step, total_steps=prepared.total_steps, epoch=state.epoch,
                           eval_loss=eval_loss, final=True)
    return metrics


def run_evaluation(job: FineTuneJob, runtime: Runtime, scratch: Path, base: BaseModel, prepared: TrainingData,
                   peft_model) -> EvaluationResult | None:
    """Step 8 (rank 0, spec.evaluation set): score the new adapter, the base model and the previous version
    (runtime.previous) on the validation split and the evaluation set (trainer.evaluate). None without
    spec.evaluation; out of memory is OutOfMemory."""
    spec = job.spec.evaluation
    if spec is None:
        return None
    started = time.monotonic()
    try:
        result = evalmod.evaluate(
            peft_model, base.tokenizer, spec, prepared.evaluation or prepared.validation_labels,
            prepared.validation.rows if prepared.validation else None, job.spec.training.batch_size,
            previous=runtime.previous, scratch=scratch, pvc_root=runtime.pvc_root,
            identity=job.spec.base_model.identity, classification=job.spec.dataset.format == "classification")
    except TrainerError:
        raise
    except Exception as exc:
        if is_out_of_memory(exc):
            raise _oom(job, exc, "evaluating the adapter (spec.evaluation)") from exc
        raise
    log.info("evaluation (%.1f s): %s%s", time.monotonic() - started, result.summary(),
             f" ({result.message})" if result.message else "")
    return result


def provenance(job: FineTuneJob, base: BaseModel, prepared: TrainingData, targets: list[str], precision,
               metrics: dict[str, Any], resume: Path | None, peft_model, world_size: int) -> dict[str, Any]:
    """Step 9: provenance.json, written next to the adapter: what was trained on what, how, with which
    library versions (None values are left out when written)."""
    spec, t, ds = job.spec, job.spec.training, job.spec.dataset
    train_src, train_ex, val_src, val_ex = (prepared.train_source, prepared.train, prepared.validation_source,
                                            prepared.validation)
    return {
        "fineTuneJob": {"namespace": job.metadata.namespace, "name": job.metadata.name},
        "baseModel": {"identity": base.source.identity, "name": spec.base_model.name, "uri": spec.base_model.uri,
                      "revision": spec.base_model.revision,
                      "resolvedRevision": getattr(base.config, "_commit_hash", None)},
        "dataset": {"uri": train_src.uri, "sha256": train_src.sha256, "format": ds.format,
                    "records": len(train_src.records), "trainExamples": len(train_ex.rows),
                    "trainTokens": train_ex.tokens,
                    # classification: the labels the adapter can answer (records per label), to check against
                    # a ModelRoute's contentRouting destinations' `label`s
                    **({"labels": data.label_counts(train_src, ds)} if ds.format == "classification" else {})},
        "validation": ({"uri": val_src.uri if val_src else f"split {ds.validation_split} of the dataset",
                        "sha256": val_src.sha256 if val_src else train_src.sha256,
                        "examples": len(val_ex.rows)} if val_ex else None),
        "method": {**spec.method.wire(), "targetModules": targets},
        "training": {**t.wire(), "maxSeqLengthUsed": base.max_len, "totalSteps": prepared.total_steps,
                     "worldSize": world_size},
        "precision": {"requested": precision.requested, "used": precision.used, "note": precision.note},
        "quantization": modelmod.quantization_summary(peft_model) if spec.method.type == "qlora" else None,
        "metrics": metrics,
        "libraryVersions": library_versions(),
        "resumedFrom": str(resume) if resume else None,
        "completedAt": now_rfc3339(),
    }


def _trainer_class():
    from transformers import Trainer

    class LoraplaneTrainer(Trainer):
        """transformers' Trainer, minus a per-step cost: it counts the model's parameters (a walk over every
        module) at every step to estimate FLOPs. The count does not change during training: count once."""

        _non_embedding_params: int | None = None

        def floating_point_ops(self, inputs) -> int:
            main_input = getattr(self.model, "main_input_name", "input_ids")
            if main_input not in inputs or not hasattr(self.model, "num_parameters"):
                return 0
            if self._non_embedding_params is None:
                self._non_embedding_params = self.model.num_parameters(exclude_embeddings=True)
            return 6 * inputs[main_input].numel() * self._non_embedding_params

    return LoraplaneTrainer


def _lean_per_step_calls(model) -> None:
    """Trainer calls `model.train()` and `model.zero_grad()` at every step; each walks every module or
    parameter of the base model, a few percent of a small model's step. Same effect, cheaper: `train()` only
    when the model is not already in training mode (eval() flips the root flag, so this is exact), and
    `zero_grad()` over the trainable parameters only (frozen ones never receive gradients)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    full_train = model.train

    def train(mode: bool = True):
        return model if mode and model.training else full_train(mode)

    def zero_grad(set_to_none: bool = True) -> None:
        for p in trainable:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    model.train, model.zero_grad = train, zero_grad


def _read_dataset(uri: str | None, override: Path | None, scratch: Path, runtime: Runtime, what: str):
    if override:
        return data.read_file(Path(override), what.replace("spec.dataset.uri", "dataset path"), uri or str(override))
    if not uri:
        raise InvalidConfig(f"{what} is not set and no dataset path was given (--dataset-path); for "
                            "spec.dataset.configMapRef the ConfigMap must be mounted (LORAPLANE_CONFIGMAP_ROOT)")
    return data.fetch(uri, scratch, runtime.pvc_root, what)


def _oom(job: FineTuneJob, exc: BaseException, during: str) -> OutOfMemory:
    t = job.spec.training
    return OutOfMemory(
        f"out of memory while {during} (batchSize={t.batch_size}, maxSeqLength={t.max_seq_length}, "
        f"method={job.spec.method.type}, gradientCheckpointing={t.gradient_checkpointing}): lower "
        "spec.training.batchSize (raise gradientAccumulationSteps to keep the effective batch) or maxSeqLength, "
        "enable spec.training.gradientCheckpointing, use spec.method.type=qlora, or request more memory/larger "
        f"GPUs ({type(exc).__name__}: {str(exc)[:300]})")


def write_adapter(peft_model, output_dir: Path, provenance: dict) -> str:
    """Save adapter + provenance.json into a temporary sibling, then rename it into place: readers see the
    previous artifact or the complete new one. Returns the artifact sha256 (loraplane.storage.digest.sha256_dir)."""
    output_dir = Path(output_dir)
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.writing-", dir=output_dir.parent))
        peft_model.save_pretrained(tmp, safe_serialization=True)
        dump_json_atomic(tmp / PROVENANCE_FILE, {k: v for k, v in provenance.items() if v is not None})
        sha = sha256_dir(tmp)
        if output_dir.exists():
            old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
            os.replace(output_dir, old)
            os.replace(tmp, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output_dir)
    except OSError as exc:
        raise OutputWriteFailed(f"cannot write the adapter to {output_dir}: {exc}; check that the output volume "
                                "is mounted read-write and has space") from exc
    return sha


def upload_s3(local_dir: Path, uri: str) -> None:
    """Upload the adapter directory to s3://BUCKET/PREFIX (the object layout mirrors the directory), then delete
    the objects under PREFIX/ that are not part of it (left by an earlier upload to the same prefix): the prefix
    then holds exactly the artifact whose sha256 the result reports. A whole bucket (no PREFIX) is never pruned.
    Raises OutputWriteFailed."""
    from loraplane.storage.errors import StorageError
    from loraplane.storage.fetchers.s3 import S3Fetcher

    target = spec_uri(uri, "spec.output.uri")
    prefix = target.key.rstrip("/") + "/" if target.key else ""
    store = S3Fetcher()
    try:
        before = store.list_objects(target.bucket or "", prefix, uri=uri) if prefix else {}
        store.upload_tree(Path(local_dir), target)
        uploaded = {prefix + p.relative_to(local_dir).as_posix() for p in Path(local_dir).rglob("*") if p.is_file()}
        if stale := sorted(set(before) - uploaded):
            log.info("deleting %d stale object(s) under %s", len(stale), uri)
            store.delete_keys(target.bucket or "", stale)
    except StorageError as exc:
        raise OutputWriteFailed(f"spec.output.uri: uploading the adapter to {uri} failed: {exc}; check the bucket "
                                "and the credentials") from exc


def default_sinks(runtime: Runtime) -> list:
    """Progress sinks: in a cluster the progress file and the FineTuneJob's status; locally the file and a
    bar when stderr is a terminal."""
    if runtime.in_cluster:
        return [progress.LocalSink(runtime.progress_file, bar=False),
                progress.ClusterSink(runtime.job_namespace, runtime.job_name, runtime.status_interval_s)]
    return [progress.LocalSink(runtime.progress_file, bar=runtime.progress_bar and sys.stderr.isatty())]
