"""The compatibility gate: refuse an adapter before it reaches vLLM, with the rule it broke and the fix.

Facts come from files only, never from instantiating a model: the adapter's adapter_config.json and the
names, shapes and dtypes in its safetensors header; the served base model's config.json and the weight names
(and shapes) in its safetensors index/headers. `check()` is pure: it takes those facts and returns failures.

Base model identity (peft's `base_model_name_or_path` against the route's base model) is compared sensibly,
because trainers record whatever path they loaded the model from:
- equal hub ids (case-insensitive) match; two different hub ids never match;
- a local path matches when it is the served model's own directory, a Hugging Face cache snapshot of the same
  repo (`…/models--ORG--NAME/snapshots/REV`, whose REV is also checked), or a directory whose last component
  equals the repo name of the route's hub id (`/data/Llama-3.1-8B` for `meta-llama/Llama-3.1-8B`);
- independently of names, every LoRA matrix must fit the base weight it adapts (in/out features), which
  catches an adapter of another model that happens to carry a matching name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplane.storage.uri import recorded_path

# Adapter tensors vLLM applies as LoRA: `...<module>.lora_A.weight`, `lora_B`, and embedding variants.
_LORA_TENSOR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|"
                          r"lora_embedding_B)(?:\.[^.]+)?(?:\.weight)?$")
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
# quant_method values of a base model's quantization_config under which vLLM serves LoRA adapters.
LORA_QUANTIZATIONS = {
    "awq", "awq_marlin", "gptq", "gptq_marlin", "gptq_bitblas", "bitblas", "marlin", "bitsandbytes", "fp8",
    "fbgemm_fp8", "compressed-tensors", "compressed_tensors", "modelopt", "modelopt_fp4", "mxfp4", "gguf",
    "experts_int8", "moe_wna16", "torchao", "quark",
}
# PEFT init methods that only set initial weights (a saved adapter is plain LoRA); others rewrite the base.
_PLAIN_INITS = {"gaussian", "eva", "orthogonal", "mica", "lora_ga"}
SUPPORTED_MODULES_TO_SAVE = {"classifier", "score"}


@dataclass(frozen=True)
class GateFailure:
    reason: str
    message: str   # what is wrong and how to fix it


@dataclass
class AdapterFacts:
    config: dict[str, Any]
    tensors: dict[str, tuple[tuple[int, ...], str]]   # name -> (shape, safetensors dtype)

    @property
    def rank(self) -> int:
        ranks = [int(self.config.get("r") or 0), *(int(v) for v in (self.config.get("rank_pattern") or {}).values())]
        ranks += [shape[0] for name, (shape, _) in self.tensors.items() if ".lora_A" in name and shape]
        return max(ranks)

    def lora_modules(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """module name (as in the base model) -> {"lora_A": shape, "lora_B": shape}."""
        out: dict[str, dict[str, tuple[int, ...]]] = {}
        for name, (shape, _) in self.tensors.items():
            m = _LORA_TENSOR.match(name)
            if m:
                out.setdefault(m["module"], {})[m["kind"]] = shape
        return out

    def full_tensors(self) -> list[str]:
        """Tensors that are whole module weights (modules_to_save, resized embeddings), not LoRA factors."""
        return [n for n in self.tensors if not _LORA_TENSOR.match(n)]


@dataclass
class BaseFacts:
    identity: str
    revision: str | None
    path: Path | None
    config: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, tuple[int, ...] | None] = field(default_factory=dict)   # name -> shape (None: unknown)

    def modules(self) -> dict[str, tuple[int, ...] | None]:
        """Module name -> weight shape, from `<module>.weight` tensors (what LoRA can adapt)."""
        out = {}
        for name, shape in self.weights.items():
            if name.endswith(".weight"):
                out[name.removesuffix(".weight")] = shape
        return out


# ---- reading facts ---------------------------------------------------------------------------------------------
def read_safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) from a .safetensors header, without reading the tensors."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if size <= 0 or size > 100 * 1024 * 1024:
            raise ValueError(f"{path.name}: not a safetensors file (header size {size})")
        header = json.loads(fh.read(size))
    return {k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items() if k != "__metadata__"}


def read_adapter(directory: Path) -> AdapterFacts:
    """Raises ValueError with a user-facing message when the directory is not a usable PEFT adapter."""
    cfg_path = directory / "adapter_config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except OSError as exc:
        raise ValueError(f"adapter_config.json is missing: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"adapter_config.json is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError("adapter_config.json must hold a JSON object")
    tensors: dict[str, tuple[tuple[int, ...], str]] = {}
    st = directory / "adapter_model.safetensors"
    if st.is_file():
        tensors = read_safetensors_header(st)
    elif (directory / "adapter_model.bin").is_file():
        try:
            import torch  # only for legacy pickled adapters; vLLM loads them too
        except ImportError as exc:
            raise ValueError("adapter_model.bin (pickle) needs torch to inspect; save the adapter as "
                             "safetensors (PEFT's default)") from exc

        state = torch.load(directory / "adapter_model.bin", map_location="cpu", weights_only=True)
        dt = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}
        tensors = {k: (tuple(v.shape), dt.get(v.dtype, str(v.dtype))) for k, v in state.items()}
    else:
        raise ValueError("no adapter_model.safetensors (or adapter_model.bin) next to adapter_config.json")
    return AdapterFacts(config=config, tensors=tensors)


def read_base(identity: str, revision: str | None, path: Path | None) -> BaseFacts:
    """Facts about the served base model from its directory (config.json, safetensors index or headers)."""
    facts = BaseFacts(identity=identity, revision=revision, path=path)
    if path is None:
        return facts
    try:
        facts.config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        pass
    index = path / "model.safetensors.index.json"
    files = sorted(path.glob("*.safetensors"))
    if files:
        for f in files:
            facts.weights.update({k: shape for k, (shape, _) in read_safetensors_header(f).items()})
    elif index.is_file():   # shards not here (yet): names without shapes still check target modules
        facts.weights = {k: None for k in json.loads(index.read_text()).get("weight_map", {})}
    return facts


def find_base_model_dir(identity: str, revision: str | None, model_path: str | None) -> Path | None:
    """The base model's local directory: the given path, else its snapshot in the local Hugging Face cache."""
    if model_path and Path(model_path).is_dir():
        return Path(model_path)
    if re.match(r"^[\w.-]+(/[\w.-]+)?$", identity or ""):
        try:
            from huggingface_hub import try_to_load_from_cache

            cfg = try_to_load_from_cache(identity, "config.json", revision=revision)
            if isinstance(cfg, str):
                return Path(cfg).parent
        except Exception:  # noqa: BLE001 - a malformed id or cache: the gate then runs without module facts
            return None
    return None


# ---- identity ----------------------------------------------------------------------------------------------
_HF_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<rev>[^/]+)")


def _is_path(s: str) -> bool:
    return recorded_path(s) is not None


def identity_matches(recorded: str, identity: str, model_path: str | None,
                     revision: str | None = None) -> tuple[bool, str]:
    """Does peft's recorded base model refer to the served one? (match, why not)."""
    rec, ident = recorded.strip().rstrip("/"), identity.strip().rstrip("/")
    if not rec or rec.lower() == ident.lower():
        return True, ""
    if model_path and _is_path(rec):
        try:
            if recorded_path(rec).resolve() == Path(model_path).resolve():
                return True, ""
        except OSError:
            pass
    if m := _HF_SNAPSHOT.search(rec):
        repo = f"{m['org']}/{m['name']}"
        if repo.lower() != ident.lower():
            return False, f"it was trained on a cache snapshot of {repo}"
        if revision and len(revision) == 40 and m["rev"] != revision:
            return False, f"it was trained on revision {m['rev']}, the route serves {revision}"
        return True, ""
    if _is_path(rec) or _is_path(ident):
        if rec.rsplit("/", 1)[-1].lower() == ident.rsplit("/", 1)[-1].lower():
            return True, ""
        return False, f"its recorded base path {rec!r} is neither the served model's directory nor named after it"
    return False, f"it was trained on {rec!r}"


# ---- the rules -------------------------------------------------------------------------------------------
def _target_patterns_missing(targets: Any, modules: set[str]) -> list[str]:
    if targets in (None, "all-linear", ["all-linear"]):
        return []
    if isinstance(targets, str):   # peft: a regex matched against the full module name
        return [] if any(re.fullmatch(targets, m) for m in modules) else [targets]
    return [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]


def check(adapter: AdapterFacts, base: BaseFacts, *, max_lora_rank: int, declared_base: str | None = None,
          declared_base_revision: str | None = None, declared_rank: int | None = None,
          model_path: str | None = None) -> list[GateFailure]:
    """Every rule the adapter breaks for this served base model (empty: compatible)."""
    cfg = adapter.config
    failures: list[GateFailure] = []

    def fail(reason: str, message: str) -> None:
        failures.append(GateFailure(reason, message))

    peft_type = str(cfg.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        fail("UnsupportedAdapterType", f"peft_type is {peft_type}; vLLM serves LoRA adapters only. Train with "
                                       "method lora or qlora.")
        return failures

    # Base model and revision.
    if declared_base and not identity_matches(declared_base, base.identity, model_path)[0]:
        fail("BaseModelMismatch", f"the Adapter declares base model {declared_base!r} but this route serves "
                                  f"{base.identity!r}; select it from a ModelRoute of that base model")
    recorded = str(cfg.get("base_model_name_or_path") or "")
    ok, why = identity_matches(recorded, base.identity, model_path, base.revision)
    if not ok:
        fail("BaseModelMismatch", f"adapter_config.json says base_model_name_or_path={recorded!r} but this route "
                                  f"serves {base.identity!r} ({why}); serve it on a route of its base model, or "
                                  "retrain it on this one")
    for rev, where in ((declared_base_revision, "spec.baseModel.revision"), (cfg.get("revision"),
                                                                               "adapter_config.json revision")):
        if rev and base.revision and rev != base.revision:
            fail("BaseModelMismatch", f"{where} is {rev!r} but the route serves revision {base.revision!r}; "
                                      "pin the same revision on both or retrain on the served one")

    # Features vLLM does not implement.
    features = []
    if cfg.get("use_dora"):
        features.append("DoRA (use_dora)")
    if cfg.get("lora_bias") or (cfg.get("bias") or "none") != "none":
        features.append(f"trained biases (bias={cfg.get('bias')!r}, lora_bias={cfg.get('lora_bias')!r})")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        features.append(f"init_lora_weights={init!r} (it rewrites the base weights)")
    for key, label in (("alora_invocation_tokens", "Activated LoRA"), ("layer_replication", "layer_replication"),
                       ("use_qalora", "QALoRA"), ("use_bdlora", "block-diagonal LoRA")):
        if cfg.get(key):
            features.append(label)
    if features:
        fail("UnsupportedAdapterFeature", "vLLM cannot serve " + ", ".join(features) + "; retrain as a plain "
                                          "LoRA adapter (or convert it with PEFT)")

    # Rank.
    rank = adapter.rank
    if rank > max_lora_rank:
        fail("RankTooLarge", f"the adapter's rank is {rank} but the route's engine.maxLoraRank is {max_lora_rank}; "
                             f"raise spec.engine.maxLoraRank to at least {rank} or retrain with r <= {max_lora_rank}")
    if declared_rank is not None and declared_rank != rank:
        fail("RankMismatch", f"spec.rank declares {declared_rank} but the artifact's rank is {rank}; "
                             "correct spec.rank (or remove it)")

    # modules_to_save and resized embeddings.
    saved = [m for m in (cfg.get("modules_to_save") or []) if m not in SUPPORTED_MODULES_TO_SAVE]
    full = [n for n in adapter.full_tensors() if not any(f".{m}." in f".{n}" for m in SUPPORTED_MODULES_TO_SAVE)]
    if saved or full:
        what = f"modules_to_save={saved}" if saved else f"full weights {sorted(full)[:4]}"
        fail("UnsupportedModulesToSave", f"the adapter carries whole-module weights ({what}, e.g. resized "
                                         "embeddings or an lm_head); vLLM applies only LoRA factors. Retrain "
                                         "without modules_to_save and without adding tokens")

    # dtypes and the base model's quantization.
    bad_dtypes = sorted({dt for _, dt in adapter.tensors.values() if dt not in _FLOAT_DTYPES})
    if bad_dtypes:
        fail("UnsupportedDtype", f"adapter tensors are stored as {bad_dtypes}; vLLM needs float16, bfloat16 or "
                                 "float32 LoRA weights. Save the adapter unquantized (QLoRA adapters are saved "
                                 "in full precision by PEFT)")
    quant = (base.config.get("quantization_config") or {}).get("quant_method")
    if quant and str(quant).lower() not in LORA_QUANTIZATIONS:
        fail("UnsupportedQuantization", f"the base model is quantized with {quant!r}, which vLLM does not "
                                        "combine with LoRA; serve an unquantized or a supported (awq, gptq, "
                                        "bitsandbytes, fp8) checkpoint")

    # Target modules and shapes against the base model's weights.
    modules = base.modules()
    if modules:
        lora = adapter.lora_modules()
        missing_targets = _target_patterns_missing(cfg.get("target_modules"), set(modules))
        missing_modules = sorted(m for m in lora if m not in modules)
        if missing_targets or missing_modules:
            names = missing_targets or missing_modules[:4]
            fail("TargetModulesNotFound", f"target modules {names} do not exist in the base model "
                                          f"({base.identity}); retrain with target_modules naming its layers, "
                                          f"e.g. {_example_targets(modules)}")
        mismatched = []
        for mod, shapes in lora.items():
            wshape = modules.get(mod)
            if not wshape or len(wshape) != 2:
                continue
            out_f, in_f = wshape
            if "lora_embedding_A" in shapes:   # embeddings: A is (r, vocab), B is (hidden, r)
                if shapes["lora_embedding_A"][-1] != out_f:
                    mismatched.append(f"{mod} (vocab {shapes['lora_embedding_A'][-1]} vs {out_f})")
                continue
            a, b = shapes.get("lora_A"), shapes.get("lora_B")
            if (a and a[-1] != in_f) or (b and b[0] != out_f):
                mismatched.append(f"{mod} (adapter {a and a[-1]}->{b and b[0]}, base {in_f}->{out_f})")
        if mismatched:
            fail("BaseModelMismatch", f"LoRA matrices do not fit the base model's layers: {mismatched[:3]}; the "
                                      "adapter was trained on a different model (or resized embeddings)")
    return failures


def _example_targets(modules: dict[str, Any]) -> str:
    leaves = sorted({m.rsplit(".", 1)[-1] for m, s in modules.items() if s is None or len(s) == 2}
                    - {"embed_tokens", "lm_head", "norm"})
    return str(leaves[:8])
