"""FineTuneJob: fine-tune a base model with LoRA/QLoRA on a dataset; on success, produce an Adapter."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from loraplane.api.evaluation import EvaluationMetric, EvaluationResult
from loraplane.api.pods import PodSettings
from loraplane.api.common import (
    URI_MAX_LENGTH,
    IMAGE_MAX_LENGTH,
    ShortString,
    DNS_NAME,
    LABEL_VALUE,
    ApiModel,
    CelRule,
    FreeForm,
    Labels,
    ModelRef,
    Quantity,
    Resource,
    SecretKeyRef,
    StatusBase,
    label_key_problem,
    uri_pattern,
    uri_rules,
)


def immutable(what: str, fix: str = "create a new object instead") -> dict[str, Any]:
    """Schema extra marking a field immutable (a CEL transition rule; the operator enforces it too)."""
    return {"x-kubernetes-validations": [{"rule": "self == oldSelf", "message": f"{what} is immutable; {fix}"}]}


class ConfigMapKeyRef(ApiModel):
    """A key of a ConfigMap in the FineTuneJob's namespace that holds the dataset as JSON lines."""

    name: str = Field(pattern=DNS_NAME, max_length=253, description="ConfigMap holding the data inline.")
    key: str = Field(default="train.jsonl", max_length=253, pattern=r"^[-._a-zA-Z0-9]+$",
                     description="Key of the ConfigMap that holds the JSONL.")


# The record fields each format reads, with their defaults: a field of another format is ignored by the trainer,
# so one set to another value than its default is a mistake (`responseField: route` on a classification set meant
# labelField; its records then lack `label` and the run fails only once the data is read). A field set to its own
# default is harmless, and code that dumps a spec with its defaults (ApiModel.wire) writes such fields.
_FIELD_DEFAULTS = {"textField": "text", "labelField": "label", "promptField": "prompt",
                   "responseField": "response", "messagesField": "messages", "patternField": "pattern"}


def _format_fields_rule(where: str, fields: dict[str, tuple[str, ...]]) -> CelRule:
    """The rule refusing, for each format of `fields` (format -> the record fields it reads), a record field of
    another format set to other than its default; `where` names the object in the message (e.g. `dataset`).
    The format defaults to instruction, as both dataset kinds' `format` does."""
    all_fields = sorted({f for names in fields.values() for f in names})
    clauses = []
    for fmt, names in fields.items():
        foreign = " && ".join(f"(!has(self.{f}) || self.{f} == '{_FIELD_DEFAULTS[f]}')"
                              for f in all_fields if f not in names)
        clauses.append(f"(has(self.format) ? self.format : 'instruction') != '{fmt}' || ({foreign})")

    def check(obj: dict) -> bool:
        names = fields.get(obj.get("format", "instruction"), all_fields)
        return all(obj.get(f, _FIELD_DEFAULTS[f]) == _FIELD_DEFAULTS[f] for f in all_fields if f not in names)

    reads = "; ".join(f"{fmt}: {', '.join(names)}" for fmt, names in fields.items())
    return CelRule(rule=" && ".join(f"({c})" for c in clauses), check=check,
                   message=f"{where} sets a record field of another format, which the trainer would ignore "
                           f"(format unset is instruction); each format reads only its own fields ({reads}): use "
                           f"the field of {where}.format (a classification record's label is labelField, not "
                           f"responseField), or correct {where}.format")


class DatasetSpec(ApiModel):
    """Training data: JSON lines from a URI or an inline ConfigMap."""

    cel_rules: ClassVar = (
        CelRule(rule="has(self.uri) != has(self.configMapRef)",
                check=lambda o: ("uri" in o) != ("configMapRef" in o),
                message="set exactly one of dataset.uri or dataset.configMapRef"),
        CelRule(rule="!has(self.validationSplit) || !has(self.validationUri)",
                check=lambda o: not ("validationSplit" in o and "validationUri" in o),
                message="set at most one of dataset.validationSplit or dataset.validationUri"),
        CelRule(rule="!has(self.format) || self.format != 'classification' || "
                     "(has(self.textField) ? self.textField : 'text') != "
                     "(has(self.labelField) ? self.labelField : 'label')",
                check=lambda obj: obj.get("format") != "classification"
                or obj.get("textField", "text") != obj.get("labelField", "label"),
                message="dataset.textField and dataset.labelField name the same field: a classification record "
                        "needs its text and its label in two fields"),
        _format_fields_rule("dataset", {"text": ("textField",), "instruction": ("promptField", "responseField"),
                                        "chat": ("messagesField",),
                                        "classification": ("textField", "labelField")}),
        *uri_rules("uri", "dataset.uri"),
        *uri_rules("validationUri", "dataset.validationUri"),
    )

    uri: str | None = Field(max_length=URI_MAX_LENGTH,
        default=None, pattern=uri_pattern("pvc", "s3", "http", "hf", "file", "path"),
        description="pvc://CLAIM/PATH, s3://BUCKET/KEY, https://…, hf://ORG/DATASET[@revision], "
                    "or a local path for local runs.")
    config_map_ref: ConfigMapKeyRef | None = Field(default=None, description="Small datasets, inline.")
    format: Literal["text", "instruction", "chat", "classification"] = Field(
        default="instruction",
        description="text: {text}; instruction: {prompt, response}; chat: {messages:[{role, content}]} "
                    "rendered with the tokenizer's chat template, loss on assistant turns only; classification: "
                    "{text, label}, trained as the content router's classifier prompt with the label as the "
                    "answer (loss on the label only), for spec.contentRouting[].classifier of a ModelRoute.")
    text_field: str = Field(max_length=256, default="text",
                            description="Field of a `text` or `classification` record's text.")
    label_field: str = Field(max_length=256, default="label", description=(
        "Field of a `classification` record's label: lower-case letters, digits, `-` and `_`, at most 63 "
        "characters (the `label` of a contentRouting destination)."))
    prompt_field: str = Field(max_length=256, default="prompt", description="Field of an `instruction` record's prompt.")
    response_field: str = Field(max_length=256, default="response", description="Field of an `instruction` record's answer.")
    messages_field: str = Field(max_length=256, default="messages", description="Field of a `chat` record's message list.")
    validation_split: float | None = Field(
        default=None, gt=0, lt=0.5, description="Fraction held out for evaluation (eval loss, perplexity).")
    validation_uri: str | None = Field(max_length=URI_MAX_LENGTH,
        default=None, pattern=uri_pattern("pvc", "s3", "http", "hf", "file", "path"),
        description="A separate validation file instead (the same URI forms as `uri`).")
    credentials_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret with AWS_* or HF_TOKEN credentials to fetch the data.")


# The metrics that score generated completions against references (need spec.evaluation.dataset), and the ones
# computed on the validation split (need spec.dataset.validationSplit or validationUri).
GenerationMetric = Literal["exact_match", "contains", "regex", "rouge_l", "accuracy"]
DEFAULT_METRICS: tuple[str, ...] = ("rouge_l", "exact_match", "contains")
LOSS_METRICS: tuple[str, ...] = (EvaluationMetric.eval_loss.value, EvaluationMetric.perplexity.value)
_CEL_METRICS = "(has(self.metrics) ? self.metrics : [" + ", ".join(f"'{m}'" for m in DEFAULT_METRICS) + "])"
_CEL_LOSS = "[" + ", ".join(f"'{m}'" for m in LOSS_METRICS) + "]"
# The metric of a `classification` job (what the content router's classifier is judged by): its default primary
# metric, and the only generation metric it may list (the others compare free text with a reference).
ACCURACY = EvaluationMetric.accuracy.value
CLASSIFICATION_METRICS: tuple[str, ...] = (ACCURACY, *LOSS_METRICS)
_CEL_CLASSIFICATION = "(has(self.dataset.format) && self.dataset.format == 'classification')"


def _primary_ok(obj: dict) -> bool:
    primary = obj.get("primaryMetric")
    return primary is None or primary in LOSS_METRICS or primary == ACCURACY or (
        "dataset" in obj and primary in obj.get("metrics", DEFAULT_METRICS))


def _is_classification(obj: dict) -> bool:
    return obj.get("dataset", {}).get("format") == "classification"


def _asks_accuracy(evaluation: dict) -> bool:
    return ACCURACY in evaluation.get("metrics", ()) or evaluation.get("primaryMetric") == ACCURACY


def _classification_metrics_ok(evaluation: dict) -> bool:
    return all(m == ACCURACY for m in evaluation.get("metrics", ())) \
        and evaluation.get("primaryMetric", ACCURACY) in CLASSIFICATION_METRICS


def _evaluation_format_ok(obj: dict) -> bool:
    ev = obj.get("evaluation", {})
    return "dataset" not in ev or (ev["dataset"].get("format") == "classification") == _is_classification(obj)


def _validation_set(dataset: dict) -> bool:
    return "validationSplit" in dataset or "validationUri" in dataset


class EvaluationDatasetSpec(ApiModel):
    """An evaluation set: prompts with references (and optional regex patterns), as JSON lines from a URI or an
    inline ConfigMap, in the instruction or chat layout of training data; for a `classification` job, {text,
    label} records scored by `accuracy`."""

    cel_rules: ClassVar = (
        CelRule(rule="has(self.uri) != has(self.configMapRef)",
                check=lambda obj: ("uri" in obj) != ("configMapRef" in obj),
                message="set exactly one of evaluation.dataset.uri or evaluation.dataset.configMapRef"),
        _format_fields_rule("evaluation.dataset", {
            "instruction": ("promptField", "responseField", "patternField"),
            "chat": ("messagesField", "patternField"), "classification": ("textField", "labelField")}),
        *uri_rules("uri", "evaluation.dataset.uri"),
    )

    uri: str | None = Field(max_length=URI_MAX_LENGTH,
        default=None, pattern=uri_pattern("pvc", "s3", "http", "hf", "file", "path"),
        description="The same URI forms as spec.dataset.uri; fetched with spec.dataset.credentialsSecretRef.")
    config_map_ref: ConfigMapKeyRef | None = Field(default=None, description="A small evaluation set, inline.")
    format: Literal["instruction", "chat", "classification"] = Field(
        default="instruction",
        description="instruction: {prompt, response}, the response is the reference; chat: {messages}, the last "
                    "message (role assistant) is the reference and the ones before it, rendered with the "
                    "tokenizer's chat template, the prompt. Prompts are tokenised as in training. "
                    "classification (and only for a job whose spec.dataset.format is classification): {text, "
                    "label} records, checked like training records, asked as the content router asks and scored "
                    "by accuracy.")
    prompt_field: str = Field(max_length=256, default="prompt", description="Field of an instruction record's prompt.")
    response_field: str = Field(max_length=256, default="response",
                                description="Field of an instruction record's reference answer.")
    messages_field: str = Field(max_length=256, default="messages", description="Field of a chat record's messages.")
    text_field: str = Field(max_length=256, default="text", description=(
        "Field of a classification record's text (its own setting, default `text`; spec.dataset.textField does "
        "not apply here)."))
    label_field: str = Field(max_length=256, default="label", description=(
        "Field of a classification record's expected label (default `label`; spec.dataset.labelField does not "
        "apply here)."))
    pattern_field: str = Field(max_length=256, default="pattern",
                               description="Field holding the RE2 pattern the `regex` metric matches the completion "
                                           "against (every record needs one when `regex` is among the metrics).")


class EvaluationSpec(ApiModel):
    """What the trainer scores after training, for the new adapter, the base model alone and the version the
    Adapter serves now (when known), on the same data: eval_loss/perplexity on the validation split, and the
    named metrics on greedy completions of an evaluation set. Results: status.evaluation (api.evaluation)."""

    cel_rules: ClassVar = (
        CelRule(rule=f"!has(self.primaryMetric) || self.primaryMetric in {_CEL_LOSS} || "
                     f"self.primaryMetric == '{ACCURACY}' || "
                     f"(has(self.dataset) && self.primaryMetric in {_CEL_METRICS})",
                check=_primary_ok,
                message="evaluation.primaryMetric must be eval_loss or perplexity; accuracy for a classification "
                        "job (spec.dataset.format classification: no other metric); or, for other jobs, one of "
                        "evaluation.metrics (default rouge_l, exact_match, contains) with evaluation.dataset set"),
    )

    dataset: EvaluationDatasetSpec | None = Field(
        default=None, description="Prompts with references, scored by `metrics` (unset: loss metrics only).")
    metrics: list[GenerationMetric] = Field(
        default_factory=lambda: list(DEFAULT_METRICS), min_length=1, max_length=4,
        json_schema_extra={"x-kubernetes-list-type": "set"},
        description="Metrics of the completions, each averaged over the examples (0..1): exact_match, contains, "
                    "regex (RE2, linear time), rouge_l (ROUGE-L F1, the rouge-score library). Default: "
                    "rouge_l, exact_match, contains. A classification job (spec.dataset.format classification) "
                    "scores accuracy only (the fraction of examples whose greedy answer, read as the content "
                    "router reads it, is the record's label), on evaluation.dataset when set, else on the "
                    "validation set; leave metrics unset or list accuracy alone.")
    primary_metric: Literal["exact_match", "contains", "regex", "rouge_l", "accuracy", "eval_loss",
                            "perplexity"] | None = Field(
        default=None, description="The metric the rollout gates compare and `kubectl get` shows. Default: accuracy "
                                  "for a classification job, else the first of `metrics` with a dataset, else "
                                  "eval_loss.")
    max_examples: int = Field(default=200, ge=1, le=10000,
                              description="Score at most this many records (the first ones) of the evaluation set, "
                                          "and of the validation split.")
    max_new_tokens: int = Field(default=64, ge=1, le=4096,
                                description="Greedy decoding stops after this many new tokens (or at EOS). A "
                                            "classifier's answer gets the content router's budget instead: the "
                                            "longest label's characters + 2, at most 64.")
    timeout_seconds: int = Field(default=900, ge=10, le=86400,
                                 description="Time budget of the whole evaluation; when it runs out, the scores "
                                             "cover the examples done so far (the same ones for every model) and "
                                             "status.evaluation.message says so.")
    compare_previous: bool = Field(default=True,
                                   description="Also score the version the Adapter serves now, when it has one.")

    @model_validator(mode="after")
    def _distinct_metrics(self):
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError("evaluation.metrics lists a metric twice; list each once")
        return self

    def primary(self, classification: bool = False) -> str:
        """The primary metric: primaryMetric, else accuracy for a `classification` job, else the first of
        `metrics` with a dataset, else eval_loss."""
        if self.primary_metric:
            return self.primary_metric
        if classification:
            return ACCURACY
        return self.metrics[0] if self.dataset else EvaluationMetric.eval_loss.value

    def generation_metrics(self, classification: bool = False) -> list[str]:
        """The metrics scored on generated answers: accuracy for a `classification` job (the API refuses any
        other there), else `metrics`."""
        return [ACCURACY] if classification else list(self.metrics)


class MethodSpec(ApiModel):
    """The parameter-efficient method and its LoRA hyperparameters."""

    type: Literal["lora", "qlora"] = Field(
        default="lora", description="lora, or qlora (4-bit NF4 base weights through bitsandbytes).")
    r: int = Field(default=16, ge=1, le=512, description="LoRA rank. Must be <= the serving route's maxLoraRank.")
    alpha: int = Field(default=32, ge=1, le=4096, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[ShortString] | None = Field(max_length=256,
        default=None, min_length=1,
        description="Module names to adapt, e.g. [q_proj, v_proj]. Default: the attention projections of "
                    "the model's architecture. vLLM serves adapters on linear layers only.")
    use_dora: bool = Field(default=False, description="Weight-decomposed LoRA (DoRA).")


class TrainingSpec(ApiModel):
    """Optimisation settings."""

    cel_rules: ClassVar = (
        CelRule(rule="!(has(self.epochs) && has(self.maxSteps))",
                check=lambda o: not ("epochs" in o and "maxSteps" in o),
                message="set at most one of training.epochs or training.maxSteps"),
    )

    epochs: float | None = Field(default=None, gt=0, le=1000, description="Passes over the data (default 1).")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimizer steps.")
    learning_rate: float = Field(default=2e-4, gt=0, lt=1)
    batch_size: int = Field(default=8, ge=1, le=4096, description="Per-device micro-batch size.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=1024)
    max_seq_length: int = Field(default=1024, ge=16, le=1_048_576,
                                description="Records longer than this are truncated (text) or rejected.")
    seed: int = Field(default=42, ge=0)
    precision: Literal["bf16", "fp16", "fp32"] = Field(default="bf16")
    gradient_checkpointing: bool = Field(default=True)
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(default="cosine")
    checkpoint_every_steps: int = Field(default=200, ge=1,
                                        description="Save a resumable checkpoint every N steps.")
    eval_every_steps: int | None = Field(default=None, ge=1, description="Evaluate every N steps (default: "
                                                                          "at each checkpoint).")
    packing: bool = Field(default=False, description="Pack short records into full sequences (text format).")


class ResourcesSpec(ApiModel):
    """What each training pod asks for."""

    gpus: int = Field(default=1, ge=0, le=16, description="GPUs per node (0: CPU-only, for small trials).")
    gpu_resource: str = Field(max_length=253, default="nvidia.com/gpu", description="Extended resource name of the GPUs.")
    gpu_type: str | None = Field(
        default=None, max_length=63, pattern=LABEL_VALUE,
        description="Value of the node label named by gpuTypeLabel to schedule on, e.g. NVIDIA-H100-80GB-HBM3.")
    gpu_type_label: str = Field(max_length=317, default="nvidia.com/gpu.product",
                                description="Node label that carries the GPU model (GPU feature discovery).")
    cpu: Quantity | None = None
    memory: Quantity | None = None
    nodes: int = Field(default=1, ge=1, le=64, description="Nodes for multi-node training (torchrun).")
    node_selector: Labels = Field(default_factory=dict)
    tolerations: list[FreeForm] = Field(max_length=64, default_factory=list, description="Pod tolerations, verbatim.")

    @model_validator(mode="after")
    def _check_gpu_type_label(self):
        if problem := label_key_problem(self.gpu_type_label):
            raise ValueError(f"gpuTypeLabel: {problem}")
        return self


class OutputSpec(ApiModel):
    """What a successful run produces."""

    cel_rules: ClassVar = uri_rules("uri", "output.uri")

    adapter_name: str = Field(pattern=DNS_NAME, max_length=253,
                              description="Adapter to create. If it exists and this job did not create it, a new "
                                          "version of it is published only with allowExistingAdapter.")
    allow_existing_adapter: bool = Field(
        default=False, description="Publish a new version of adapterName even though it already exists and this "
                                   "FineTuneJob did not create it (by hand, or by another run). Without it such a "
                                   "job does not start (Ready=False, reason AdapterExists).")
    uri: str | None = Field(max_length=URI_MAX_LENGTH,
        default=None, pattern=uri_pattern("pvc", "s3", "file", "path"),
        description="Where runs write: pvc://CLAIM/PATH or s3://BUCKET/PREFIX (default: the operator's artifact "
                    "store, <store>/<namespace>/<job name>). Each run writes its adapter to "
                    "<uri>/run-<first 8 characters of the FineTuneJob's uid> and its checkpoints beside it "
                    "(.checkpoints): a recreated job never resumes or overwrites another run's files.")
    adapter_labels: Labels = Field(
        default_factory=dict, description="Labels set on the Adapter (ModelRoute selectors match them).")


class FineTuneJobSpec(ApiModel):
    """What a FineTuneJob asks for: base model, dataset, LoRA method, training settings, resources and output."""

    cel_rules: ClassVar = (
        CelRule(rule="!has(self.evaluation) || has(self.evaluation.dataset) || has(self.dataset.validationSplit) "
                     "|| has(self.dataset.validationUri)",
                check=lambda obj: "evaluation" not in obj or "dataset" in obj["evaluation"]
                or _validation_set(obj.get("dataset", {})),
                message="spec.evaluation has nothing to score: set spec.evaluation.dataset, or "
                        "spec.dataset.validationSplit or validationUri (eval_loss, perplexity)"),
        CelRule(rule=f"!has(self.evaluation) || !has(self.evaluation.primaryMetric) || "
                     f"!(self.evaluation.primaryMetric in {_CEL_LOSS}) || has(self.dataset.validationSplit) || "
                     "has(self.dataset.validationUri)",
                check=lambda obj: obj.get("evaluation", {}).get("primaryMetric") not in LOSS_METRICS
                or _validation_set(obj.get("dataset", {})),
                message="spec.evaluation.primaryMetric eval_loss/perplexity needs a validation set: set "
                        "spec.dataset.validationSplit or validationUri"),
        CelRule(rule="!has(self.evaluation) || " + _CEL_CLASSIFICATION + " || "
                     f"((!has(self.evaluation.metrics) || !('{ACCURACY}' in self.evaluation.metrics)) && "
                     f"(!has(self.evaluation.primaryMetric) || self.evaluation.primaryMetric != '{ACCURACY}'))",
                check=lambda obj: "evaluation" not in obj or _is_classification(obj)
                or not _asks_accuracy(obj["evaluation"]),
                message="spec.evaluation: accuracy scores a classifier's label and needs spec.dataset.format "
                        "classification; remove accuracy from spec.evaluation.metrics and primaryMetric, or train "
                        "on a classification dataset"),
        CelRule(rule="!has(self.evaluation) || !" + _CEL_CLASSIFICATION + " || "
                     f"((!has(self.evaluation.metrics) || self.evaluation.metrics.all(m, m == '{ACCURACY}')) && "
                     "(!has(self.evaluation.primaryMetric) || self.evaluation.primaryMetric in ["
                     + ", ".join(f"'{m}'" for m in CLASSIFICATION_METRICS) + "]))",
                check=lambda obj: "evaluation" not in obj or not _is_classification(obj)
                or _classification_metrics_ok(obj["evaluation"]),
                message="spec.evaluation of a classification job scores accuracy (and eval_loss/perplexity on the "
                        "validation set): leave spec.evaluation.metrics unset or set it to [accuracy], and set "
                        "primaryMetric to accuracy, eval_loss or perplexity (or leave it unset: accuracy)"),
        CelRule(rule="!has(self.evaluation) || !has(self.evaluation.dataset) || "
                     "((has(self.evaluation.dataset.format) && self.evaluation.dataset.format == 'classification') "
                     "== " + _CEL_CLASSIFICATION + ")",
                check=_evaluation_format_ok,
                message="spec.evaluation.dataset.format must be classification exactly when spec.dataset.format "
                        "is (unset, it is instruction): a classifier is scored on {text, label} records (accuracy), "
                        "other adapters on prompt/reference records; set spec.evaluation.dataset.format: "
                        "classification for a classifier's evaluation set, instruction or chat for another's"),
        CelRule(rule="!has(self.training) || !has(self.training.packing) || !self.training.packing || "
                     "(has(self.dataset.format) && self.dataset.format == 'text')",
                check=lambda obj: not obj.get("training", {}).get("packing")
                or obj.get("dataset", {}).get("format") == "text",
                message="spec.training.packing works with spec.dataset.format text only (instruction, chat and "
                        "classification records keep their boundaries so their loss masks stay right); set "
                        "packing: false or format: text"),
    )

    base_model: ModelRef = Field(description="The model to fine-tune.",
                                 json_schema_extra=immutable("spec.baseModel"))
    dataset: DatasetSpec = Field(json_schema_extra=immutable("spec.dataset"))
    method: MethodSpec = Field(default_factory=MethodSpec, json_schema_extra=immutable("spec.method"))
    training: TrainingSpec = Field(default_factory=TrainingSpec, json_schema_extra=immutable("spec.training"))
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec,
                                     json_schema_extra=immutable("spec.resources"))
    output: OutputSpec = Field(json_schema_extra=immutable("spec.output"))
    evaluation: EvaluationSpec | None = Field(
        default=None, description="Score the trained adapter against the base model (and the version it replaces) "
                                  "after training; results in status.evaluation and the Adapter's provenance.",
        json_schema_extra=immutable("spec.evaluation"))
    # A Job's pod template cannot change once created: image and account are fixed for the run.
    image: str | None = Field(max_length=IMAGE_MAX_LENGTH, default=None, description=(
        "Trainer image; default: the operator's trainer image. Another tag of one of the operator's images, or "
        "an image the operator's policy allows (chart operator.policy.allowedImages; else PolicyViolation)."),
                              json_schema_extra=immutable("spec.image"))
    service_account_name: str | None = Field(
        default=None, pattern=DNS_NAME, max_length=253,
        description="ServiceAccount of the training pods (e.g. for IRSA/S3); only one the operator's policy "
                    "allows (chart operator.policy.allowedServiceAccounts; else PolicyViolation).",
        json_schema_extra=immutable("spec.serviceAccountName"))
    pod: PodSettings | None = Field(default=None, description=(
        "Settings of the training pods over the chart's childPods defaults: imagePullSecrets, securityContext "
        "(fsGroup, ...), priorityClassName, runtimeClassName, extra labels/annotations (e.g. a Kueue queue "
        "label), nodeSelector, tolerations, affinity. Bounded by the operator's policy (docs/security.md)."),
                                    json_schema_extra=immutable("spec.pod"))
    backoff_limit: int = Field(default=2, ge=0, le=100,
                               description="Pod failures retried (resuming from checkpoints) before Failed.")
    active_deadline_seconds: int | None = Field(default=None, ge=60,
                                                description="Wall-clock limit for the whole run.")
    suspend: bool = Field(default=False, description="Suspend (stop pods, keep checkpoints) or resume the run.")


class TrainingProgress(ApiModel):
    """Where a run stands, as the trainer last reported it (steps, loss, throughput in tokens/s, ETA)."""

    step: int = Field(default=0, ge=0)
    total_steps: int | None = Field(default=None, ge=0)
    epoch: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: int | None = Field(default=None, description="Estimated seconds to completion.")
    percent: int | None = Field(default=None, ge=0, le=100)
    updated_at: str | None = Field(default=None, json_schema_extra={"format": "date-time"})


class ArtifactRef(ApiModel):
    """Where the trained adapter directory was written and its sha256."""

    uri: str
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class AdapterRef(ApiModel):
    """The Adapter (and its version) a successful run created or bumped."""

    name: str
    version: str | None = None


class Failure(ApiModel):
    """Why a run failed: a Reason and a message saying what to fix."""

    reason: str = Field(description="OOMKilled, ImagePull, DatasetNotFound, InvalidDataset, DeadlineExceeded, "
                                    "BackoffLimitExceeded, ... (docs/troubleshooting.md).")
    message: str = ""


class FineTuneJobPhase(StrEnum):
    """status.phase of a FineTuneJob: a one-word summary for `kubectl get` (the Ready condition has the detail)."""

    Pending = "Pending"
    Running = "Running"
    Succeeded = "Succeeded"
    Failed = "Failed"
    Suspended = "Suspended"


class FineTuneJobStatus(StatusBase):
    """What the operator observed about a FineTuneJob: phase, progress, its Job and its result."""

    phase: FineTuneJobPhase | None = None
    progress: TrainingProgress | None = None
    start_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    completion_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    job_name: str | None = Field(default=None, description="The batch/v1 Job running the trainer.")
    attempts: int | None = Field(default=None, ge=0, description="Pod attempts so far (restarts resume).")
    adapter_ref: AdapterRef | None = None
    artifact: ArtifactRef | None = None
    evaluation: EvaluationResult | None = Field(
        default=None, description="Scores of the trained adapter, the base model and the replaced version.")
    failure: Failure | None = None


class FineTuneJob(Resource):
    """The FineTuneJob custom resource (loraplane.io/v1alpha1): one LoRA/QLoRA training run."""

    KIND: ClassVar = "FineTuneJob"
    PLURAL: ClassVar = "finetunejobs"
    SHORT_NAMES: ClassVar = ("ftj",)
    DESCRIPTION: ClassVar = "Fine-tunes a base model with LoRA/QLoRA on a dataset and produces an Adapter."
    PRINTER_COLUMNS: ClassVar = (
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step"},
        {"name": "Total", "type": "integer", "jsonPath": ".status.progress.totalSteps"},
        {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
        {"name": "ETA", "type": "integer", "jsonPath": ".status.progress.etaSeconds", "priority": 1},
        {"name": "Base", "type": "string", "jsonPath": ".spec.baseModel.name"},
        {"name": "Adapter", "type": "string", "jsonPath": ".spec.output.adapterName"},
        {"name": "Metric", "type": "string", "jsonPath": ".status.evaluation.primaryMetric", "priority": 1},
        {"name": "Score", "type": "number", "jsonPath": ".status.evaluation.score", "priority": 1},
        {"name": "BaseScore", "type": "number", "jsonPath": ".status.evaluation.baseScore", "priority": 1},
        {"name": "Reason", "type": "string", "jsonPath": ".status.failure.reason", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    )

    kind: Literal["FineTuneJob"] = "FineTuneJob"
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None
