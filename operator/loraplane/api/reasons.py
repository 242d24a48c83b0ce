"""Every reason loraplane puts in a condition, a failure or a replica report, with what it means and the fix.

`Reason` is the one spelling of each: code writes `Reason.RankTooLarge`, never the bare string. Each member
carries where it is shown (`where`), what it means (`means`, also its `__doc__`), the fix (`fix`) and, as
Ready's reason, whether the object is progressing, stalled or settled (`progress`, a `Progress`).
docs/troubleshooting.md is generated from this enum (`loraplane crds` writes it, a test fails when it is stale).
Reasons are CamelCase, as Kubernetes condition reasons are (metav1.Condition.reason).
"""

from __future__ import annotations

from enum import StrEnum

FTJ = "FineTuneJob status.failure.reason / Ready"
ADAPTER = "Adapter Ready / Compatible; loader report"
ROUTE = "ModelRoute Ready"
ANY = "any kind, Ready"
ROLLOUT = "Adapter status.rollout.reason (Ready when the rollout failed or was stopped); Event on an Adapter"
# The status.contentModels entries a content-routing reason is found on (each one a public model it names).
CONTENT_ENTRIES = (f"{ROUTE}; status.contentModels[] .destinations[].reason, .classifier.reason, "
                   ".embeddingModel.reason")


class Progress(StrEnum):
    """What a reason says about progress when it is Ready's reason: which of kstatus' Reconciling / Stalled
    conditions is True (api.conditions, api.common.set_kstatus_conditions). Every Reason names one."""

    Reconciling = "Reconciling"
    """Work is under way (scheduling, pulling, training, loading, rolling out): waiting helps."""
    Stalled = "Stalled"
    """Nothing changes until someone fixes the spec, the artifact, the credentials or the cluster (every terminal
    failure and refusal)."""
    Idle = "Idle"
    """Settled on purpose (a suspended job) or until another object refers to it (an Adapter no route selects):
    neither condition, so kstatus reads the object as Current (docs/gitops.md)."""
    Done = "Done"
    """A reason of Ready=True or of an event only: neither condition."""


RECONCILING, STALLED, IDLE, DONE = Progress.Reconciling, Progress.Stalled, Progress.Idle, Progress.Done


class Reason(StrEnum):
    """A CamelCase machine-readable reason (metav1.Condition.reason, FineTuneJob status.failure.reason, a replica
    report's adapter reason). Compares equal to its string, so it goes into JSON and conditions as-is."""

    where: str
    means: str
    fix: str
    progress: Progress

    def __new__(cls, value: str, where: str, means: str, fix: str, progress: Progress) -> "Reason":
        # `progress` is required, so no reason can be added without saying whether it stalls (issue 13 review:
        # terminal reasons left out of a hand-kept list read as Reconciling forever).
        member = str.__new__(cls, value)
        member._value_ = value
        member.where, member.means, member.fix, member.progress = where, means, fix, Progress(progress)
        member.__doc__ = means
        return member

    # --- all kinds ----------------------------------------------------------------------------------------
    InvalidSpec = ("InvalidSpec", ANY,
        "The spec fails validation (schema or a cross-field rule); the message names the field. "
        "Nothing is created or changed for this object.",
        "Fix the named field (`loraplane validate FILE` shows the same errors before you apply).", STALLED)
    SpecImmutable = ("SpecImmutable", ANY,
        "A field that cannot change after creation was changed (e.g. a FineTuneJob's dataset "
        "or an Adapter's base model). The operator keeps acting on the last accepted spec.",
        "Revert the change, or create a new object (a new FineTuneJob name, a new Adapter).", STALLED)
    PolicyViolation = ("PolicyViolation", f"{FTJ}; {ROUTE}",
        "The spec asks for something the operator's policy does not allow: an image outside the operator's "
        "repositories and allowedImages, a vLLM flag outside allowedEngineArgs (e.g. --trust-remote-code), a "
        "Secret or an environment variable name outside allowedEngineEnv in spec.engine.env (names the operator "
        "sets and code-loading or endpoint names are never allowed), or another ServiceAccount; the message names each field and the setting "
        "that would allow it. Nothing is created or changed for this object.",
        "Change the named field, or ask the platform team to allow it (chart values operator.policy.*; "
        "docs/security.md). `loraplane validate --policy values.yaml FILE` checks before you apply.", STALLED)
    NameConflict = ("NameConflict", ANY,
        "A child this object needs (Job, ConfigMap, Service, Deployment, ...) has a name that an object of "
        "another owner already has (the message names the child and its owner): a long name is shortened to "
        "`<head>-<hash8>`, which another object may be named. The child is neither adopted nor overwritten.",
        "Rename this object (or the other one), or delete the other object if it is stale.", STALLED)
    # --- FineTuneJob ----------------------------------------------------------------------------------------
    Pending = ("Pending", FTJ, "The training Job exists but no trainer pod runs yet (scheduling, image pull, a PVC).",
        "`kubectl describe pod -l loraplane.io/finetunejob=NAME`: look for unschedulable GPUs or a missing PVC.", RECONCILING)
    Running = ("Running", FTJ, "Training; `status.progress` has step, loss, tokens/s and ETA.", "Nothing to do.", RECONCILING)
    ArtifactClaimMissing = ("ArtifactClaimMissing", FTJ,
        "The PersistentVolumeClaim the run writes to (spec.output.uri pvc://CLAIM/..., or the operator's pvc:// "
        "artifact store when the chart's operator.artifacts.createClaim is false) does not exist in the job's "
        "namespace: the trainer pod cannot start. The operator creates only the artifact store's claim, and only "
        "with createClaim.",
        "Create the claim (ReadWriteMany if adapters are served from several nodes), set spec.output.uri to an "
        "existing claim or s3://, or enable operator.artifacts.createClaim.", STALLED)
    ArtifactClaimPending = ("ArtifactClaimPending", FTJ,
        "The run's output PersistentVolumeClaim exists but is not bound to a volume: no default StorageClass, "
        "a StorageClass that cannot provide the access mode (many cannot give ReadWriteMany), or a "
        "WaitForFirstConsumer class that binds once the trainer pod is scheduled. The message names the claim, "
        "its StorageClass and access modes.",
        "`kubectl describe pvc CLAIM -n NAMESPACE` shows the provisioner's reason; set the chart's "
        "operator.artifacts.storageClassName / accessMode (a claim the operator created is never changed: delete "
        "it while nothing uses it, and it is created again), or use an s3:// artifact store.", RECONCILING)
    Succeeded = ("Succeeded", FTJ, "Training finished; the Adapter in `status.adapterRef` holds the result.",
        "Serve it: reference the Adapter from a ModelRoute.", DONE)
    Retrying = ("Retrying", FTJ, "A trainer pod failed and the Job starts another, which resumes from the newest "
        "checkpoint; the message has the failed pod's reason and the retries used.",
        "Nothing if it recovers; if the same reason repeats, fix it (the run fails at `backoffLimit`). Input "
        "errors (InvalidConfig, InvalidDataset, DatasetNotFound, DatasetAccessDenied, ModelNotFound, "
        "TargetModulesNotFound) are not retried where the Job has a podFailurePolicy: the run fails at once.", RECONCILING)
    AdapterExists = ("AdapterExists", FTJ,
        "`spec.output.adapterName` names an Adapter that this FineTuneJob did not create (made by hand or by "
        "another run), and `spec.output.allowExistingAdapter` is not true: the job does not publish a version of "
        "it. Checked before the Job starts (nothing runs) and again when training finishes (the artifact is kept "
        "at `status.artifact`, unpublished).",
        "Recreate the FineTuneJob with `spec.output.allowExistingAdapter: true` to publish a new version of that "
        "Adapter, or with another `adapterName`; or publish `status.artifact` yourself (an Adapter with that "
        "`source.uri` and `sha256`).", STALLED)
    Suspended = ("Suspended", FTJ, "`spec.suspend: true`: pods are stopped, checkpoints are kept.",
        "Set `spec.suspend: false` to resume from the newest checkpoint.", IDLE)
    Preempted = ("Preempted", FTJ,
        "The trainer pod was preempted, evicted or drained (after SIGTERM it saves a checkpoint "
        "and exits); the next pod resumes from it. With the Job's podFailurePolicy (Kubernetes >= 1.26) this does "
        "not use up `backoffLimit`.",
        "Nothing, unless it repeats: then look at node pressure or spot interruptions.", RECONCILING)
    InvalidConfig = ("InvalidConfig", FTJ,
        "The trainer refused its configuration (e.g. an output location it cannot write).",
        "Read the message; fix the named field.", STALLED)
    InvalidDataset = ("InvalidDataset", FTJ,
        "The dataset is readable but wrong: empty, not JSON lines, missing the fields the "
        "format needs, or records longer than `training.maxSeqLength`. Also the evaluation set "
        "(`spec.evaluation.dataset`, checked before training): a missing or empty reference, a missing `pattern` "
        "or one RE2 refuses (with the `regex` metric), a chat record not ending with the assistant's answer, or a "
        "prompt that leaves no room for `maxNewTokens` in the model's context.",
        "Fix the records, or `dataset.format` / the field names (`promptField`, …) / `maxSeqLength` (for the "
        "evaluation set: the same under `spec.evaluation.dataset`, or `maxNewTokens`); the message names the "
        "lines.", STALLED)
    DatasetNotFound = ("DatasetNotFound", FTJ, "No dataset at `spec.dataset.uri` (or the ConfigMap key), or no "
        "evaluation set at `spec.evaluation.dataset`.",
        "Check the URI / PVC path / ConfigMap name and key.", STALLED)
    DatasetAccessDenied = ("DatasetAccessDenied", FTJ, "The dataset store refused the credentials.",
        "Check `dataset.credentialsSecretRef` (AWS_* or HF_TOKEN keys) and the bucket policy.", STALLED)
    DatasetUnavailable = ("DatasetUnavailable", FTJ,
        "Fetching the dataset failed transiently (network, server error); retried per "
        "`backoffLimit`.", "Retry later; check the store's availability.", STALLED)
    ModelNotFound = ("ModelNotFound", FTJ,
        "The base model could not be found or loaded (wrong id, revision, path, or gated).",
        "Check `baseModel.name` / `revision` / `uri`; gated hub models need `credentialsSecretRef` with HF_TOKEN.", STALLED)
    TargetModulesNotFound = ("TargetModulesNotFound", f"{FTJ}; {ADAPTER}",
        "`method.targetModules` (or an adapter's target modules) "
        "name modules the base model does not have; the message lists the ones it has.",
        "Use module names of this architecture (e.g. q_proj, v_proj for Llama), or omit them for the default.", STALLED)
    OutOfMemory = ("OutOfMemory", FTJ, "The trainer ran out of (GPU) memory.",
        "Lower `training.batchSize` or `maxSeqLength`, use gradient checkpointing or `method.type: qlora`, or more "
        "GPU memory.", STALLED)
    OOMKilled = ("OOMKilled", FTJ, "The kernel killed the trainer container at its memory limit.",
        "Raise `resources.memory`, or lower batch size / sequence length.", STALLED)
    OutputWriteFailed = ("OutputWriteFailed", FTJ,
        "The adapter could not be written to `output.uri` (PVC full or read-only, S3 "
        "refused).", "Check the output PVC's capacity and access mode, or the S3 credentials.", STALLED)
    ImagePull = ("ImagePull", f"{FTJ}; {ROUTE}",
        "An image cannot be pulled (trainer, vLLM, loader or model fetch); the "
        "message names the container and the image.", "Check `spec.image` (FineTuneJob), `spec.engine.image` "
        "(ModelRoute), the chart's image values and the imagePullSecrets.", STALLED)
    DeadlineExceeded = ("DeadlineExceeded", FTJ, "The run exceeded `spec.activeDeadlineSeconds`.",
        "Raise `spec.activeDeadlineSeconds` and create a new FineTuneJob. It starts from step 0: each run writes "
        "to its own `run-<uid>` folder, so a recreated job never resumes (or overwrites) another run; the "
        "failed run's checkpoints stay in `<output>/run-<uid>.checkpoints`.", STALLED)
    BackoffLimitExceeded = ("BackoffLimitExceeded", FTJ,
        "Trainer pods failed more than `spec.backoffLimit` times; the message has the "
        "last pod's reason.", "Fix the cause the last failure names, then create a new FineTuneJob.", STALLED)
    JobFailed = ("JobFailed", FTJ, "The Job failed for a reason Kubernetes did not categorise.",
        "`kubectl describe job` and the trainer pod's log.", STALLED)
    InternalError = ("InternalError", FTJ, "The trainer failed unexpectedly; the message has the exception.",
        "Look at the pod log; report it with the FineTuneJob if it is a bug.", STALLED)
    TrainerError = ("TrainerError", FTJ,
        "The trainer exited with an error code of no known reason and left no termination message (e.g. killed "
        "before it could write one); the message has the exit code and the log's tail.",
        "Read the log tail in the message and the pod log (`kubectl logs -l loraplane.io/finetunejob=NAME`).", STALLED)
    # --- Adapter --------------------------------------------------------------------------------------------
    NoRoute = ("NoRoute", ADAPTER, "No ModelRoute in the namespace references or selects this Adapter.",
        "Add it to a ModelRoute's `routes` (by name or label selector).", IDLE)
    ArtifactPending = ("ArtifactPending", ADAPTER,
        "The Adapter has no `source.uri` yet: its FineTuneJob has not finished.",
        "Wait for the FineTuneJob; `kubectl get ftj`.", RECONCILING)
    AdapterNotFound = ("AdapterNotFound", f"{ROUTE} backend", "A route's backend names an Adapter that does not exist.",
        "Create the Adapter or fix the name in `spec.routes[].backends[].adapter`.", STALLED)
    Compatible = ("Compatible", ADAPTER, "The metadata checks passed (base model, revision, rank).", "Nothing to do.", DONE)
    BaseModelMismatch = ("BaseModelMismatch", ADAPTER,
        "The adapter was trained on another base model than the route serves "
        "(by name, or by its weight shapes).", "Serve it on a ModelRoute of its base model, or retrain.", STALLED)
    BaseModelRevisionMismatch = ("BaseModelRevisionMismatch", ADAPTER,
        "Same base model, different revision than the route's.",
        "Align `spec.baseModel.revision` of the Adapter and the ModelRoute, or retrain on the served revision.", STALLED)
    RankTooLarge = ("RankTooLarge", ADAPTER,
        "The adapter's rank is above the route's `engine.maxLoraRank` (vLLM would refuse "
        "it).", "Raise `engine.maxLoraRank` (costs GPU memory) or retrain with a smaller `method.r`.", STALLED)
    RankMismatch = ("RankMismatch", ADAPTER, "The declared `spec.rank` differs from the artifact's rank.",
        "Fix `spec.rank` or the artifact.", STALLED)
    UnsupportedModulesToSave = ("UnsupportedModulesToSave", ADAPTER,
        "The adapter saves full modules (`modules_to_save`, e.g. a resized "
        "embedding or lm_head), which vLLM's LoRA serving cannot apply.",
        "Retrain without `modules_to_save` / vocabulary changes.", STALLED)
    UnsupportedAdapterFeature = ("UnsupportedAdapterFeature", ADAPTER,
        "The adapter uses a PEFT feature vLLM cannot serve (e.g. DoRA).",
        "Retrain without it.", STALLED)
    EmbeddingRouteNoAdapters = ("EmbeddingRouteNoAdapters", ADAPTER,
        "The route serves an embedding model (`spec.engine.task: embed`, vLLM's pooling runner without LoRA): "
        "no adapter loads on it. The API refuses such routes; a replica whose table still lists adapters "
        "refuses each with this reason, before fetching it.",
        "Serve the adapter from a route with `engine.task: generate`, or remove it from this route's `routes`.",
        STALLED)
    UnsupportedAdapterType = ("UnsupportedAdapterType", ADAPTER,
        "The artifact is not a LoRA adapter (another PEFT type).",
        "Serve LoRA adapters only.", STALLED)
    UnsupportedDtype = ("UnsupportedDtype", ADAPTER,
        "The adapter's weights have a dtype vLLM cannot use with this engine.",
        "Save the adapter in float16/bfloat16/float32.", STALLED)
    UnsupportedQuantization = ("UnsupportedQuantization", ADAPTER,
        "This combination of quantized base model and adapter is not served.",
        "Serve on an unquantized (or supported) base model.", STALLED)
    InvalidAdapter = ("InvalidAdapter", ADAPTER,
        "The artifact is not a readable PEFT adapter directory (no adapter_config.json, "
        "no weights, corrupt files: JSON Python cannot parse, a safetensors header whose offsets, shapes or "
        "dtypes do not fit its data), or its adapter_config.json disagrees with its tensors (e.g. `r` or "
        "`rank_pattern` is not the rank of the lora_A/lora_B matrices: PEFT refuses it, vLLM would scale it "
        "by the wrong `lora_alpha / r`). Not retried.",
        "Check the artifact at `source.uri`; the message names the file, module and values that disagree. "
        "Re-save the adapter with PEFT (`save_pretrained`) rather than editing its config.", STALLED)
    NonFiniteWeights = ("NonFiniteWeights", ADAPTER,
        "The adapter's tensors hold NaN or Inf values (the loader scans them before loading; the message names "
        "the tensors): training diverged, or fp16 overflowed. Never sent to vLLM; not retried.",
        "Retrain: lower the learning rate, train in bfloat16 rather than float16, check that the loss stayed "
        "finite; do not serve a checkpoint saved after the loss became NaN.", STALLED)
    NonFiniteOutput = ("NonFiniteOutput", ADAPTER,
        "vLLM loaded the adapter, but the smoke-test completion through it has NaN or Inf log-probabilities "
        "(vLLM answers `Out of range float values are not JSON compliant`): its weights overflow in the "
        "engine's dtype. Unloaded and not retried.",
        "Retrain with a lower learning rate or stronger weight decay (smaller LoRA weights), or serve in "
        "bfloat16 (`spec.engine.dtype: bfloat16`) instead of float16.", STALLED)
    InvalidArtifact = ("InvalidArtifact", ADAPTER,
        "The artifact cannot be used as fetched (unsupported archive, missing "
        "library for the URI scheme).", "Use a PEFT directory or .tar.gz; see the message.", STALLED)
    UnsafeArtifact = ("UnsafeArtifact", f"{ADAPTER}; ModelRoute ModelFetchFailed message",
        "The artifact holds something no artifact may: a device file, FIFO or socket, a link pointing outside "
        "the artifact (or to a directory), an absolute or '..' path in an archive. Nothing of it was kept.",
        "Rebuild the archive or directory from the adapter's files only (`tar czf a.tar.gz -C DIR .`).", STALLED)
    ArtifactTooLarge = ("ArtifactTooLarge", f"{ADAPTER}; ModelRoute ModelFetchFailed message",
        "The artifact exceeds a loader limit: members in the archive (files of an s3:// prefix or hf:// repo, "
        "checked from the store's listing before the download), a file's or the total unpacked size "
        "(sparse files count with their full size), the download size, or the safetensors header length.",
        "Check that `source.uri` is the adapter you meant; a real LoRA adapter is far below the limits "
        "(docs/security.md, \"Artifacts and fetching\", lists them and the loader flags that raise them).", STALLED)
    InvalidTargetModules = ("InvalidTargetModules", ADAPTER,
        "adapter_config.json's target_modules is a regular expression the gate will not run: RE2 cannot "
        "express it (backreferences, lookaround) or it is too long. Patterns are matched in linear time only.",
        "Write target_modules as a list of module names, or as a plain regular expression.", STALLED)
    InsecureSource = ("InsecureSource", f"{ADAPTER}; ModelRoute ModelFetchFailed message; FineTuneJob message",
        "The fetch policy refused the URI or where it led: plain http:// without `allowInsecureHttp`, a "
        "redirect to a non-https URL, more than 5 redirects, or a host resolving to a loopback, link-local or "
        "cloud metadata address. Not retried.",
        "Serve the artifact over https from a reachable store; plain http only with the chart's "
        "`allowInsecureHttp: true` (local clusters).", STALLED)
    LocalSourceRefused = ("LocalSourceRefused", ADAPTER,
        "`spec.source.uri` is a local path (`/PATH` or `file://`), which is for local runs (`loraplane run`, a "
        "loader with `--table`): in a cluster a replica would read it from its own file system (other "
        "Adapters' cached weights, mounted credentials). A path under the loader's adapter cache or credentials "
        "folders is refused everywhere. Not retried.",
        "Publish the adapter where replicas fetch it: `pvc://CLAIM/PATH`, `s3://`, `https://` (an archive) or "
        "`hf://`, and set spec.source.uri to it.", STALLED)
    ChecksumMismatch = ("ChecksumMismatch", ADAPTER, "The artifact's sha256 differs from `source.sha256`.",
        "Fix `source.sha256` or the artifact; a mismatch is never loaded.", STALLED)
    FetchFailed = ("FetchFailed", ADAPTER, "Downloading or copying the artifact failed.",
        "Check the URI, the credentials Secret, and that a pvc:// claim exists in the namespace.", STALLED)
    AccessDenied = ("AccessDenied", ADAPTER,
        "The artifact store refused the credentials (HTTP 401/403, S3 AccessDenied or no keys, a gated or private "
        "Hugging Face repo). Not retried: the message names the credentials used (the Secret of "
        "`source.credentialsSecretRef`, or the loader's own identity without one).",
        "Check `source.credentialsSecretRef`: the Secret exists in the Adapter's namespace with HF_TOKEN or AWS_* "
        "keys (or the one `key` named) that may read the artifact; then change the Adapter (e.g. `spec.version`) "
        "or restart the replicas to try again.", STALLED)
    ArtifactChanged = ("ArtifactChanged", ADAPTER,
        "A replica fetched content for this version whose sha256 differs from the digest the Adapter recorded "
        "when the version was first served (`status.artifact.sha256`): the artifact at `source.uri` was "
        "overwritten. A published version is immutable; replicas refuse the changed content (ChecksumMismatch).",
        "Publish new weights as a new `spec.version` (and preferably a new URI); restore the original artifact "
        "to keep serving this version.", STALLED)
    Desired = ("Desired", ADAPTER,
        "In the serving table; the replica's loader has not started on it yet (it waits for vLLM to answer).",
        "Wait; if it lasts, look at the replica's vLLM container.", RECONCILING)
    Fetching = ("Fetching", ADAPTER, "The loader is downloading or copying the artifact into its cache.",
        "Wait; large artifacts over slow links take a while (the loader's load-time metrics show it).", RECONCILING)
    Loading = ("Loading", ADAPTER, "Fetching, checking or loading into vLLM is in progress on some replica.",
        "Wait; activation takes seconds once vLLM is up.", RECONCILING)
    Loaded = ("Loaded", ADAPTER,
        "Loaded and smoke-tested on at least one replica (`status.loadedOn`).", "Nothing to do.", DONE)
    AlreadyLoaded = ("AlreadyLoaded", ADAPTER,
        "vLLM already has an adapter of this name (another client loaded it meanwhile); the loader compares "
        "its path on the next pass and reloads it if it differs.",
        "Nothing, unless something other than the loader loads adapters into this vLLM: only the loader should.", RECONCILING)
    LoadFailed = ("LoadFailed", ADAPTER,
        "vLLM refused the load after the bounded retries; the message has vLLM's words.",
        "Read the message (often rank, dtype or a corrupt file); fix the artifact and bump `spec.version`.", STALLED)
    NoEffect = ("NoEffect", ADAPTER, "Loaded, but its output is identical to the base model's: the silent \"targets no "
        "modules\" / untrained-adapter failure. Not served.", "Retrain; check `targetModules` and that training "
        "actually ran (loss fell).", STALLED)
    EngineUnavailable = ("EngineUnavailable", ADAPTER,
        "The replica's vLLM is not answering (starting, crashed); adapters are "
        "reloaded when it is back.", "Wait; if it persists, the vLLM container's log.", RECONCILING)
    EngineRestarted = ("EngineRestarted", ADAPTER,
        "vLLM restarted; the loader is restoring every adapter.", "Nothing to do.", RECONCILING)
    AdapterReplaced = ("AdapterReplaced", ADAPTER,
        "vLLM served this adapter's name from another path than the verified artifact the loader loaded: "
        "something else called vLLM's /v1/load_lora_adapter. The loader unloaded it and loaded its own artifact "
        "again.", "Find the caller: engine pods should be reachable only by their route's routers (the "
        "operator's NetworkPolicy) and vLLM needs the route's engine key (docs/security.md, \"Engine pods and "
        "network\").", RECONCILING)
    NotDesired = ("NotDesired", ADAPTER, "The adapter was unloaded because the serving table no longer lists it.",
        "Nothing, unless unexpected: check the ModelRoute's routes.", RECONCILING)
    Draining = ("Draining", "loader report (state Draining)",
        "A version left the serving table (a newer version of its Adapter was promoted, or it was removed) while "
        "serving: it stays loaded until vLLM runs no request with it (at least the loader's --drain-seconds, at "
        "most the route's router.timeoutSeconds more), so requests already routed to it finish; then it is "
        "unloaded.", "Nothing to do.", RECONCILING)
    NoRoomForCandidate = ("NoRoomForCandidate", "Adapter status.candidate; ModelRoute Ready message",
        "A new version of this Adapter waits outside the route's serving table: loading it beside the version "
        "that serves (make-before-break) would make the route hold more adapter versions than vLLM's LoRA cache "
        "(spec.engine.maxCpuLoras, default 2 x maxLoras). The serving version keeps serving; the new one gets no "
        "traffic until there is room.",
        "Raise the route's spec.engine.maxCpuLoras by the number of adapters you update at once, or serve fewer "
        "adapters on the route. The new version is loaded as soon as there is room.", STALLED)
    VersionPromoted = ("VersionPromoted", "Event on an Adapter",
        "The new version was loaded and smoke-tested on every replica of the routes that select the Adapter; "
        "traffic moved to it. The previous version drains (Draining) and is then unloaded.",
        "Nothing to do.", DONE)
    CandidateFailed = ("CandidateFailed", "Event on an Adapter; Adapter Ready message",
        "The new version (status.candidate) was refused or failed on a replica (its reason and message are in "
        "status.candidate): it gets no traffic, and the previous version keeps serving.",
        "Fix the artifact (see status.candidate.reason in this page) and publish it as a new spec.version, or "
        "set spec back to the serving version.", DONE)
    NotLoaded = ("NotLoaded", f"{ROUTE} backend", "No replica reports this backend loaded yet.",
        "Look at the Adapter's Ready condition for why.", RECONCILING)
    # --- Adapter rollouts (status.rollout.reason; Events) -------------------------------------------------
    RolloutLoading = ("RolloutLoading", ROLLOUT,
        "The new version passed its evaluation gates and is being loaded beside the stable version on every "
        "replica; it gets no traffic until all have it (make-before-break).",
        "Nothing to do; if it lasts, read the Adapter's Ready condition (the loader's reason).", RECONCILING)
    RolloutProgressing = ("RolloutProgressing", ROLLOUT,
        "The new version gets `status.rollout.weight` % of the traffic (step `status.rollout.step` of "
        "`spec.rollout.steps`), analysed on the routers' live metrics every `spec.rollout.analysis.interval`.",
        "Nothing to do; `spec.rollout.promote: VERSION` skips the rest, `spec.rollout.abort: VERSION` stops it.",
        RECONCILING)
    RolloutPaused = ("RolloutPaused", ROLLOUT,
        "Every step passed and `spec.rollout.manualPromotion` is set: the rollout waits for a person.",
        "Set `spec.rollout.promote` to the version to promote it, or `spec.rollout.abort` to it to stop.", IDLE)
    RolloutPromoted = ("RolloutPromoted", ROLLOUT,
        "The new version passed its gates and steps (or was promoted by hand) and is now the stable version; "
        "the previous one is unloaded once no request uses it.", "Nothing to do.", DONE)
    RolloutGateFailed = ("RolloutGateFailed", ROLLOUT,
        "An evaluation gate of `spec.rollout.gates` failed (or the version has no evaluation while gates are "
        "set): the version is not loaded and the stable version keeps all the traffic. `status.rollout.gates` "
        "names the gate with the candidate's score and the threshold, base or previous score it was compared to.",
        "Train a better version (dataset, hyperparameters) and publish it as a new `spec.version`; or, if the "
        "gate is wrong, change `spec.rollout.gates` or promote this version by hand (`spec.rollout.promote`).",
        STALLED)
    RolloutRolledBack = ("RolloutRolledBack", ROLLOUT,
        "The live analysis failed `spec.rollout.analysis.failureLimit` times: the new version answered too many "
        "errors or was too slow. All traffic went back to the stable version. `status.rollout.lastAnalysis` has "
        "the measured values and the threshold that failed.",
        "Look at the new version's errors (router and vLLM logs); publish a fixed version as a new `spec.version`, "
        "or promote this one by hand (`spec.rollout.promote`) if the analysis was wrong.", STALLED)
    RolloutAborted = ("RolloutAborted", ROLLOUT,
        "`spec.rollout.abort` names the new version: all traffic went back to the stable version.",
        "Publish another `spec.version`, or set `spec.rollout.promote` to this version to promote it after all.",
        IDLE)
    RolloutManualRollback = ("RolloutManualRollback", ROLLOUT,
        "`spec.rollout.rollbackTo` names an earlier version from `status.history`: it is served instead of "
        "`spec.version`, which gets no traffic.",
        "Remove `spec.rollout.rollbackTo` to roll `spec.version` out again (gates and steps included).", IDLE)
    RolloutTargetUnknown = ("RolloutTargetUnknown", ROLLOUT,
        "`spec.rollout.rollbackTo` names a version that `status.history` does not hold (or holds without an "
        "artifact URI): nothing changed.",
        "Name a version listed in `status.history` (`kubectl get adapter NAME -o yaml`), or remove the field.",
        STALLED)
    RolloutSuperseded = ("RolloutSuperseded", ROLLOUT,
        "A newer `spec.version` arrived while this version was rolling out: its rollout stopped and the newer "
        "one starts from the gates.", "Nothing to do.", DONE)
    RolloutStepAdvanced = ("RolloutStepAdvanced", "Event on an Adapter",
        "A rollout step passed its pause and analysis; the new version's traffic share went up.",
        "Nothing to do.", DONE)
    # --- ModelRoute -----------------------------------------------------------------------------------------
    Progressing = ("Progressing", ROUTE, "Children are being created or rolled out: the engine Deployment does "
        "not yet run the current spec on every replica (the message says how far it is); replicas of the previous "
        "spec keep serving meanwhile.", "Wait; if it lasts, `kubectl rollout status deployment/NAME-engine`.", RECONCILING)
    RolloutStalled = ("RolloutStalled", ROUTE,
        "The engine Deployment's rollout of the current spec made no progress within its progress deadline "
        "(Deployment condition Progressing=False, ProgressDeadlineExceeded) and no pod shows why; replicas of the "
        "previous spec keep serving.",
        "`kubectl describe deployment NAME-engine` and its newest pods; fix `spec.engine` or revert the change.", STALLED)
    ScaledToZero = ("ScaledToZero", ROUTE,
        "The route's engine Deployment is at 0 replicas while it is autoscaled: KEDA scaled it to zero after "
        "`autoscaling.scaleToZeroAfterSeconds` without demand (`minReplicas: 0`), or it was scaled to 0 by hand. "
        "The router stays up: it holds the next requests (`spec.router.coldStart`) while a replica starts, and the "
        "route wakes (KEDA on the router's held requests; with an HPA, the router sets the Deployment's scale to 1).",
        "Nothing to fix. If requests are answered 503 `cold_start_timeout`, the replica took longer than "
        "`spec.router.coldStart.maxWaitSeconds` to serve: raise it, or keep `minReplicas: 1`; if the route never "
        "wakes, check KEDA's ScaledObject events and that Prometheus scrapes the router pods (the chart's "
        "`monitoring.podMonitors`).", IDLE)
    NoReadyReplicas = ("NoReadyReplicas", ROUTE,
        "No vLLM replica is ready yet and no pod shows a failure: starting, pulling the "
        "image, downloading or loading the model (large models take minutes).",
        "Wait; if it lasts, `kubectl describe pod -l loraplane.io/route=NAME`.", RECONCILING)
    Unschedulable = ("Unschedulable", f"{ROUTE}; {FTJ}", "No node fits the pod: the message quotes the scheduler (e.g. "
        "`0/4 nodes are available: 4 Insufficient nvidia.com/gpu`).",
        "Free or add GPU nodes, or change the request: `spec.engine.gpus` / `gpuType` / `nodeSelector` / "
        "`tolerations` (ModelRoute), `spec.resources` (FineTuneJob).", RECONCILING)
    ModelFetchFailed = ("ModelFetchFailed", ROUTE,
        "The init container could not fetch the `s3://` / `https://` base model; the "
        "message has its error (missing prefix, denied, not a model directory).",
        "Fix `spec.baseModel.uri` or `spec.baseModel.credentialsSecretRef` (AWS_* keys, AWS_ENDPOINT_URL for "
        "S3-compatible stores); a new ModelRoute is needed to change the base model.", STALLED)
    EngineFailing = ("EngineFailing", ROUTE,
        "A container of the engine pods (vLLM or the adapter loader) exits with an error and "
        "is restarted; the message has its exit and the last lines of its log (e.g. CUDA out of memory, an "
        "unsupported model architecture, a bad extraArgs flag).",
        "Fix what the quoted log says: `spec.engine` (gpuMemoryUtilization, maxModelLen, tensorParallelSize, "
        "extraArgs), memory limits, or the model.", STALLED)
    ServingTableFull = ("ServingTableFull", f"{ADAPTER}; ModelRoute Ready message",
        "The route's serving table (one ConfigMap, at most 1 MiB) would be too large with every adapter the route "
        "selects: the adapters with the largest entries (long `source.uri`s, many versions) are left out so the "
        "others keep being served; the message gives the sizes.",
        "Select fewer adapters on this route (narrow its selectors or split it into several ModelRoutes), or "
        "shorten the adapters' `source.uri`s.", STALLED)
    RouterNotReady = ("RouterNotReady", ROUTE,
        "The router Deployment (`NAME-router`, behind `status.endpoint`) has no available pod running the current "
        "spec yet: it is being created, started or rolled out. Until it has, the endpoint does not answer (or "
        "answers with the previous router spec).",
        "Wait; if it lasts, `kubectl describe deployment NAME-router` and its newest pods.", RECONCILING)
    ContainerConfig = ("ContainerConfig", ROUTE,
        "A container of the engine pods cannot be created (CreateContainerConfigError): a Secret, ConfigMap or key "
        "its env or volumes name does not exist; the message names the pod, the container and what is missing. "
        "The route's engine key Secret `<route>-engine-key-<route uid>` is re-created by the operator within about "
        "30 s when a pod reports it missing (someone deleted it).",
        "Create the named Secret or ConfigMap (`spec.engine.env` valueFrom, `spec.baseModel.credentialsSecretRef`, ...); "
        "if it is the engine key and it stays missing, check the operator's log for the create's error.", STALLED)
    PodsRefused = ("PodsRefused", "ModelRoute Ready; FineTuneJob Ready",
        "The API server refuses to create the pods of the engine or router Deployment (the ReplicaSet's "
        "FailedCreate) or of the trainer Job (the Job's FailedCreate Event): an admission controller such as Pod Security admission, a PodSecurityPolicy, a "
        "ResourceQuota or a LimitRange said no; the message is the API server's, naming the rule.",
        "Read the message: for Pod Security, the operator's pods run under `restricted` (docs/security.md), so a "
        "refusal comes from a stricter namespace policy or a spec setting the cluster forbids; for a quota, raise "
        "it or lower `spec.engine` / `spec.router` / `spec.resources`.", STALLED)
    RouterFailing = ("RouterFailing", ROUTE,
        "The router cannot serve `status.endpoint`: a router pod cannot pull its image or exits with an error, or "
        "the router Deployment's rollout exceeded its progress deadline; the message names the pod and why.",
        "Fix `spec.router.image` (or the chart's image) and imagePullSecrets, `spec.router.apiKeySecretRef`, "
        "`spec.router.cpu` / `memory`; `kubectl logs` the named router pod.", STALLED)
    RouterScaledToZero = ("RouterScaledToZero", ROUTE,
        "`spec.router.replicas` is 0: no router pod serves `status.endpoint` (the engine replicas may be up).",
        "Set `spec.router.replicas` to 1 or more to serve the route.", IDLE)
    PublicNameConflict = ("PublicNameConflict", ROUTE,
        "Two sources publish the same public model name; the message names the name and both sources. Within one "
        "ModelRoute (a route's `name`, a contentRouting name and a selector's `prefix` + Adapter name, or two "
        "selectors) the later source is left out of the serving table: an explicit route (with `backends`) or a "
        "content-routed model wins over a selector, an earlier route over a later one. Across the ModelRoutes of "
        "a namespace the oldest route (metadata.creationTimestamp) owns the name: this later route keeps serving "
        "it on its own endpoint, but the namespace's gateway and other routes' content routing send that name to "
        "the older route. Every other name is served.",
        "Rename the route or content-routed model, change the selector route's `prefix`, or narrow its selector "
        "so the names differ.", STALLED)
    ContentTargetNotFound = ("ContentTargetNotFound", CONTENT_ENTRIES,
        "A spec.contentRouting model sends requests to a public model (a destination, the default, the classifier "
        "or the embedding model) that no ModelRoute of the namespace serves: neither this route nor another one "
        "publishes it (their status.models), or the route that does publishes it as a content-routed model "
        "itself (content models do not chain). The content model serves with what it has: a destination that is "
        "missing is never chosen, a missing classifier or embedding model makes that method fall back to the "
        "default; with the default missing it cannot serve (status.contentModels[].ready false).",
        "Fix the name in spec.contentRouting (the message suggests the served name closest to a typo: `did you "
        "mean 'sql'?`; `kubectl get modelroutes -o yaml` lists each route's status.models), or create the "
        "ModelRoute or Adapter that publishes it.", STALLED)
    ContentTargetWrongTask = ("ContentTargetWrongTask", CONTENT_ENTRIES,
        "A spec.contentRouting model asks another ModelRoute's public model for what that route's vLLM does not "
        "serve: its semantic.embeddingModel is served by a route with spec.engine.task generate (no "
        "/v1/embeddings), or a destination, the default or the classifier by a route with spec.engine.task embed "
        "(no completions). Every request would fail there, so the reference is treated as missing: such a "
        "destination is never chosen, such a classifier or embedding model takes its method out (the default "
        "serves), and with the default on an embed route the content model cannot serve.",
        "Name a public model of a route whose spec.engine.task fits the role (embed for semantic.embeddingModel, "
        "generate for the rest), or change that route's spec.engine.task.", STALLED)
    ModelsNotReady = ("ModelsNotReady", ROUTE,
        "Replicas are up but some public models have no ready backend; the message lists "
        "them.", "Look at each named Adapter's Ready condition.", RECONCILING)
    Degraded = ("Degraded", ROUTE, "Some, not all, replicas or backends are ready.", "See the message.", RECONCILING)
    Ready = ("Ready", ROUTE, "Every public model has a ready backend on a ready replica.", "Nothing to do.", DONE)
    UnknownReason = ("UnknownReason", f"{FTJ}; {ADAPTER}",
        "A reason from outside the operator (a replica's report annotation, a container's termination message, "
        "a pod's status) is not one this operator knows: a newer or foreign component, or a malformed value. "
        "It is never used as a condition reason, Event reason or metric label as it is; the message quotes it.",
        "Read the message; upgrade the operator when the reason comes from a newer loraplane component.",
        RECONCILING)
    # --- Events only ----------------------------------------------------------------------------------------
    Created = ("Created", "Event on an Adapter", "A FineTuneJob created this Adapter.", "Nothing to do.", DONE)
    VersionBumped = ("VersionBumped", "Event on an Adapter", "A FineTuneJob wrote a new version of this Adapter; replicas load "
        "it under a new internal name beside the version that serves; traffic moves to it once every replica serving the "
        "Adapter has it loaded and smoke-tested (VersionPromoted).", "Nothing to do; the old version drains and is "
        "unloaded once no request uses it (Draining); a new version that fails never gets traffic (CandidateFailed).",
        DONE)


# The longest outside reason quoted in a message (characters): a malformed one can be of any length.
QUOTED_REASON_CHARS = 80


def reason_or_unknown(value: object) -> Reason:
    """`value` as a Reason when it is one, else Reason.UnknownReason. For reasons read from outside the operator
    (report annotations, termination messages): they become condition reasons, Event reasons and metric labels,
    which must be one of a known, bounded set (a condition reason outside its pattern fails the status patch)."""
    if isinstance(value, str):
        try:
            return Reason(value)
        except ValueError:
            pass
    return Reason.UnknownReason


def quoted_reason(value: object) -> str:
    """How a message names an unknown outside reason: its repr, cut to QUOTED_REASON_CHARS characters."""
    text = repr(value)
    return text if len(text) <= QUOTED_REASON_CHARS else text[:QUOTED_REASON_CHARS] + "..."
