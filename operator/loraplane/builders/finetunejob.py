"""Children of a FineTuneJob: the trainer's config ConfigMap, its narrowly scoped RBAC, the batch/v1 Job
(an indexed Job plus a headless Service for multi-node torchrun), and, on success, the Adapter it produced.

Why the trainer patches its own `status.progress` (a ServiceAccount allowed to get/patch the `/status` of
this one FineTuneJob) rather than the operator polling it: progress arrives when it happens, the operator
never opens connections into training pods (no network policy holes, no per-job polling loop that grows
with the number of jobs), and the RBAC grant is as narrow as Kubernetes allows: one verb pair on one
object's status subresource, deleted with the job.
"""

from __future__ import annotations

import json
from typing import Any

from loraplane.api.adapter import Adapter
from loraplane.api.finetunejob import FineTuneJob
from loraplane.builders.common import (
    FINETUNEJOB_LABEL,
    MANAGER,
    Manifest,
    quantity,
    apply_pod_settings,
    component_pod_defaults,
    base_labels,
    child_name,
    label_value,
    metadata,
    namespace_of,
    node_placement,
    pod_security_context,
    container_security_context,
    scratch_env,
    scratch_mount,
    scratch_volume,
    pvc_claims,
    pvc_volume_name,
    resources,
    role,
    role_binding,
    secret_env,
    service_account,
    with_hash,
)
from loraplane.builders.settings import BuildSettings
from loraplane.api.wire.trainer import INSECURE_HTTP_ENV
from loraplane.api import paths
from loraplane.api.keys import PRODUCED_BY_ANNOTATION
from loraplane.api.paths import (
    DATA_CONFIGMAP_ROOT, MODEL_CACHE_PATH, OUTPUT_SCRATCH, PVC_ROOT, RENDEZVOUS_PORT, TRAINER_CONFIG_KEY,
    TRAINER_CONFIG_PATH,
)
from loraplane.api.redaction import scrubbed
from loraplane.api.reasons import Reason
from loraplane.api.wire.trainer import (
    EXIT_PREEMPTED, NOT_RETRYABLE_EXIT_CODES, PREVIOUS_VERSION_KEY, PreviousVersion, TerminationMessage,
)
from loraplane.storage.uri import CREDENTIAL_ENV, pvc_mount_path

# The trainer's paths and ports inside its pod (api.paths; the trainer reads the same defaults).
CONFIG_KEY, CONFIG_DIR, CONFIG_PATH = TRAINER_CONFIG_KEY, paths.CONFIG_DIR, TRAINER_CONFIG_PATH
TRAINER_CONTAINER = "trainer"


def job_name(ftj: FineTuneJob) -> str:
    """Name of the FineTuneJob's batch/v1 Job: `<ftj>-train`, at most 63 characters (it becomes a label value);
    a DNS label for multi-node jobs, whose pods' hostnames are `<job>-<index>`."""
    # The Job name becomes the pods' `job-name` label: it must fit a 63-character label value.
    form = "label" if ftj.spec.resources.nodes > 1 else "subdomain"
    return child_name(ftj.metadata.name or "", "train", 63, form)


def config_name(ftj: FineTuneJob) -> str:
    """Name of the trainer config ConfigMap: `<ftj>-config` (ConfigMap names may have 253 characters)."""
    return child_name(ftj.metadata.name or "", "config", 253)


def trainer_account_name(ftj: FineTuneJob) -> str:
    """Name of the trainer's ServiceAccount, Role and RoleBinding: `<ftj>-trainer` (up to 253 characters)."""
    return child_name(ftj.metadata.name or "", "trainer", 253)


def rendezvous_service_name(ftj: FineTuneJob) -> str:
    """Name of the headless torchrun rendezvous Service: `<ftj>-rdzv`, a DNS-1035 label (Service names are)."""
    return child_name(ftj.metadata.name or "", "rdzv", 63, "dns1035")


def labels(ftj: FineTuneJob) -> dict[str, str]:
    """Labels of every child of a FineTuneJob: the base labels (component trainer) and loraplane.io/finetunejob
    (`owner_label`)."""
    return {**base_labels(ftj, "trainer"), FINETUNEJOB_LABEL: owner_label(ftj.metadata.name or "")}


def owner_label(ftj_name: str) -> str:
    """The loraplane.io/finetunejob label value of the children (and the produced Adapter) of FineTuneJob
    `ftj_name`: the name itself, shortened with a hash beyond 63 characters (`label_value`)."""
    return label_value(ftj_name)


def run_id(ftj: FineTuneJob) -> str | None:
    """This run's identity in output paths: `run-` + the first 8 characters of the FineTuneJob's uid (None before
    the API server assigned one: a file rendered locally). A job deleted and recreated under the same name is a
    new run (a new uid); the pods of one run (retries, a preempted pod's successor) share it."""
    uid = ftj.metadata.uid
    return f"run-{uid[:8]}" if uid else None


def output_root(ftj: FineTuneJob, settings: BuildSettings) -> str:
    """Where runs of this job write: spec.output.uri, else `<artifact_store>/<namespace>/<job name>`."""
    if ftj.spec.output.uri:
        return ftj.spec.output.uri
    return f"{settings.artifact_store.rstrip('/')}/{namespace_of(ftj)}/{ftj.metadata.name}"


def output_uri(ftj: FineTuneJob, settings: BuildSettings) -> str:
    """Where this run writes its adapter: `<output_root>/<run_id>` (the trainer puts its checkpoints beside it,
    `<…>/<run_id>.checkpoints`), so a recreated job (another uid) never resumes from or overwrites another run's
    checkpoints or the artifact a served Adapter version points to. Without a uid (a file rendered locally):
    output_root itself."""
    root, run = output_root(ftj, settings), run_id(ftj)
    return f"{root.rstrip('/')}/{run}" if run else root


def output_claim(output: str) -> str | None:
    """The PVC a run whose output location is `output` writes to (pvc://CLAIM/...), else None (s3://, paths)."""
    claims = pvc_claims(output)
    return claims[0] if claims else None


def store_claim(settings: BuildSettings) -> str | None:
    """The claim of the operator's artifact store when it is pvc://CLAIM[/PATH], else None."""
    return output_claim(settings.artifact_store)


def artifact_claim(namespace: str, claim: str, settings: BuildSettings) -> Manifest:
    """The PersistentVolumeClaim `claim` of the artifact store in `namespace`, as the chart's operator.artifacts
    describe it (access mode, size, StorageClass; none: the cluster's default). It has no ownerReference: every
    FineTuneJob of the namespace writes to it and Adapters are served from it, so it outlives any one job, and
    the operator only ever creates it (never changes or deletes a claim)."""
    c = settings.artifact_claim
    spec: dict[str, Any] = {"accessModes": [c.access_mode], "resources": {"requests": {"storage": quantity(c.size)}}}
    if c.storage_class:
        spec["storageClassName"] = c.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace,
                         "labels": {"app.kubernetes.io/name": "loraplane", "app.kubernetes.io/component": "artifacts",
                                    "app.kubernetes.io/managed-by": MANAGER}},
            "spec": spec}


def trainer_config(ftj: FineTuneJob, settings: BuildSettings, output: str | None = None,
                   previous: PreviousVersion | None = None) -> dict[str, Any]:
    """What the trainer reads (`--config`): the FineTuneJob manifest with defaults resolved: output.uri is this
    run's own location (output_uri), or `output` when given (a run keeps the location it started with); and,
    under PREVIOUS_VERSION_KEY, the version the run would replace, which spec.evaluation scores too
    (`previous_version`)."""
    spec = ftj.spec.model_copy(update={"output": ftj.spec.output.model_copy(
        update={"uri": output or output_uri(ftj, settings)})})
    wire = spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    ev = spec.evaluation
    if spec.dataset.format == "classification" and ev is not None and "metrics" not in ev.model_fields_set:
        # The default metrics (rouge_l, ...) are refused for a classification job (it is scored by accuracy only):
        # dumped, they made the trainer refuse its own config (InvalidConfig) for every classifier evaluated.
        wire["evaluation"].pop("metrics", None)
    out = {
        "apiVersion": ftj.api_version, "kind": ftj.kind,
        "metadata": {"name": ftj.metadata.name, "namespace": namespace_of(ftj)},
        "spec": wire,
    }
    if previous is not None:
        out[PREVIOUS_VERSION_KEY] = previous.model_dump(by_alias=True, exclude_none=True, mode="json")
    return out


def previous_version(ftj: FineTuneJob, adapter: dict | None) -> PreviousVersion | None:
    """The version of `adapter` (the live Adapter named by spec.output.adapterName, as stored) that a run of `ftj`
    would replace, for spec.evaluation to score: its status.artifact.uri (and sha256) and status.version. None
    without spec.evaluation (or with comparePrevious false), without an Adapter, without a known artifact URI,
    or when the Adapter already is this job's own output."""
    ev = ftj.spec.evaluation
    if ev is None or not ev.compare_previous or not adapter:
        return None
    meta = adapter.get("metadata") or {}
    if ftj.metadata.uid and (meta.get("annotations") or {}).get(PRODUCED_BY_ANNOTATION) == ftj.metadata.uid:
        return None
    status = adapter.get("status") or {}
    artifact = status.get("artifact") or {}
    uri, sha, version = artifact.get("uri"), artifact.get("sha256"), status.get("version")
    if not isinstance(uri, str) or not uri:
        return None
    return PreviousVersion(uri=uri, version=version if isinstance(version, str) else None,
                           sha256=sha if isinstance(sha, str) and len(sha) == 64 else None)


def config_map(ftj: FineTuneJob, settings: BuildSettings, output: str | None = None,
               previous: PreviousVersion | None = None) -> Manifest:
    """The ConfigMap holding `trainer_config` as sorted JSON under CONFIG_KEY (mounted at CONFIG_PATH)."""
    body = json.dumps(trainer_config(ftj, settings, output, previous), indent=2, sort_keys=True)
    return with_hash({"apiVersion": "v1", "kind": "ConfigMap",
                      "metadata": metadata(ftj, config_name(ftj), labels(ftj)),
                      "data": {CONFIG_KEY: body + "\n"}})


def rbac(ftj: FineTuneJob) -> list[Manifest]:
    """ServiceAccount (unless the spec names one), Role and RoleBinding: get/patch this job's status only."""
    name = trainer_account_name(ftj)
    rules = [{"apiGroups": ["loraplane.io"], "resources": ["finetunejobs/status"],
              "resourceNames": [ftj.metadata.name], "verbs": ["get", "patch"]}]
    out = []
    account = ftj.spec.service_account_name or name
    if not ftj.spec.service_account_name:
        out.append(service_account(ftj, name, labels(ftj)))
    out.append(role(ftj, name, labels(ftj), rules))
    out.append(role_binding(ftj, name, labels(ftj), name, account))
    return out


def _credential_env(ref) -> list[dict[str, Any]]:
    """A credentials Secret reference as env: one key under its own name, or every storage.uri.CREDENTIAL_ENV
    variable (each optional)."""
    if ref is None:
        return []
    return [secret_env(k, ref.name, k) for k in ([ref.key] if ref.key else CREDENTIAL_ENV)]


def _volumes(ftj: FineTuneJob, settings: BuildSettings) -> tuple[list[dict], list[dict]]:
    spec = ftj.spec
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_name(ftj)}},
        {"name": "model-cache", "emptyDir": {}},
        # PyTorch data loaders and NCCL use shared memory; the container default (64 MiB) is too small.
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        {"name": "output-scratch", "emptyDir": {}},
        # The root filesystem is read-only: HOME and TMPDIR (torch, Triton, datasets scratch) live here.
        scratch_volume("tmp", "8Gi"),
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "model-cache", "mountPath": MODEL_CACHE_PATH},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "output-scratch", "mountPath": OUTPUT_SCRATCH},
        scratch_mount("tmp"),
    ]
    writable = set(pvc_claims(output_uri(ftj, settings)))
    eval_ds = spec.evaluation.dataset if spec.evaluation else None
    for claim in pvc_claims(spec.base_model.uri, spec.dataset.uri, spec.dataset.validation_uri,
                            eval_ds.uri if eval_ds else None, output_uri(ftj, settings)):
        read_only = claim not in writable
        volumes.append({"name": pvc_volume_name(claim),
                        "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}})
        mounts.append({"name": pvc_volume_name(claim), "mountPath": pvc_mount_path(claim), "readOnly": read_only})
    if spec.dataset.config_map_ref:
        cm = spec.dataset.config_map_ref.name
        volumes.append({"name": "dataset", "configMap": {"name": cm}})
        mounts.append({"name": "dataset", "mountPath": f"{DATA_CONFIGMAP_ROOT}/{cm}", "readOnly": True})
    if eval_ds and eval_ds.config_map_ref and not (
            spec.dataset.config_map_ref and spec.dataset.config_map_ref.name == eval_ds.config_map_ref.name):
        cm = eval_ds.config_map_ref.name   # the same ConfigMap as the training data is mounted once, above
        volumes.append({"name": "evaluation-dataset", "configMap": {"name": cm}})
        mounts.append({"name": "evaluation-dataset", "mountPath": f"{DATA_CONFIGMAP_ROOT}/{cm}", "readOnly": True})
    return volumes, mounts


def _command(ftj: FineTuneJob) -> list[str]:
    spec = ftj.spec
    nodes, per_node = spec.resources.nodes, max(spec.resources.gpus, 1)
    trainer = ["-m", "loraplane.trainer", "--config", CONFIG_PATH]
    if nodes > 1:
        master = f"{job_name(ftj)}-0.{rendezvous_service_name(ftj)}"
        return ["torchrun", f"--nnodes={nodes}", f"--nproc-per-node={per_node}",
                "--node-rank=$(JOB_COMPLETION_INDEX)", f"--master-addr={master}",
                f"--master-port={RENDEZVOUS_PORT}", *trainer]
    if per_node > 1:
        return ["torchrun", "--standalone", f"--nproc-per-node={per_node}", *trainer]
    return ["python3", *trainer]


def job(ftj: FineTuneJob, settings: BuildSettings) -> Manifest:
    """The batch/v1 Job that runs the trainer: one pod per node (Indexed with torchrun when nodes > 1),
    restartPolicy Never, a 300 s grace period to checkpoint on SIGTERM, and the pod failure policy."""
    spec, res = ftj.spec, ftj.spec.resources
    volumes, mounts = _volumes(ftj, settings)
    env = [
        {"name": "LORAPLANE_JOB_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "LORAPLANE_JOB_NAME", "value": ftj.metadata.name},
        {"name": "LORAPLANE_PVC_ROOT", "value": PVC_ROOT},
        {"name": "LORAPLANE_OUTPUT_SCRATCH", "value": OUTPUT_SCRATCH},
        {"name": "HF_HOME", "value": f"{MODEL_CACHE_PATH}/hf"},
        *scratch_env(),
        {"name": "OMP_NUM_THREADS", "value": "1"} if not res.gpus else None,
        # The trainer's --allow-insecure-http (storage.fetchers.FetchPolicy.from_env), from the chart's setting.
        {"name": INSECURE_HTTP_ENV, "value": "true"} if settings.allow_insecure_http else None,
        *_credential_env(spec.base_model.credentials_secret_ref),
        *_credential_env(spec.dataset.credentials_secret_ref),
    ]
    env = list({e["name"]: e for e in env if e}.values())  # model and dataset Secrets may share names
    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "image": spec.image or settings.trainer,
        "command": _command(ftj),
        "env": env,
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        # The trainer writes {"reason","message"} (failure) or its result JSON (success) here; a crash
        # before that leaves the log tail, which is what the user needs then.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if r := resources(res.gpus, res.gpu_resource, res.cpu, res.memory):
        container["resources"] = r
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # On SIGTERM (preemption, drain) the trainer finishes its step and saves a checkpoint before exiting.
        "terminationGracePeriodSeconds": 300,
        "serviceAccountName": spec.service_account_name or trainer_account_name(ftj),
        # Pod Security `restricted` (docs/security.md, "Engine pods and network"); fsGroup makes the output PVC
        # writable by the trainer's group.
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": volumes,
    }
    pod_spec.update(node_placement(res.node_selector, res.gpu_type, res.gpu_type_label, res.tolerations))
    job_spec: dict[str, Any] = {
        "backoffLimit": spec.backoff_limit,
        "completions": res.nodes,
        "parallelism": res.nodes,
        "template": {"metadata": {"labels": labels(ftj)}, "spec": pod_spec},
    }
    if res.nodes > 1:
        # Pod i is reachable as <job>-i.<service>: rank 0 is torchrun's rendezvous master.
        job_spec["completionMode"] = "Indexed"
        pod_spec["subdomain"] = rendezvous_service_name(ftj)
        container["ports"] = [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}]
    # The chart's childPods (shared, then childPods.trainer) and spec.pod: pull secrets, security context,
    # priority, labels, node selection.
    apply_pod_settings(job_spec["template"], component_pod_defaults(settings.child_pods, "trainer"), spec.pod)
    if settings.pod_failure_policy:  # requires restartPolicy Never, as above
        job_spec["podFailurePolicy"] = pod_failure_policy()
    if spec.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.suspend:  # only when set: Kubernetes < 1.21 rejects the field in a server-side apply
        job_spec["suspend"] = True
    # The pod settings' labels go on the Job object too: queueing systems read the Job's own metadata (Kueue's
    # kueue.x-k8s.io/queue-name decides whether and where the Job is admitted; on the pod template only, Kueue
    # never sees it). The operator's labels win, as on the pods.
    job_labels = {**job_spec["template"]["metadata"].get("labels", {}), **labels(ftj)}
    return with_hash({"apiVersion": "batch/v1", "kind": "Job",
                      "metadata": metadata(ftj, job_name(ftj), dict(sorted(job_labels.items()))), "spec": job_spec})


def pod_failure_policy() -> dict[str, Any]:
    """Which trainer pod failures count against spec.backoffLimit (batch/v1, Kubernetes >= 1.26).

    - A disrupted pod (preemption, eviction, node drain: the DisruptionTarget condition) and a trainer that
      exited EXIT_PREEMPTED after saving a checkpoint are not failures of the run: the next pod resumes.
    - An input error (bad config, dataset or model location, target modules) fails the Job at once: a new pod
      would fail the same way, after paying for a GPU node and a model download again.
    Everything else (OOM, transient network errors, crashes) counts as usual.
    """
    return {"rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "Ignore", "onExitCodes": {"containerName": TRAINER_CONTAINER, "operator": "In",
                                             "values": [EXIT_PREEMPTED]}},
        {"action": "FailJob", "onExitCodes": {"containerName": TRAINER_CONTAINER, "operator": "In",
                                              "values": list(NOT_RETRYABLE_EXIT_CODES)}},
    ]}


def rendezvous_service(ftj: FineTuneJob) -> Manifest:
    """Headless Service (publishNotReadyAddresses) that gives each indexed pod a DNS name for torchrun's
    rendezvous on RENDEZVOUS_PORT; only built for multi-node jobs."""
    return with_hash({
        "apiVersion": "v1", "kind": "Service",
        "metadata": metadata(ftj, rendezvous_service_name(ftj), labels(ftj)),
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                 "selector": {FINETUNEJOB_LABEL: owner_label(ftj.metadata.name or "")},
                 "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT, "protocol": "TCP"}]},
    })


def children(ftj: FineTuneJob, settings: BuildSettings, output: str | None = None,
             previous: PreviousVersion | None = None) -> list[Manifest]:
    """Everything the operator applies for a FineTuneJob, in apply order (the Job last); `output`: the run's
    output location when it is not output_uri, `previous`: the version it would replace (trainer_config)."""
    out = [config_map(ftj, settings, output, previous), *rbac(ftj)]
    if ftj.spec.resources.nodes > 1:
        out.append(rendezvous_service(ftj))
    out.append(job(ftj, settings))
    return out


# ---- what success produces ---------------------------------------------------------------------------

def bump_version(current: str | None) -> str:
    """The next version: numbers count up ("3" -> "4"); anything else gets a counter ("v3" -> "v3.2")."""
    if not current:
        return "1"
    if current.isdigit():
        return str(int(current) + 1)
    head, sep, tail = current.rpartition(".")
    if sep and tail.isdigit() and head:
        return f"{head}.{int(tail) + 1}"
    return f"{current}.2"


def hyperparameters(ftj: FineTuneJob) -> dict[str, Any]:
    """spec.method and spec.training in wire form (camelCase, no nulls): Adapter provenance's hyperparameters."""
    return {"method": ftj.spec.method.model_dump(by_alias=True, exclude_none=True, mode="json"),
            "training": ftj.spec.training.model_dump(by_alias=True, exclude_none=True, mode="json")}


def produced_adapter(ftj: FineTuneJob, artifact_uri: str, artifact_sha256: str | None,
                     existing: Adapter | None) -> Manifest:
    """The Adapter a successful FineTuneJob creates, or the next version of `existing` (the controller decides
    whether the job may bump it: spec.output.allowExistingAdapter).

    Idempotent across operator restarts: when `existing` already carries this job's uid in
    PRODUCED_BY_ANNOTATION its version is kept, not bumped again. The Adapter has no ownerReference to the job:
    a served Adapter must outlive the run that made it (deleting or pruning a FineTuneJob would otherwise
    garbage-collect it); provenance (the job's name and uid) says where it came from. Applying this manifest
    also drops the FineTuneJob ownerReferences earlier operator versions set (server-side apply removes the
    fields its manager no longer sets).
    """
    uid = ftj.metadata.uid or ""
    if existing is None:
        version = "1"
    elif existing.metadata.annotations.get(PRODUCED_BY_ANNOTATION) == uid and existing.spec.version:
        version = existing.spec.version
    else:
        version = bump_version(existing.spec.version)
    base = {"name": ftj.spec.base_model.identity}
    if ftj.spec.base_model.revision:
        base["revision"] = ftj.spec.base_model.revision
    source: dict[str, Any] = {"uri": artifact_uri}
    if artifact_sha256:
        source["sha256"] = artifact_sha256
    spec: dict[str, Any] = {"baseModel": base, "source": source, "version": version, "rank": ftj.spec.method.r}
    if ftj.spec.method.target_modules:
        spec["targetModules"] = list(ftj.spec.method.target_modules)
    adapter_labels = {**ftj.spec.output.adapter_labels, FINETUNEJOB_LABEL: owner_label(ftj.metadata.name or "")}
    return {
        "apiVersion": ftj.api_version, "kind": "Adapter",
        "metadata": {"name": ftj.spec.output.adapter_name, "namespace": namespace_of(ftj),
                     "labels": dict(sorted(adapter_labels.items())),
                     "annotations": {PRODUCED_BY_ANNOTATION: uid}},
        "spec": spec,
    }


def provenance(ftj: FineTuneJob, result: TerminationMessage | None, completed_at: str | None) -> dict[str, Any]:
    """Adapter.status.provenance (wire form) from the job and the trainer's result message (None: none read)."""
    result = result or TerminationMessage(reason=Reason.Succeeded)
    spec = ftj.spec
    out: dict[str, Any] = {
        "fineTuneJob": ftj.metadata.name,
        "fineTuneJobUid": ftj.metadata.uid,
        "baseModel": spec.base_model.identity,
        "baseModelRevision": spec.base_model.revision,
        # Scrubbed (api.redaction): a presigned dataset URL's signature would otherwise reach everyone who may
        # read the produced Adapter, a wider audience than the FineTuneJob's.
        "datasetUri": (scrubbed(spec.dataset.uri) if spec.dataset.uri else None) or (f"configmap://{spec.dataset.config_map_ref.name}/"
                                           f"{spec.dataset.config_map_ref.key}" if spec.dataset.config_map_ref
                                           else None),
        "datasetSha256": result.dataset_sha256,
        "hyperparameters": hyperparameters(ftj),
        "metrics": {k: float(v) for k, v in result.metrics.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)} or None,
        "libraryVersions": {k: str(v) for k, v in result.library_versions.items()} or None,
        "evaluation": result.evaluation.wire() if result.evaluation is not None else None,
        "completedAt": completed_at,
    }
    return {k: v for k, v in out.items() if v is not None}
