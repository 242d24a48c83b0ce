"""What the trainer runs: the FineTuneJob (the one config schema) plus runtime paths from flags or env.

The FineTuneJob says *what* to train; where things are on this machine (a mounted model, the output volume,
the checkpoint directory) is runtime detail the pod's environment supplies:

  flag                 env                         default
  --config / -f        LORAPLANE_CONFIG            (required) FineTuneJob as YAML or JSON
  --model-dir          LORAPLANE_MODEL_DIR         spec.baseModel.uri (local/pvc) or the hub id
  --dataset-path       LORAPLANE_DATASET_PATH      spec.dataset.uri, or /data/<configMap>/<key>
  --output-dir         LORAPLANE_OUTPUT_DIR        spec.output.uri (local/pvc), else $LORAPLANE_OUTPUT_SCRATCH/<adapterName>
                                                   (in a pod: /output/<adapterName>; locally: ./<adapterName>)
  --checkpoint-dir     LORAPLANE_CHECKPOINT_DIR    <output-dir>.checkpoints (next to the adapter, same volume)
  (checkpoint mirror)  LORAPLANE_CHECKPOINT_URI    s3 output: <spec.output.uri>.checkpoints (survives the pod);
                                                   else none. `none` switches it off
  --progress-file      LORAPLANE_PROGRESS_FILE     <checkpoint-dir>/progress.json
  --result-file        LORAPLANE_RESULT_FILE       <checkpoint-dir>/result.json
  --evaluation-path    LORAPLANE_EVALUATION_PATH   spec.evaluation.dataset.uri, or /data/<configMap>/<key>
  (previous version)   the config's `previousVersion` (api.wire.trainer.PreviousVersion), set by the operator
  (cluster progress)   LORAPLANE_JOB_NAMESPACE + LORAPLANE_JOB_NAME: patch that FineTuneJob's status.progress
  (pvc:// URIs)        LORAPLANE_PVC_ROOT          /mnt/pvc   (pvc://CLAIM/PATH is $ROOT/CLAIM/PATH)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError

from loraplane.api import paths
from loraplane.api.finetunejob import FineTuneJob
from loraplane.api.wire.trainer import PREVIOUS_VERSION_KEY, PreviousVersion
from loraplane.storage.uri import ArtifactUri, Scheme, parse_uri, try_parse_uri
from loraplane.trainer.errors import InvalidConfig

DEFAULT_PVC_ROOT = paths.PVC_ROOT
DEFAULT_CONFIGMAP_ROOT = paths.DATA_CONFIGMAP_ROOT
DEFAULT_SCRATCH = paths.OUTPUT_SCRATCH


@dataclass
class Runtime:
    """Paths and switches of one run (everything that is not in the FineTuneJob)."""

    output_dir: Path
    checkpoint_dir: Path
    progress_file: Path
    result_file: Path
    model_dir: Path | None = None
    dataset_path: Path | None = None
    validation_path: Path | None = None
    # A local evaluation set (spec.evaluation.dataset), overriding its URI or ConfigMap.
    evaluation_path: Path | None = None
    configmap_root: Path = Path(DEFAULT_CONFIGMAP_ROOT)
    # The Adapter version this run would replace (scored too when spec.evaluation.comparePrevious).
    previous: PreviousVersion | None = None
    pvc_root: Path = Path(DEFAULT_PVC_ROOT)
    progress_bar: bool = True
    job_namespace: str | None = None
    job_name: str | None = None
    # Seconds between status patches in the cluster (the final one is always sent).
    status_interval_s: float = 10.0
    # s3://… where complete checkpoints are mirrored and restored from (None: local checkpoints only).
    checkpoint_uri: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def in_cluster(self) -> bool:
        """True when the run belongs to a FineTuneJob in a cluster (job namespace and name are known)."""
        return bool(self.job_namespace and self.job_name)


def load_job(path: Path) -> FineTuneJob:
    """Read and validate a FineTuneJob manifest (YAML or JSON); InvalidConfig names each bad field."""
    return load_config(path)[0]


def load_config(path: Path) -> tuple[FineTuneJob, PreviousVersion | None]:
    """The FineTuneJob of a trainer config (YAML or JSON) and the version it would replace (the `previousVersion`
    key the operator adds beside the manifest; None when absent). InvalidConfig names each bad field."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise InvalidConfig(f"cannot read the config file {path}: {exc.strerror}; pass --config FILE "
                            "(a FineTuneJob manifest)") from exc
    try:
        docs = [d for d in yaml.safe_load_all(text) if d]
    except yaml.YAMLError as exc:
        raise InvalidConfig(f"{path} is not valid YAML/JSON: {exc}") from exc
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == "FineTuneJob"]
    if len(jobs) != 1:
        raise InvalidConfig(f"{path} must hold exactly one FineTuneJob (kind: FineTuneJob); found {len(jobs)} "
                            f"among {len(docs)} document(s)")
    doc = dict(jobs[0])
    previous = doc.pop(PREVIOUS_VERSION_KEY, None)
    try:
        prev = PreviousVersion.model_validate(previous) if previous is not None else None
    except ValidationError as exc:
        raise InvalidConfig(f"{path}: {PREVIOUS_VERSION_KEY} is not valid: {exc.errors()[0]['msg']}") from exc
    return job_from_dict(doc, source=str(path)), prev


def job_from_dict(doc: dict, source: str = "config") -> FineTuneJob:
    """A FineTuneJob validated from a manifest dict; raises InvalidConfig naming `source` and every bad field."""
    from loraplane.api.validation import format_validation_error

    try:
        return FineTuneJob.model_validate(doc, by_alias=True, by_name=False)   # the wire form, as api.parse
    except ValidationError as exc:
        raise InvalidConfig(f"{source} is not a valid FineTuneJob:\n{format_validation_error(exc, '  ')}") from exc
    except ValueError as exc:  # CEL rule failures
        raise InvalidConfig(f"{source} is not a valid FineTuneJob: {exc}") from exc


def spec_uri(uri: str, what: str) -> ArtifactUri:
    """`uri` parsed (loraplane.storage.uri); a malformed one is InvalidConfig naming the field `what`."""
    try:
        return parse_uri(uri)
    except ValueError as exc:
        raise InvalidConfig(f"{what}: {exc}") from exc


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def resolve_runtime(job: FineTuneJob, *, output_dir: Path | None = None, checkpoint_dir: Path | None = None,
                    model_dir: Path | None = None, dataset_path: Path | None = None,
                    validation_path: Path | None = None, progress_file: Path | None = None,
                    result_file: Path | None = None, progress_bar: bool | None = None,
                    evaluation_path: Path | None = None, previous: PreviousVersion | None = None) -> Runtime:
    """Fill runtime paths: explicit arguments, then LORAPLANE_* env, then what the spec implies."""
    pvc_root = Path(os.environ.get("LORAPLANE_PVC_ROOT") or DEFAULT_PVC_ROOT)
    spec = job.spec
    output = spec_uri(spec.output.uri, "spec.output.uri") if spec.output.uri else None
    out = output_dir or _env_path("LORAPLANE_OUTPUT_DIR") or (output.local_path(pvc_root) if output else None)
    if out is None:
        if output and output.scheme != Scheme.S3:
            raise InvalidConfig(f"spec.output.uri {spec.output.uri!r} is not writable from here; pass --output-dir")
        # s3:// (uploaded after training) or no uri at all: the pod's scratch volume; locally, the current dir.
        in_pod = bool(os.environ.get("LORAPLANE_JOB_NAME"))
        scratch = os.environ.get("LORAPLANE_OUTPUT_SCRATCH") or (DEFAULT_SCRATCH if in_pod else os.getcwd())
        out = Path(scratch) / spec.output.adapter_name
    out = Path(out).absolute()
    ckpt = Path(checkpoint_dir or _env_path("LORAPLANE_CHECKPOINT_DIR") or out.with_name(out.name + ".checkpoints"))
    if ckpt.absolute() == out or out in ckpt.absolute().parents:
        raise InvalidConfig(f"the checkpoint dir {ckpt} must not be inside the adapter output dir {out} "
                            "(the adapter dir holds exactly the artifact that is hashed and served)")
    ds = dataset_path or _env_path("LORAPLANE_DATASET_PATH")
    configmap_root = Path(os.environ.get("LORAPLANE_CONFIGMAP_ROOT") or DEFAULT_CONFIGMAP_ROOT)
    if ds is None and spec.dataset.config_map_ref:
        ref = spec.dataset.config_map_ref
        ds = configmap_root / ref.name / ref.key
    bar = progress_bar if progress_bar is not None else os.environ.get("LORAPLANE_PROGRESS_BAR", "1") != "0"
    mirror = os.environ.get("LORAPLANE_CHECKPOINT_URI") or (
        output.text.rstrip("/") + ".checkpoints" if output and output.scheme == Scheme.S3 else None)
    if mirror and mirror.lower() == "none":
        mirror = None
    if mirror and getattr(try_parse_uri(mirror), "scheme", None) != Scheme.S3:
        raise InvalidConfig(f"LORAPLANE_CHECKPOINT_URI {mirror!r}: expected s3://BUCKET/PREFIX or none (a local or "
                            "pvc checkpoint location is LORAPLANE_CHECKPOINT_DIR)")
    return Runtime(
        output_dir=out, checkpoint_dir=ckpt.absolute(),
        progress_file=Path(progress_file or _env_path("LORAPLANE_PROGRESS_FILE") or ckpt / "progress.json"),
        result_file=Path(result_file or _env_path("LORAPLANE_RESULT_FILE") or ckpt / "result.json"),
        model_dir=model_dir or _env_path("LORAPLANE_MODEL_DIR"),
        dataset_path=ds, validation_path=validation_path or _env_path("LORAPLANE_VALIDATION_PATH"),
        evaluation_path=evaluation_path or _env_path("LORAPLANE_EVALUATION_PATH"), configmap_root=configmap_root,
        previous=previous,
        pvc_root=pvc_root, progress_bar=bar,
        job_namespace=os.environ.get("LORAPLANE_JOB_NAMESPACE") or None,
        job_name=os.environ.get("LORAPLANE_JOB_NAME") or None,
        status_interval_s=float(os.environ.get("LORAPLANE_STATUS_INTERVAL_S") or 10.0),
        checkpoint_uri=mirror,
    )


def dump_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON so that readers see the old or the new file, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
