"""Every reason loraplane puts in a condition, a failure or a replica report, with what it means and the fix.

`Reason` is the one spelling of each: code writes `Reason.RankTooLarge`, never the bare string. Each member
carries where it is shown (`where`), what it means (`means`, also its `__doc__`) and the fix (`fix`).
docs/troubleshooting.md is generated from this enum (`loraplane crds` writes it, a test fails when it is stale).
Reasons are CamelCase, as Kubernetes condition reasons are (metav1.Condition.reason).
"""

from __future__ import annotations

from enum import StrEnum

FTJ = "FineTuneJob status.failure.reason / Ready"
ADAPTER = "Adapter Ready / Compatible; loader report"
ROUTE = "ModelRoute Ready"
ANY = "any kind, Ready"


class Reason(StrEnum):
    """A CamelCase machine-readable reason (metav1.Condition.reason, FineTuneJob status.failure.reason, a replica
    report's adapter reason). Compares equal to its string, so it goes into JSON and conditions as-is."""

    where: str
    means: str
    fix: str

    def __new__(cls, value: str, where: str, means: str, fix: str) -> "Reason":
        member = str.__new__(cls, value)
        member._value_ = value
        member.where, member.means, member.fix = where, means, fix
        member.__doc__ = means
        return member

    # --- all kinds ----------------------------------------------------------------------------------------
    InvalidSpec = ("InvalidSpec", ANY,
        "The spec fails validation (schema or a cross-field rule); the message names the field. "
        "Nothing is created or changed for this object.",
        "Fix the named field (`loraplane validate FILE` shows the same errors before you apply).")
    SpecImmutable = ("SpecImmutable", ANY,
        "A field that cannot change after creation was changed (e.g. a FineTuneJob's dataset "
        "or an Adapter's base model). The operator keeps acting on the last accepted spec.",
        "Revert the change, or create a new object (a new FineTuneJob name, a new Adapter).")
    # --- FineTuneJob ----------------------------------------------------------------------------------------
    Pending = ("Pending", FTJ, "The training Job exists but no trainer pod runs yet (scheduling, image pull, a PVC).",
        "`kubectl describe pod -l loraplane.io/finetunejob=NAME`: look for unschedulable GPUs or a missing PVC.")
    Running = ("Running", FTJ, "Training; `status.progress` has step, loss, tokens/s and ETA.", "Nothing to do.")
    Succeeded = ("Succeeded", FTJ, "Training finished; the Adapter in `status.adapterRef` holds the result.",
        "Serve it: reference the Adapter from a ModelRoute.")
    Retrying = ("Retrying", FTJ, "A trainer pod failed and the Job starts another, which resumes from the newest "
        "checkpoint; the message has the failed pod's reason and the retries used.",
        "Nothing if it recovers; if the same reason repeats, fix it (the run fails at `backoffLimit`). Input "
        "errors (InvalidConfig, InvalidDataset, DatasetNotFound, DatasetAccessDenied, ModelNotFound, "
        "TargetModulesNotFound) are not retried where the Job has a podFailurePolicy: the run fails at once.")
    AdapterExists = ("AdapterExists", FTJ,
        "`spec.output.adapterName` names an Adapter that this FineTuneJob did not create (made by hand or by "
        "another run), and `spec.output.allowExistingAdapter` is not true: the job does not publish a version of "
        "it. Checked before the Job starts (nothing runs) and again when training finishes (the artifact is kept "
        "at `status.artifact`, unpublished).",
        "Recreate the FineTuneJob with `spec.output.allowExistingAdapter: true` to publish a new version of that "
        "Adapter, or with another `adapterName`; or publish `status.artifact` yourself (an Adapter with that "
        "`source.uri` and `sha256`).")
    Suspended = ("Suspended", FTJ, "`spec.suspend: true`: pods are stopped, checkpoints are kept.",
        "Set `spec.suspend: false` to resume from the newest checkpoint.")
    Preempted = ("Preempted", FTJ,
        "The trainer pod was preempted, evicted or drained (after SIGTERM it saves a checkpoint "
        "and exits); the next pod resumes from it. With the Job's podFailurePolicy (Kubernetes >= 1.26) this does "
        "not use up `backoffLimit`.",
        "Nothing, unless it repeats: then look at node pressure or spot interruptions.")
    InvalidConfig = ("InvalidConfig", FTJ,
        "The trainer refused its configuration (e.g. an output location it cannot write).",
        "Read the message; fix the named field.")
    InvalidDataset = ("InvalidDataset", FTJ,
        "The dataset is readable but wrong: empty, not JSON lines, missing the fields the "
        "format needs, or records longer than `training.maxSeqLength`.",
        "Fix the records, or `dataset.format` / the field names (`promptField`, …) / `maxSeqLength`.")
    DatasetNotFound = ("DatasetNotFound", FTJ, "No dataset at `spec.dataset.uri` (or the ConfigMap key).",
        "Check the URI / PVC path / ConfigMap name and key.")
    DatasetAccessDenied = ("DatasetAccessDenied", FTJ, "The dataset store refused the credentials.",
        "Check `dataset.credentialsSecretRef` (AWS_* or HF_TOKEN keys) and the bucket policy.")
    DatasetUnavailable = ("DatasetUnavailable", FTJ,
        "Fetching the dataset failed transiently (network, server error); retried per "
        "`backoffLimit`.", "Retry later; check the store's availability.")
    ModelNotFound = ("ModelNotFound", FTJ,
        "The base model could not be found or loaded (wrong id, revision, path, or gated).",
        "Check `baseModel.name` / `revision` / `uri`; gated hub models need `credentialsSecretRef` with HF_TOKEN.")
    TargetModulesNotFound = ("TargetModulesNotFound", f"{FTJ}; {ADAPTER}",
        "`method.targetModules` (or an adapter's target modules) "
        "name modules the base model does not have; the message lists the ones it has.",
        "Use module names of this architecture (e.g. q_proj, v_proj for Llama), or omit them for the default.")
    OutOfMemory = ("OutOfMemory", FTJ, "The trainer ran out of (GPU) memory.",
        "Lower `training.batchSize` or `maxSeqLength`, use gradient checkpointing or `method.type: qlora`, or more "
        "GPU memory.")
    OOMKilled = ("OOMKilled", FTJ, "The kernel killed the trainer container at its memory limit.",
        "Raise `resources.memory`, or lower batch size / sequence length.")
    OutputWriteFailed = ("OutputWriteFailed", FTJ,
        "The adapter could not be written to `output.uri` (PVC full or read-only, S3 "
        "refused).", "Check the output PVC's capacity and access mode, or the S3 credentials.")
    ImagePull = ("ImagePull", f"{FTJ}; {ROUTE}",
        "An image cannot be pulled (trainer, vLLM, loader or model fetch); the "
        "message names the container and the image.", "Check `spec.image` (FineTuneJob), `spec.engine.image` "
        "(ModelRoute), the chart's image values and the imagePullSecrets.")
    DeadlineExceeded = ("DeadlineExceeded", FTJ, "The run exceeded `spec.activeDeadlineSeconds`.",
        "Raise the deadline, or resume: a new FineTuneJob with the same output continues from the checkpoints.")
    BackoffLimitExceeded = ("BackoffLimitExceeded", FTJ,
        "Trainer pods failed more than `spec.backoffLimit` times; the message has the "
        "last pod's reason.", "Fix the cause the last failure names, then create a new FineTuneJob.")
    JobFailed = ("JobFailed", FTJ, "The Job failed for a reason Kubernetes did not categorise.",
        "`kubectl describe job` and the trainer pod's log.")
    InternalError = ("InternalError", FTJ, "The trainer failed unexpectedly; the message has the exception.",
        "Look at the pod log; report it with the FineTuneJob if it is a bug.")
    TrainerError = ("TrainerError", FTJ,
        "The trainer exited with an error code of no known reason and left no termination message (e.g. killed "
        "before it could write one); the message has the exit code and the log's tail.",
        "Read the log tail in the message and the pod log (`kubectl logs -l loraplane.io/finetunejob=NAME`).")
    # --- Adapter --------------------------------------------------------------------------------------------
    NoRoute = ("NoRoute", ADAPTER, "No ModelRoute in the namespace references or selects this Adapter.",
        "Add it to a ModelRoute's `routes` (by name or label selector).")
    ArtifactPending = ("ArtifactPending", ADAPTER,
        "The Adapter has no `source.uri` yet: its FineTuneJob has not finished.",
        "Wait for the FineTuneJob; `kubectl get ftj`.")
    AdapterNotFound = ("AdapterNotFound", f"{ROUTE} backend", "A route's backend names an Adapter that does not exist.",
        "Create the Adapter or fix the name in `spec.routes[].backends[].adapter`.")
    Compatible = ("Compatible", ADAPTER, "The metadata checks passed (base model, revision, rank).", "Nothing to do.")
    BaseModelMismatch = ("BaseModelMismatch", ADAPTER,
        "The adapter was trained on another base model than the route serves "
        "(by name, or by its weight shapes).", "Serve it on a ModelRoute of its base model, or retrain.")
    BaseModelRevisionMismatch = ("BaseModelRevisionMismatch", ADAPTER,
        "Same base model, different revision than the route's.",
        "Align `spec.baseModel.revision` of the Adapter and the ModelRoute, or retrain on the served revision.")
    RankTooLarge = ("RankTooLarge", ADAPTER,
        "The adapter's rank is above the route's `engine.maxLoraRank` (vLLM would refuse "
        "it).", "Raise `engine.maxLoraRank` (costs GPU memory) or retrain with a smaller `method.r`.")
    RankMismatch = ("RankMismatch", ADAPTER, "The declared `spec.rank` differs from the artifact's rank.",
        "Fix `spec.rank` or the artifact.")
    UnsupportedModulesToSave = ("UnsupportedModulesToSave", ADAPTER,
        "The adapter saves full modules (`modules_to_save`, e.g. a resized "
        "embedding or lm_head), which vLLM's LoRA serving cannot apply.",
        "Retrain without `modules_to_save` / vocabulary changes.")
    UnsupportedAdapterFeature = ("UnsupportedAdapterFeature", ADAPTER,
        "The adapter uses a PEFT feature vLLM cannot serve (e.g. DoRA).",
        "Retrain without it.")
    UnsupportedAdapterType = ("UnsupportedAdapterType", ADAPTER,
        "The artifact is not a LoRA adapter (another PEFT type).",
        "Serve LoRA adapters only.")
    UnsupportedDtype = ("UnsupportedDtype", ADAPTER,
        "The adapter's weights have a dtype vLLM cannot use with this engine.",
        "Save the adapter in float16/bfloat16/float32.")
    UnsupportedQuantization = ("UnsupportedQuantization", ADAPTER,
        "This combination of quantized base model and adapter is not served.",
        "Serve on an unquantized (or supported) base model.")
    InvalidAdapter = ("InvalidAdapter", ADAPTER,
        "The artifact is not a readable PEFT adapter directory (no adapter_config.json, "
        "no weights, corrupt files).", "Check the artifact at `source.uri`.")
    InvalidArtifact = ("InvalidArtifact", ADAPTER,
        "The artifact cannot be used as fetched (unsupported archive, missing "
        "library for the URI scheme).", "Use a PEFT directory or .tar.gz; see the message.")
    UnsafeArtifact = ("UnsafeArtifact", f"{ADAPTER}; ModelRoute ModelFetchFailed message",
        "The artifact holds something no artifact may: a device file, FIFO or socket, a link pointing outside "
        "the artifact (or to a directory), an absolute or '..' path in an archive. Nothing of it was kept.",
        "Rebuild the archive or directory from the adapter's files only (`tar czf a.tar.gz -C DIR .`).")
    ArtifactTooLarge = ("ArtifactTooLarge", f"{ADAPTER}; ModelRoute ModelFetchFailed message",
        "The artifact exceeds a loader limit: members in the archive, a file's or the total unpacked size "
        "(sparse files count with their full size), the download size, or the safetensors header length.",
        "Check that `source.uri` is the adapter you meant; a real LoRA adapter is far below the limits "
        "(docs/security.md, \"Artifacts and fetching\", lists them and the loader flags that raise them).")
    InvalidTargetModules = ("InvalidTargetModules", ADAPTER,
        "adapter_config.json's target_modules is a regular expression the gate will not run: RE2 cannot "
        "express it (backreferences, lookaround) or it is too long. Patterns are matched in linear time only.",
        "Write target_modules as a list of module names, or as a plain regular expression.")
    InsecureSource = ("InsecureSource", f"{ADAPTER}; ModelRoute ModelFetchFailed message; FineTuneJob message",
        "The fetch policy refused the URI or where it led: plain http:// without `allowInsecureHttp`, a "
        "redirect to a non-https URL, more than 5 redirects, or a host resolving to a loopback, link-local or "
        "cloud metadata address. Not retried.",
        "Serve the artifact over https from a reachable store; plain http only with the chart's "
        "`allowInsecureHttp: true` (local clusters).")
    ChecksumMismatch = ("ChecksumMismatch", ADAPTER, "The artifact's sha256 differs from `source.sha256`.",
        "Fix `source.sha256` or the artifact; a mismatch is never loaded.")
    FetchFailed = ("FetchFailed", ADAPTER, "Downloading or copying the artifact failed.",
        "Check the URI, the credentials Secret, and that a pvc:// claim exists in the namespace.")
    AccessDenied = ("AccessDenied", ADAPTER,
        "The artifact store refused the credentials (HTTP 401/403, S3 AccessDenied or no keys, a gated or private "
        "Hugging Face repo). Not retried: the message names the credentials used (the Secret of "
        "`source.credentialsSecretRef`, or the loader's own identity without one).",
        "Check `source.credentialsSecretRef`: the Secret exists in the Adapter's namespace with HF_TOKEN or AWS_* "
        "keys (or the one `key` named) that may read the artifact; then change the Adapter (e.g. `spec.version`) "
        "or restart the replicas to try again.")
    ArtifactChanged = ("ArtifactChanged", ADAPTER,
        "A replica fetched content for this version whose sha256 differs from the digest the Adapter recorded "
        "when the version was first served (`status.artifact.sha256`): the artifact at `source.uri` was "
        "overwritten. A published version is immutable; replicas refuse the changed content (ChecksumMismatch).",
        "Publish new weights as a new `spec.version` (and preferably a new URI); restore the original artifact "
        "to keep serving this version.")
    Desired = ("Desired", ADAPTER,
        "In the serving table; the replica's loader has not started on it yet (it waits for vLLM to answer).",
        "Wait; if it lasts, look at the replica's vLLM container.")
    Fetching = ("Fetching", ADAPTER, "The loader is downloading or copying the artifact into its cache.",
        "Wait; large artifacts over slow links take a while (the loader's load-time metrics show it).")
    Loading = ("Loading", ADAPTER, "Fetching, checking or loading into vLLM is in progress on some replica.",
        "Wait; activation takes seconds once vLLM is up.")
    Loaded = ("Loaded", ADAPTER,
        "Loaded and smoke-tested on at least one replica (`status.loadedOn`).", "Nothing to do.")
    AlreadyLoaded = ("AlreadyLoaded", ADAPTER,
        "vLLM already has an adapter of this name (another client loaded it meanwhile); the loader compares "
        "its path on the next pass and reloads it if it differs.",
        "Nothing, unless something other than the loader loads adapters into this vLLM: only the loader should.")
    LoadFailed = ("LoadFailed", ADAPTER,
        "vLLM refused the load after the bounded retries; the message has vLLM's words.",
        "Read the message (often rank, dtype or a corrupt file); fix the artifact and bump `spec.version`.")
    NoEffect = ("NoEffect", ADAPTER, "Loaded, but its output is identical to the base model's: the silent \"targets no "
        "modules\" / untrained-adapter failure. Not served.", "Retrain; check `targetModules` and that training "
        "actually ran (loss fell).")
    EngineUnavailable = ("EngineUnavailable", ADAPTER,
        "The replica's vLLM is not answering (starting, crashed); adapters are "
        "reloaded when it is back.", "Wait; if it persists, the vLLM container's log.")
    EngineRestarted = ("EngineRestarted", ADAPTER,
        "vLLM restarted; the loader is restoring every adapter.", "Nothing to do.")
    AdapterReplaced = ("AdapterReplaced", ADAPTER,
        "vLLM served this adapter's name from another path than the verified artifact the loader loaded: "
        "something else called vLLM's /v1/load_lora_adapter. The loader unloaded it and loaded its own artifact "
        "again.", "Find the caller: engine pods should be reachable only by their route's routers (the "
        "operator's NetworkPolicy) and vLLM needs the route's engine key (docs/security.md, \"Engine pods and "
        "network\").")
    NotDesired = ("NotDesired", ADAPTER, "The adapter was unloaded because the serving table no longer lists it.",
        "Nothing, unless unexpected: check the ModelRoute's routes.")
    NotLoaded = ("NotLoaded", f"{ROUTE} backend", "No replica reports this backend loaded yet.",
        "Look at the Adapter's Ready condition for why.")
    # --- ModelRoute -----------------------------------------------------------------------------------------
    Progressing = ("Progressing", ROUTE, "Children are being created or rolled out: the engine Deployment does "
        "not yet run the current spec on every replica (the message says how far it is); replicas of the previous "
        "spec keep serving meanwhile.", "Wait; if it lasts, `kubectl rollout status deployment/NAME-engine`.")
    RolloutStalled = ("RolloutStalled", ROUTE,
        "The engine Deployment's rollout of the current spec made no progress within its progress deadline "
        "(Deployment condition Progressing=False, ProgressDeadlineExceeded) and no pod shows why; replicas of the "
        "previous spec keep serving.",
        "`kubectl describe deployment NAME-engine` and its newest pods; fix `spec.engine` or revert the change.")
    NoReadyReplicas = ("NoReadyReplicas", ROUTE,
        "No vLLM replica is ready yet and no pod shows a failure: starting, pulling the "
        "image, downloading or loading the model (large models take minutes).",
        "Wait; if it lasts, `kubectl describe pod -l loraplane.io/route=NAME`.")
    Unschedulable = ("Unschedulable", f"{ROUTE}; {FTJ}", "No node fits the pod: the message quotes the scheduler (e.g. "
        "`0/4 nodes are available: 4 Insufficient nvidia.com/gpu`).",
        "Free or add GPU nodes, or change the request: `spec.engine.gpus` / `gpuType` / `nodeSelector` / "
        "`tolerations` (ModelRoute), `spec.resources` (FineTuneJob).")
    ModelFetchFailed = ("ModelFetchFailed", ROUTE,
        "The init container could not fetch the `s3://` / `https://` base model; the "
        "message has its error (missing prefix, denied, not a model directory).",
        "Fix `spec.baseModel.uri` or `spec.baseModel.credentialsSecretRef` (AWS_* keys, AWS_ENDPOINT_URL for "
        "S3-compatible stores); a new ModelRoute is needed to change the base model.")
    EngineFailing = ("EngineFailing", ROUTE,
        "A container of the engine pods (vLLM or the adapter loader) exits with an error and "
        "is restarted; the message has its exit and the last lines of its log (e.g. CUDA out of memory, an "
        "unsupported model architecture, a bad extraArgs flag).",
        "Fix what the quoted log says: `spec.engine` (gpuMemoryUtilization, maxModelLen, tensorParallelSize, "
        "extraArgs), memory limits, or the model.")
    PublicNameConflict = ("PublicNameConflict", ROUTE,
        "Two sources of one ModelRoute publish the same public model name (a route's `name` and a selector's "
        "`prefix` + Adapter name, or two selectors); the message names both. The later source is left out of the "
        "serving table: an explicit route (with `backends`) wins over a selector, an earlier route over a later "
        "one. Every other name is served.",
        "Rename the route, change the selector route's `prefix`, or narrow its selector so the names differ.")
    ModelsNotReady = ("ModelsNotReady", ROUTE,
        "Replicas are up but some public models have no ready backend; the message lists "
        "them.", "Look at each named Adapter's Ready condition.")
    Degraded = ("Degraded", ROUTE, "Some, not all, replicas or backends are ready.", "See the message.")
    Ready = ("Ready", ROUTE, "Every public model has a ready backend on a ready replica.", "Nothing to do.")
    # --- Events only ----------------------------------------------------------------------------------------
    Created = ("Created", "Event on an Adapter", "A FineTuneJob created this Adapter.", "Nothing to do.")
    VersionBumped = ("VersionBumped", "Event on an Adapter", "A FineTuneJob wrote a new version of this Adapter; replicas load "
        "it under a new internal name.", "Nothing to do; the old version is unloaded once unused.")
