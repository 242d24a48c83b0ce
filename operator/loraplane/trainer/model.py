"""Base model, tokenizer and the peft wrapper (LoRA, QLoRA, DoRA), with the checks that make bad settings
fail early with a clear message instead of deep inside peft or a CUDA kernel."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from loraplane.api.finetunejob import FineTuneJob
from loraplane.api.redaction import redacted
from loraplane.trainer.config import Runtime, spec_uri
from loraplane.trainer.errors import InvalidConfig, ModelNotFound, TargetModulesNotFound

log = logging.getLogger("loraplane.trainer")

# Attention projections per architecture (config.model_type): the default target modules. They are linear
# layers, which is what vLLM serves LoRA on. Unknown architectures fall back to peft's own table.
ATTENTION_PROJECTIONS: dict[str, list[str]] = {
    **{t: ["q_proj", "k_proj", "v_proj", "o_proj"] for t in (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3",
        "gemma3_text", "granite", "olmo", "olmo2", "starcoder2", "deepseek_v2", "cohere", "stablelm", "yi")},
    "phi": ["q_proj", "k_proj", "v_proj", "dense"],
    "phi3": ["qkv_proj", "o_proj"],
    "gpt_neox": ["query_key_value", "dense"],
    "falcon": ["query_key_value", "dense"],
    "gpt_bigcode": ["c_attn", "c_proj"],
    "gpt2": ["c_attn", "c_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "bloom": ["query_key_value", "dense"],
    "mpt": ["Wqkv", "out_proj"],
}


@dataclass
class ModelSource:
    """Where the weights are read from, and what provenance records about them."""

    location: str           # a local directory or a hub id
    revision: str | None     # hub revision asked for
    identity: str            # spec.baseModel name or uri: what adapters are matched against


@dataclass
class Precision:
    """The training precision asked for and the one used (bf16, fp16 or fp32), with why they differ."""

    requested: str
    used: str                # what actually runs: bf16, fp16 or fp32
    note: str | None = None  # why `used` differs from `requested`

    @property
    def torch_dtype(self):
        """The torch dtype of the precision used."""
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.used]


def choose_precision(requested: str) -> Precision:
    """bf16/fp16 need a GPU here; on CPU the run falls back to fp32 and says so (log and provenance)."""
    import torch

    if requested == "fp32":
        return Precision(requested, "fp32")
    if not torch.cuda.is_available():
        return Precision(requested, "fp32", f"spec.training.precision={requested} needs a GPU; no GPU found, "
                                            "training in fp32 on the CPU")
    if requested == "bf16" and not torch.cuda.is_bf16_supported():
        return Precision(requested, "fp16", "this GPU has no bf16 support; training in fp16")
    return Precision(requested, requested)


def resolve_source(job: FineTuneJob, runtime: Runtime, scratch: Path) -> ModelSource:
    """Where to load the base model from: --model-dir, else spec.baseModel.uri (a local or PVC path, or
    downloaded and verified under `scratch`), else the hub id. Raises ModelNotFound, InvalidConfig."""
    ref = job.spec.base_model
    if runtime.model_dir:
        return ModelSource(str(_check_dir(Path(runtime.model_dir), "--model-dir/LORAPLANE_MODEL_DIR")), None,
                           ref.identity)
    if ref.uri:
        path = spec_uri(ref.uri, "spec.baseModel.uri").local_path(runtime.pvc_root)
        if path is None:
            path = _download_model(ref.uri, scratch / "models", ref.sha256)
        return ModelSource(str(_check_dir(path, "spec.baseModel.uri")), ref.revision, ref.identity)
    return ModelSource(ref.name or "", ref.revision, ref.identity)


def _check_dir(path: Path, what: str) -> Path:
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"{what}: {path} holds no model (no config.json); point it at a directory written "
                            "by save_pretrained (and check that its volume is mounted)")
    return path


def _download_model(uri: str, cache_dir: Path, sha256: str | None) -> Path:
    """An s3:// prefix (or one archive in S3) or an https:// .tar.gz/.tgz/.tar archive, fetched and verified by
    the same code as the engine pod's `loraplane fetch-model` (loraplane.storage.cache.ArtifactCache). A rerun in the
    same pod reuses the verified copy."""
    import asyncio

    from loraplane.storage.cache import ChecksumMismatch, FetchError, model_cache
    from loraplane.storage.fetchers import FetchPolicy

    try:
        return asyncio.run(model_cache(cache_dir, policy=FetchPolicy.from_env()).fetch(uri, sha256)).path
    except ChecksumMismatch as exc:
        raise InvalidConfig(f"spec.baseModel.sha256: {exc}") from exc
    except FetchError as exc:
        raise ModelNotFound(f"spec.baseModel.uri {redacted(uri)}: {exc}; check the URI (a save_pretrained "
                            "directory, or a .tar.gz of one) and the credentials in "
                            "spec.baseModel.credentialsSecretRef") from exc


def _hub_error(source: ModelSource, exc: Exception) -> ModelNotFound:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    where = f"{source.location}" + (f"@{source.revision}" if source.revision else "")
    hint = ("it is not in the local cache and offline mode is on (HF_HUB_OFFLINE=1): pre-fetch it into HF_HOME "
            "or mount it and set spec.baseModel.uri" if offline and "/" not in source.location[:1]
            else "check spec.baseModel.name/revision (gated models need HF_TOKEN through "
                 "spec.baseModel.credentialsSecretRef) or spec.baseModel.uri")
    return ModelNotFound(f"cannot load the base model {where}: {hint} ({type(exc).__name__}: {exc})")


def load_config(source: ModelSource):
    """The base model's transformers config (cheap: no weights). Raises ModelNotFound."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.location, revision=source.revision)
    except (OSError, ValueError) as exc:
        raise _hub_error(source, exc) from exc


def context_tokens(config) -> int | None:
    """The model's context length in tokens, from the first of the config fields architectures use for it."""
    return next((v for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
                 if isinstance(v := getattr(config, k, None), int)), None)


def load_tokenizer(source: ModelSource):
    """The base model's tokenizer, with pad = EOS when it has no pad token. Raises ModelNotFound."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source.location, revision=source.revision)
    except (OSError, ValueError) as exc:
        raise _hub_error(source, exc) from exc
    if tok.pad_token_id is None:
        # Padding is masked out of attention and loss, so any id works; EOS is the usual choice.
        tok.pad_token = tok.eos_token
    return tok


def load_model(source: ModelSource, method: str, precision: Precision, gradient_checkpointing: bool):
    """The base causal LM in the precision's dtype; for qlora 4-bit NF4 with double quantisation
    (bitsandbytes) prepared for k-bit training. Raises ModelNotFound, InvalidConfig."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"revision": source.revision, "dtype": precision.torch_dtype}
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:  # pragma: no cover - the train extra installs it
            raise InvalidConfig("spec.method.type=qlora needs bitsandbytes (pip install 'loraplane[train]')") from exc
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=precision.torch_dtype)
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except (OSError, ValueError) as exc:
        if "quantization" in str(exc).lower() or "bitsandbytes" in str(exc).lower():
            raise InvalidConfig(f"spec.method.type=qlora: cannot quantise {source.location}: {exc}") from exc
        raise _hub_error(source, exc) from exc
    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def default_target_modules(model) -> list[str]:
    """Target modules when spec.method.targetModules is unset: the attention projections of the
    architecture, else peft's default for it. Raises InvalidConfig listing linear layers otherwise."""
    model_type = getattr(model.config, "model_type", "")
    if model_type in ATTENTION_PROJECTIONS:
        return list(ATTENTION_PROJECTIONS[model_type])
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    if model_type in PEFT_DEFAULTS:
        return list(PEFT_DEFAULTS[model_type])
    raise InvalidConfig(f"no default target modules for model type {model_type!r}; set spec.method.targetModules "
                        f"to some of its linear layers: {', '.join(linear_module_names(model)[:20])}")


def linear_module_names(model) -> list[str]:
    """Distinct last name components of the model's adaptable linear layers (what targetModules names)."""
    return sorted({name.rsplit(".", 1)[-1] for name, _ in _linear_modules(model)} - {"lm_head"})


def _linear_modules(model):
    import torch
    from transformers.pytorch_utils import Conv1D

    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            yield name, module


def check_targets(model, targets: list[str], r: int) -> None:
    """Every target names linear layers of the model, and the rank fits their smallest dimension."""
    linear = list(_linear_modules(model))
    found = {t: [m for n, m in linear if n == t or n.endswith("." + t)] for t in targets}
    missing = [t for t, mods in found.items() if not mods]
    if missing:
        other = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        not_linear = [t for t in missing if t in other]
        detail = f" ({', '.join(not_linear)} exist but are not linear layers)" if not_linear else ""
        raise TargetModulesNotFound(
            f"spec.method.targetModules: {', '.join(missing)} not found among the linear layers of "
            f"{getattr(model.config, 'model_type', 'this model')}{detail}; choose from: "
            f"{', '.join(linear_module_names(model))}")
    smallest = min(min(_dims(m)) for mods in found.values() for m in mods)
    if r > smallest:
        raise InvalidConfig(f"spec.method.r={r} exceeds the smallest dimension ({smallest}) of the target modules "
                            f"{', '.join(targets)}; a LoRA rank above it adds nothing; choose r <= {smallest}")


def _dims(module) -> tuple[int, int]:
    if hasattr(module, "in_features"):
        return module.in_features, module.out_features
    return tuple(module.weight.shape)  # Conv1D


def wrap_peft(model, job: FineTuneJob):
    """The model wrapped in a PEFT LoRA (or DoRA) adapter from spec.method, and the target modules used;
    base_model_name_or_path is the spec's identity (what the loader matches). Raises TargetModulesNotFound,
    InvalidConfig."""
    from peft import LoraConfig, get_peft_model

    m = job.spec.method
    targets = list(m.target_modules) if m.target_modules else default_target_modules(model)
    check_targets(model, targets, m.r)
    config = LoraConfig(r=m.r, lora_alpha=m.alpha, lora_dropout=m.dropout, target_modules=targets,
                        use_dora=m.use_dora, bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    # What adapters are matched against when served: the spec's identity, not a local mount path.
    peft_model.peft_config["default"].base_model_name_or_path = job.spec.base_model.identity
    peft_model.peft_config["default"].revision = job.spec.base_model.revision
    return peft_model, targets


def quantization_summary(model) -> dict:
    """What QLoRA actually quantised (provenance; and proof that the 4-bit path ran)."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    quant_type = getattr(getattr(layers[0].weight, "quant_state", None), "quant_type", None) if layers else None
    return {"bits": 4, "quantType": quant_type or "nf4", "linear4bitLayers": len(layers), "doubleQuant": True}
