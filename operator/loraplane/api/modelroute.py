"""ModelRoute: a served base model (vLLM multi-LoRA), autoscaled, with OpenAI-compatible routes to adapters."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from loraplane.api.common import (
    DNS_LABEL,
    ApiModel,
    CelRule,
    FreeForm,
    ModelRef,
    Quantity,
    Resource,
    SecretKeyRef,
    StatusBase,
)
from loraplane.api.finetunejob import immutable


class EngineSpec(ApiModel):
    """The vLLM server each replica runs."""

    image: str | None = Field(default=None, description=(
        "vLLM OpenAI-compatible server image. Default: the operator's engine image (chart value `engineImage`, "
        "vllm/vllm-openai:v0.11.0 unless the platform team mirrors it); set it here to pin one route."))
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_model_len: int | None = Field(default=None, ge=16, description="Context length (--max-model-len).")
    max_loras: int = Field(default=4, ge=1, le=256, description="Adapters in one batch (--max-loras).")
    max_lora_rank: int = Field(default=16, ge=1, le=512,
                               description="Largest adapter rank served (--max-lora-rank); larger are refused.")
    max_cpu_loras: int | None = Field(default=None, ge=1, description="Adapters cached in CPU memory.")
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    gpus: int = Field(default=1, ge=0, le=64, description="GPUs per replica (>= tensorParallelSize).")
    gpu_resource: str = Field(default="nvidia.com/gpu")
    gpu_type: str | None = Field(default=None, description="Value of gpuTypeLabel to schedule on.")
    gpu_type_label: str = Field(default="nvidia.com/gpu.product")
    cpu: Quantity | None = None
    memory: Quantity | None = None
    extra_args: list[str] = Field(default_factory=list, description="Appended to the vLLM command line.")
    env: list[FreeForm] = Field(default_factory=list, description="Extra container env entries, verbatim.")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[FreeForm] = Field(default_factory=list)


class AutoscalingSpec(ApiModel):
    """Scale replicas on vLLM's own metrics."""

    cel_rules: ClassVar = (
        CelRule(rule="self.minReplicas <= self.maxReplicas",
                message="autoscaling.minReplicas must be <= autoscaling.maxReplicas"),
    )

    backend: Literal["hpa", "keda"] = Field(
        default="hpa", description="hpa: autoscaling/v2 on a Pods metric from a Prometheus adapter; "
                                   "keda: a KEDA ScaledObject with a Prometheus trigger.")
    min_replicas: int = Field(default=1, ge=0, description="0 is allowed with keda (scale to zero).")
    max_replicas: int = Field(ge=1, le=1000)
    metric: str = Field(default="vllm:num_requests_waiting",
                        description="vLLM metric per replica, e.g. vllm:num_requests_waiting, "
                                    "vllm:kv_cache_usage_perc, or the router's loraplane_router_in_flight.")
    target: float = Field(default=5, gt=0, description="Target average value of the metric per replica.")
    prometheus_address: str | None = Field(
        default=None, description="Prometheus URL for keda, e.g. http://prometheus.monitoring:9090.")
    scale_down_stabilization_seconds: int = Field(default=300, ge=0, le=3600)


class RouteBackend(ApiModel):
    """One destination of a public model name: the base model or an Adapter."""

    cel_rules: ClassVar = (
        CelRule(rule="has(self.adapter) != (has(self.base) && self.base)",
                message="a backend sets exactly one of adapter: NAME or base: true"),
    )

    adapter: str | None = Field(default=None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
                                description="Name of an Adapter in the route's namespace.")
    base: bool | None = Field(default=None, description="true: the base model itself.")
    weight: int = Field(default=100, ge=0, le=100, description="Share of traffic, in percent.")


class Route(ApiModel):
    """A public model name and where its traffic goes, or a selector serving adapters under their names."""

    cel_rules: ClassVar = (
        CelRule(rule="has(self.backends) != has(self.selector)",
                message="a route sets exactly one of backends or selector"),
        CelRule(rule="!has(self.backends) || has(self.name)", message="a route with backends needs a name"),
        CelRule(rule="!has(self.backends) || self.backends.map(b, has(b.weight) ? b.weight : 100).sum() == 100",
                message="the weights of a route's backends must sum to 100"),
    )

    name: str | None = Field(default=None, min_length=1, max_length=200,
                             pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.:/]*[A-Za-z0-9])?$",
                             description="Public model name clients put in the request's `model`.")
    backends: list[RouteBackend] | None = Field(default=None, min_length=1, max_length=16)
    selector: FreeForm | None = Field(
        default=None, description="Label selector (matchLabels/matchExpressions): every matching Adapter is "
                                  "served under prefix + its own name.")
    prefix: str = Field(default="", max_length=100, description="Prefix of names served through a selector.")


class RouterSpec(ApiModel):
    """The OpenAI-compatible routing layer in front of the replicas."""

    replicas: int = Field(default=2, ge=0, le=100)
    image: str | None = Field(default=None, description="Default: the operator's image.")
    sticky_header: str | None = Field(
        default=None, description="Requests with the same value of this header stay on one backend version.")
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret whose values are accepted API keys (Authorization: Bearer).")
    max_request_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    timeout_seconds: int = Field(default=600, ge=1, le=86400)
    log_prompts: bool = Field(default=False, description="Log request bodies (off: no prompt contents in logs).")
    # Defaults bound what the router can be made to hold (issue 12): its client connections, headers and
    # bodies are capped (docs/security.md), and a memory limit turns a leak into a restart, not a node's OOM.
    cpu: Quantity | None = Field(
        default="250m", description="CPU request of each router pod. Default: 250m (no CPU limit: one "
                                    "single-threaded process, which a CFS quota would only add latency to).")
    memory: Quantity | None = Field(default="1Gi",
                                    description="Memory request and limit of each router pod. Default: 1Gi.")


class ModelRouteSpec(ApiModel):
    """What a ModelRoute asks for: the base model, its vLLM engine and replicas, public routes and the router."""

    cel_rules: ClassVar = (
        CelRule(rule="!has(self.autoscaling) || !has(self.replicas)",
                message="set replicas or autoscaling, not both"),
        # An https:// base model is fetched as one archive (a web server lists no directories).
        CelRule(rule="!has(self.baseModel.uri) || !self.baseModel.uri.startsWith('http') || "
                     "self.baseModel.uri.endsWith('.tar.gz') || self.baseModel.uri.endsWith('.tgz') || "
                     "self.baseModel.uri.endsWith('.tar')",
                message="spec.baseModel.uri: an https:// base model must be a .tar.gz, .tgz or .tar archive of "
                        "the model directory (or use s3://BUCKET/PREFIX, pvc://CLAIM/PATH or a hub id in "
                        "baseModel.name)"),
        CelRule(rule="!has(self.routes) || self.routes.all(r, has(r.name) ? "
                     "self.routes.filter(s, has(s.name) ? s.name == r.name : false).size() == 1 : true)",
                message="route names must be unique"),
    )

    base_model: ModelRef = Field(json_schema_extra=immutable("spec.baseModel",
                                                             "create a new ModelRoute for another base model"))
    served_model_name: str | None = Field(
        default=None, description="Name vLLM serves the base model under (default: baseModel.name).")
    engine: EngineSpec = Field(default_factory=EngineSpec)
    replicas: int | None = Field(default=None, ge=0, le=1000, description="Fixed replica count (default 1).")
    autoscaling: AutoscalingSpec | None = None
    routes: list[Route] = Field(default_factory=list, max_length=256)
    router: RouterSpec = Field(default_factory=RouterSpec)


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


class ModelRouteStatus(StatusBase):
    """What the operator observed about a ModelRoute: replicas, the router's endpoint and each public model."""

    phase: ModelRoutePhase | None = None
    replicas: int | None = None
    ready_replicas: int | None = None
    endpoint: str | None = Field(default=None, description="OpenAI-compatible base URL of the router.")
    models: list[ServedModel] = Field(default_factory=list)


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
        # Child Deployments/Services are named after the route (e.g. NAME-router) and must be DNS labels.
        name = self.metadata.name
        if name and (len(name) > 50 or not re.match(DNS_LABEL, name)):
            raise ValueError(f"metadata.name {name!r}: a ModelRoute name must be a DNS label (lowercase letters, "
                             "digits, '-') of at most 50 characters, because its Services are named after it")
        return self
