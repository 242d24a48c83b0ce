"""The compatibility gate: refuse an adapter before it reaches vLLM, with the rule it broke and the fix.

Facts come from files only, never from instantiating a model: the adapter's adapter_config.json and the
names, shapes and dtypes in its safetensors header; the served base model's config.json and the weight names
(and shapes) in its safetensors index/headers. `check()` is pure: it takes those facts and runs the chain of
named rules `RULES`, returning every violation in chain order.

Each rule is a small function `GateInput -> message | None`, declared with `@rule(Reason.X)` (the reason it
reports) and documented with where it comes from (a vLLM behaviour or a PEFT format fact). To add one: write it
next to the others, put it in `RULES` where its failure should be reported, and add a passing and a violating
case to `RULE_CASES` in tests/unit/loader/test_gate.py.

The rules describe vLLM's LoRA behaviour as of the release in `CHECKED_AGAINST_VLLM` (the version the `vllm`
tests run, and the default engine image's tag): when that release changes, re-check the rules that cite a vLLM
behaviour (supported quantizations, modules_to_save, ranks, dtypes) against the new release.

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
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, update_wrapper
from pathlib import Path
from typing import Any


from loraplane.api.modelroute import ENGINE_VERSION
from loraplane.api.patterns import compile_re2
from loraplane.api.redaction import redacted
from loraplane.api.reasons import Reason
from loraplane.storage.uri import recorded_path

# The vLLM release whose LoRA behaviour the rules below were checked against (api.modelroute.ENGINE_VERSION).
CHECKED_AGAINST_VLLM = ENGINE_VERSION
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
    """One broken rule: its reason and a message saying what is wrong and how to fix it."""

    reason: Reason
    message: str


@dataclass
class AdapterFacts:
    """What an adapter directory holds: its adapter_config.json and each tensor's (shape, dtype) from
    adapter_model.safetensors."""

    config: dict[str, Any]
    tensors: dict[str, tuple[tuple[int, ...], str]]   # name -> (shape, safetensors dtype)
    # name -> how many NaN/Inf values `scan_nonfinite` found in it (only tensors with some); what was scanned:
    nonfinite: dict[str, int] = field(default_factory=dict)
    values_scanned: str = ""   # "" (not scanned), "all", or "sampled: ..." when over the scan budget

    @property
    def rank(self) -> int:
        """The largest LoRA rank in the adapter: config `r`, its `rank_pattern` values and the first dimension
        of every lora_A tensor (vLLM's --max-lora-rank must cover it). Values that are not integers are left
        out here (the `config_rank_matches_tensors` rule reports them)."""
        pattern = self.config.get("rank_pattern")
        ranks = [_int(self.config.get("r")), *(_int(v) for v in (pattern.values() if isinstance(pattern, dict)
                                                                  else ()))]
        ranks += [shape[0] for name, (shape, _) in self.tensors.items() if ".lora_A" in name and shape]
        return max([r for r in ranks if r is not None] or [0])

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
    """What the loader knows of the served base model: identity and revision, its directory (None: not
    found), its config.json and weight shapes by tensor name."""

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


def _int(value: Any) -> int | None:
    """`value` when it is an int (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# ---- reading facts ---------------------------------------------------------------------------------------------
# The largest adapter safetensors header read (bytes). The format allows 100 MB (safetensors' own
# MAX_HEADER_SIZE); a LoRA adapter's header is a few KB to a few hundred KB (one small JSON entry per tensor),
# so 8 MiB leaves room for any real adapter while a hostile one cannot make every replica parse 100 MB of JSON.
MAX_ADAPTER_HEADER_BYTES = 8 << 20
# A base model's header (its own files, of the route's owner) gets the format's limit.
MAX_BASE_HEADER_BYTES = 100_000_000
# Longest target_modules regex accepted (PEFT's string form); real ones are well under 200 characters.
MAX_PATTERN_CHARS = 1000
# Largest adapter_config.json read (checked with fstat before reading): PEFT writes about 1 KB; json.loads of a
# huge one costs several times its size in memory, on every replica.
MAX_CONFIG_BYTES = 1 << 20
# Most target_modules names accepted (PEFT's list form): a model has a few dozen distinct layer names.
MAX_TARGET_MODULES = 10_000
# Most rank_pattern / alpha_pattern keys accepted: PEFT writes one per module given another rank; vLLM matches
# each key against every adapted module with Python's re, whose compiled-pattern cache holds 512.
MAX_PATTERN_KEYS = 512
# Most (rank_pattern + alpha_pattern key, adapted module) pairs matched: PEFT and vLLM match every key against every
# module when the adapter loads (Python's re, about a microsecond each with the pattern cached, much more once 1024
# keys thrash re's 512-pattern cache), and so does the gate (RE2, ~1.5 us per pair with Python's call overhead). 512
# keys over the ~38,000 modules an 8 MiB header can name was ~30 s in the gate and as long in the engine; a
# million pairs (a 47,000-module MoE adapter with 21 keys) is about a second.
MAX_PATTERN_MATCHES = 1_000_000


class GateError(ValueError):
    """An adapter the gate cannot read, with the reason to report (InvalidAdapter unless a limit was hit)."""

    def __init__(self, message: str, reason: Reason = Reason.InvalidAdapter):
        super().__init__(message)
        self.reason = reason


def _raw_safetensors_header(path: Path, max_header_bytes: int = MAX_BASE_HEADER_BYTES) -> tuple[dict[str, Any], int]:
    """(header without __metadata__, offset of the data section) of a .safetensors file: reads the 8-byte length
    and then only the header. Raises GateError(ArtifactTooLarge) when the length field exceeds
    `max_header_bytes` (checked before anything more is read), GateError(InvalidAdapter) for a file that is not
    safetensors (length beyond the file, header not a JSON object)."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if size > max_header_bytes:
            raise GateError(f"{path.name}: its safetensors header is {size} bytes, more than the limit of "
                            f"{max_header_bytes} (a LoRA adapter's header is a few KB); re-save it with "
                            "safetensors/PEFT", Reason.ArtifactTooLarge)
        raw = fh.read(size)
    if size <= 0 or len(raw) != size:
        raise GateError(f"{path.name}: not a safetensors file (header size {size}, {len(raw)} bytes present)")
    header = _untrusted_json(raw, f"{path.name}: not a safetensors file (its header")
    if not isinstance(header, dict):
        raise GateError(f"{path.name}: not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    return header, 8 + size


def _untrusted_json(raw: bytes, what: str) -> Any:
    """json.loads of an untrusted file's bytes. Every way it can fail is a GateError (InvalidAdapter) whose
    message starts with `what` (e.g. "adapter_config.json (it") and says why: not UTF-8 or not JSON, nesting
    deeper than Python's parser recurses (RecursionError, which is no ValueError: the loader reported it as a
    retried InternalError), or an integer longer than Python converts (4300 digits)."""
    try:
        return json.loads(raw)
    except RecursionError as exc:
        raise GateError(f"{what} nests arrays or objects too deeply to parse)") from exc
    except ValueError as exc:   # JSONDecodeError, UnicodeDecodeError, an integer over sys.get_int_max_str_digits
        raise GateError(f"{what} is not valid JSON: {redacted(str(exc), 200)})") from exc


# Bits per element of each safetensors dtype (safetensors' Dtype::bitsize; the sub-byte float formats pack).
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}


# safetensors reads shapes and offsets as usize and multiplies them with checked_mul: nothing larger is valid.
_USIZE_MAX = (1 << 64) - 1


def _dims(value: Any) -> tuple[int, ...] | None:
    """A safetensors shape: a list of JSON integers 0..2**64-1 (not bools, not floats), else None."""
    if not isinstance(value, list) or not all(type(d) is int and 0 <= d <= _USIZE_MAX for d in value):
        return None
    return tuple(value)


def _elements(shape: tuple[int, ...]) -> int | None:
    """The product of `shape`, or None where safetensors' checked_mul overflows usize on the way (so the
    product never grows past 128 bits: multiplying up a hostile 400,000-dimension shape as Python's unbounded
    int took minutes)."""
    elements = 1
    for d in shape:
        elements *= d
        if elements > _USIZE_MAX:
            return None
    return elements


def _checked_entries(path: Path, header: dict[str, Any], data_bytes: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of a safetensors header, checked as the safetensors library checks it when vLLM
    opens the file (safetensors' Metadata::validate): every entry an object with a string dtype, a shape of
    non-negative integers and two integer data_offsets; the tensors, in offset order, tile the data section
    exactly (no gap, overlap or trailing bytes); and a tensor of a known dtype spans exactly its shape's
    elements times the dtype's size (a dtype or shape that lies, or a shape whose product overflows). An
    unknown dtype is left to the float_dtypes rule. Raises GateError (InvalidAdapter) naming the tensor."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    spans: list[tuple[int, int, str]] = []
    fix = "re-save it with safetensors/PEFT"
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise GateError(f"{path.name}: tensor {name[:80]!r} is not an object in the header; {fix}")
        dtype, shape, offsets = entry.get("dtype"), _dims(entry.get("shape")), entry.get("data_offsets")
        if not isinstance(dtype, str) or shape is None:
            raise GateError(f"{path.name}: tensor {name[:80]!r} lacks a valid shape or dtype (shape "
                            f"{str(entry.get('shape'))[:60]}, dtype {str(dtype)[:20]!r}: a shape is a list of "
                            f"non-negative integers); {fix}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= _USIZE_MAX):
            raise GateError(f"{path.name}: tensor {name[:80]!r} has invalid data_offsets "
                            f"{str(offsets)[:60]}; {fix}")
        begin, end = offsets
        bits = SAFETENSORS_DTYPE_BITS.get(dtype)
        if bits is not None:
            elements = _elements(shape)
            if elements is None or elements * bits != (end - begin) * 8:
                raise GateError(f"{path.name}: tensor {name[:80]!r} is {dtype} of shape {list(shape)[:8]} but its "
                                f"data is {end - begin} bytes (its dtype or shape is wrong, or its size "
                                f"overflows); {fix}")
        spans.append((begin, end, name))
        out[name] = (shape, dtype)
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            raise GateError(f"{path.name}: tensor {name[:80]!r}'s data starts at byte {begin}, not {at}: tensors "
                            f"overlap or leave a gap; {fix}")
        at = end
    if at != data_bytes:
        raise GateError(f"{path.name}: its tensors cover {at} bytes but the data section is {data_bytes} bytes "
                        f"(the file is truncated or corrupt); {fix}")
    return out


def read_safetensors_header(path: Path, max_header_bytes: int = MAX_BASE_HEADER_BYTES
                            ) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) from a .safetensors header (`_raw_safetensors_header`), without reading the
    tensors; the header is checked as the safetensors library checks it (`_checked_entries`), so a file vLLM
    could not open is refused here. Raises GateError (a ValueError)."""
    header, data_start = _raw_safetensors_header(path, max_header_bytes)
    return _checked_entries(path, header, path.stat().st_size - data_start)


# Float dtypes as unsigned integers and their exponent bits: a value is NaN or Inf exactly when its exponent
# bits are all ones (IEEE 754; bfloat16 is the top half of a float32). Counting on the integer view needs no
# float conversion, so bfloat16 (which numpy lacks) costs the same as the others.
_EXPONENT_BITS = {"F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80), "F32": ("<u4", 0x7F800000),
                  "F64": ("<u8", 0x7FF0000000000000)}
SCAN_BYTES = 1 << 30   # the value scan reads at most this much of an adapter (about a second)
_SCAN_CHUNK = 1 << 22  # elements per vectorised step (bounded temporary memory)


def scan_nonfinite(path: Path, budget: int = SCAN_BYTES) -> tuple[dict[str, int], str]:
    """({tensor name: count of NaN/Inf values} for the tensors that have any, what was scanned) of a
    .safetensors file's float tensors.

    Cost is bounded: up to `budget` bytes are read (memory-mapped, vectorised with numpy, about 1 GB/s).
    When the float tensors are larger, the same share of every tensor is read from its start (a diverged
    training leaves NaN throughout its tensors, so a share of each finds it) and the second value says so.
    Raises ValueError when the header's offsets do not fit the file (a corrupt or truncated file).
    """
    import numpy as np

    header, data_start = _raw_safetensors_header(path)
    size = path.stat().st_size
    floats = []
    for name, entry in header.items():
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            dtype = entry["dtype"]
        except (KeyError, TypeError, ValueError, OverflowError) as exc:   # 1e400 is a float inf
            raise ValueError(f"{path.name}: tensor {name[:80]!r} has no valid data_offsets ({exc})") from exc
        if not 0 <= begin <= end or data_start + end > size:
            raise ValueError(f"{path.name}: tensor {name!r} lies outside the file (offsets {begin}..{end}, "
                             f"{size - data_start} data bytes): the file is truncated or corrupt")
        if dtype in _EXPONENT_BITS:
            floats.append((name, dtype, begin, end))
    total = sum(end - begin for _, _, begin, end in floats)
    share = total if total <= budget else max(budget // max(len(floats), 1), 4096)
    found: dict[str, int] = {}
    if not floats or size <= data_start:
        return found, "all"
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for name, dtype, begin, end in floats:
        itype, mask = _EXPONENT_BITS[dtype]
        width = np.dtype(itype).itemsize
        n = min(end - begin, share) // width
        values = data[data_start + begin:data_start + begin + n * width].view(itype)
        mask = np.array(mask, dtype=itype)
        bad = 0
        for i in range(0, n, _SCAN_CHUNK):
            part = values[i:i + _SCAN_CHUNK]
            bad += int(np.count_nonzero((part & mask) == mask))
        if bad:
            found[name] = bad
    del data
    what = "all" if total <= budget else (f"sampled: the first {share} bytes of each of {len(floats)} tensors "
                                          f"({budget} of {total} bytes)")
    return found, what


def read_adapter(directory: Path, max_header_bytes: int = MAX_ADAPTER_HEADER_BYTES, *,
                 scan_bytes: int = SCAN_BYTES) -> AdapterFacts:
    """An adapter directory's facts: its config, its tensors' shapes and dtypes (the safetensors header capped
    at `max_header_bytes`) and, for safetensors, which tensors hold NaN/Inf values (`scan_nonfinite` within
    `scan_bytes`; 0 skips the scan).

    Raises ValueError with a user-facing message when the directory is not a usable PEFT adapter (a GateError
    carrying its reason for a header over `max_header_bytes` or an adapter_config.json over MAX_CONFIG_BYTES:
    ArtifactTooLarge, checked with fstat before a byte is read)."""
    cfg_path = directory / "adapter_config.json"
    try:
        with open(cfg_path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > MAX_CONFIG_BYTES:
                raise GateError(f"adapter_config.json is {size} bytes, more than the limit of {MAX_CONFIG_BYTES} "
                                "(PEFT writes about 1 KB); save the adapter with PEFT's save_pretrained",
                                Reason.ArtifactTooLarge)
            raw = fh.read(MAX_CONFIG_BYTES + 1)   # bounded even if the file grew after fstat
        if len(raw) > MAX_CONFIG_BYTES:
            raise GateError(f"adapter_config.json is more than {MAX_CONFIG_BYTES} bytes", Reason.ArtifactTooLarge)
    except OSError as exc:
        raise ValueError(f"adapter_config.json is missing: {exc}") from exc
    config = _untrusted_json(raw, "adapter_config.json (it")
    if not isinstance(config, dict):
        raise ValueError("adapter_config.json must hold a JSON object")
    tensors: dict[str, tuple[tuple[int, ...], str]] = {}
    nonfinite: dict[str, int] = {}
    scanned = ""
    st = directory / "adapter_model.safetensors"
    if st.is_file():
        tensors = read_safetensors_header(st, max_header_bytes)
        if scan_bytes > 0:
            nonfinite, scanned = scan_nonfinite(st, scan_bytes)
    elif (directory / "adapter_model.bin").is_file():
        try:
            import torch  # only for legacy pickled adapters; vLLM loads them too
        except ImportError as exc:
            raise ValueError("adapter_model.bin (pickle) needs torch to inspect; save the adapter as "
                             "safetensors (PEFT's default)") from exc

        _check_torch_archive(directory / "adapter_model.bin")
        try:
            state = torch.load(directory / "adapter_model.bin", map_location="cpu", weights_only=True)
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError (bad zip), EOFError...: the file's fault
            raise GateError(f"adapter_model.bin cannot be read as a PyTorch state dict ({type(exc).__name__}: "
                            f"{redacted(str(exc), 200)}); save the adapter as safetensors (PEFT's default)") from exc
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise GateError("adapter_model.bin does not hold a state dict (tensor names -> tensors); save the "
                            "adapter as safetensors (PEFT's default)")
        dt = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}
        tensors = {k: (tuple(v.shape), dt.get(v.dtype, str(v.dtype))) for k, v in state.items()}
        nonfinite = {k: n for k, v in state.items() if v.is_floating_point()
                     and (n := int((~torch.isfinite(v)).sum()))}
        scanned = "all"
    else:
        raise ValueError("no adapter_model.safetensors (or adapter_model.bin) next to adapter_config.json")
    return AdapterFacts(config=config, tensors=tensors, nonfinite=nonfinite, values_scanned=scanned)


def _check_torch_archive(path: Path) -> None:
    """Refuse (GateError InvalidAdapter) an adapter_model.bin that torch.load could inflate: it must be what
    torch.save writes (PyTorch >= 1.6, PEFT's .bin format), a zip archive of *stored* members whose sizes add up to
    no more than the file. A deflated member holding a tensor of zeros inflates about 1000x when loaded (a 200 KB
    file became 200 MB in the loader's memory; an 8 GiB artifact, terabytes), and the legacy (pre-zip) pickle
    format allocates each storage at the size its header claims. Checked from the zip's central directory
    before torch reads a byte of tensor data."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise GateError("adapter_model.bin is not a torch.save archive (a zip, PyTorch 1.6+; older pickles are "
                        "not read); save the adapter as safetensors (PEFT's default)") from exc
    packed = next((m.filename for m in members if m.compress_type != zipfile.ZIP_STORED), None)
    unpacked, size = sum(m.file_size for m in members), path.stat().st_size
    if packed is not None or unpacked > size:
        what = (f"member {packed[:80]!r} is compressed" if packed is not None
                else f"its members claim {unpacked} bytes, more than the file's {size}")
        raise GateError(f"adapter_model.bin is not as torch.save writes it ({what}: loading it could inflate it "
                        "in memory); save the adapter as safetensors (PEFT's default)")


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
def hf_snapshot(path: str) -> tuple[str, str] | None:
    """(ORG/NAME, REV) when `path` runs through a Hugging Face cache snapshot (`…models--ORG--NAME/snapshots/REV…`),
    else None. Parsed by components, linear in the path: `path` is peft's base_model_name_or_path, untrusted
    (up to MAX_CONFIG_BYTES), and a regex search for this shape backtracks quadratically on a long
    `models--a----…` (minutes of a held GIL for a 1 MB config)."""
    parts = path.split("/")
    for i, part in enumerate(parts[:-2]):
        at = part.find("models--")
        if at == -1 or parts[i + 1] != "snapshots" or not parts[i + 2]:
            continue
        repo = part[at + len("models--"):]
        cut = repo.find("--", 1)   # ORG is at least one character; NAME follows the first "--" after it
        if cut != -1 and repo[cut + 2:]:
            return f"{repo[:cut]}/{repo[cut + 2:]}", parts[i + 2]
    return None


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
    if snapshot := hf_snapshot(rec):
        repo, rev = snapshot
        if repo.lower() != ident.lower():
            return False, f"it was trained on a cache snapshot of {repo}"
        if revision and len(revision) == 40 and rev != revision:
            return False, f"it was trained on revision {rev}, the route serves {revision}"
        return True, ""
    if _is_path(rec) or _is_path(ident):
        if rec.rsplit("/", 1)[-1].lower() == ident.rsplit("/", 1)[-1].lower():
            return True, ""
        return False, f"its recorded base path {rec!r} is neither the served model's directory nor named after it"
    return False, f"it was trained on {rec!r}"


# ---- the rules -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GateInput:
    """What every rule looks at: the adapter's files, the served base model's files and the route's limits.

    `declared_*` come from the Adapter's spec (via the serving table); `model_path` is the base model's local
    directory in the replica (None: unknown), used to recognise a recorded local base path as the served one.
    """

    adapter: AdapterFacts
    base: BaseFacts
    max_lora_rank: int
    declared_base: str | None = None
    declared_base_revision: str | None = None
    declared_rank: int | None = None
    model_path: str | None = None

    @property
    def config(self) -> dict[str, Any]:
        """The adapter's adapter_config.json."""
        return self.adapter.config

    @cached_property
    def rank(self) -> int:
        """The adapter's effective (largest) rank."""
        return self.adapter.rank

    @cached_property
    def base_modules(self) -> dict[str, tuple[int, ...] | None]:
        """The base model's adaptable modules -> weight shape (empty: its files are not readable here)."""
        return self.base.modules()

    @cached_property
    def lora_modules(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """The modules the adapter carries LoRA factors for -> their shapes."""
        return self.adapter.lora_modules()


RuleCheck = Callable[[GateInput], str | None]


@dataclass(eq=False)   # a rule is itself (hashable by identity), not its fields
class Rule:
    """One compatibility rule: `check` returns the violation's message (what is wrong and the fix) or None.

    A violation is reported with the rule's `reason`. A `final` rule's violation ends the chain: the rules after
    it assume what it checks (a LoRA adapter).
    """

    reason: Reason
    check: RuleCheck
    final: bool = False

    def __call__(self, subject: GateInput) -> GateFailure | None:
        message = self.check(subject)
        return None if message is None else GateFailure(self.reason, message)


def rule(reason: Reason, *, final: bool = False) -> Callable[[RuleCheck], Rule]:
    """Decorator: make a check function (GateInput -> message or None) a `Rule` reporting `reason`."""
    def make(check: RuleCheck) -> Rule:
        return update_wrapper(Rule(reason, check, final), check)
    return make


@rule(Reason.UnsupportedAdapterType, final=True)
def adapter_type(g: GateInput) -> str | None:
    """peft_type must be LORA (PEFT's default when absent): vLLM's runtime adapters are LoRA only (its
    PEFTHelper reads LoRA fields; IA3, prefix tuning, LoHa… have other tensors). Final: the rest assumes LoRA."""
    peft_type = str(g.config.get("peft_type") or "LORA").upper()
    if peft_type == "LORA":
        return None
    return f"peft_type is {peft_type}; vLLM serves LoRA adapters only. Train with method lora or qlora."


@rule(Reason.BaseModelMismatch)
def declared_base_model(g: GateInput) -> str | None:
    """The Adapter's spec.baseModel must name the route's base model (see `identity_matches`)."""
    if not g.declared_base or identity_matches(g.declared_base, g.base.identity, g.model_path)[0]:
        return None
    return (f"the Adapter declares base model {g.declared_base!r} but this route serves {g.base.identity!r}; "
            "select it from a ModelRoute of that base model")


@rule(Reason.BaseModelMismatch)
def recorded_base_model(g: GateInput) -> str | None:
    """PEFT's adapter_config.json `base_model_name_or_path` must refer to the served base model (see
    `identity_matches`; an empty value passes and leaves it to the shape rule). vLLM does not check this at all:
    an adapter of another model with the same layer shapes would load and produce garbage."""
    recorded = str(g.config.get("base_model_name_or_path") or "")
    ok, why = identity_matches(recorded, g.base.identity, g.model_path, g.base.revision)
    if ok:
        return None
    return (f"adapter_config.json says base_model_name_or_path={recorded!r} but this route serves "
            f"{g.base.identity!r} ({why}); serve it on a route of its base model, or retrain it on this one")


def _revision_mismatch(revision: str | None, where: str, served: str | None) -> str | None:
    if not revision or not served or revision == served:
        return None
    return (f"{where} is {revision!r} but the route serves revision {served!r}; pin the same revision on both "
            "or retrain on the served one")


@rule(Reason.BaseModelMismatch)
def declared_base_revision(g: GateInput) -> str | None:
    """When both the Adapter's spec.baseModel.revision and the route's revision are pinned, they must be equal."""
    return _revision_mismatch(g.declared_base_revision, "spec.baseModel.revision", g.base.revision)


@rule(Reason.BaseModelMismatch)
def recorded_base_revision(g: GateInput) -> str | None:
    """When both PEFT's adapter_config.json `revision` and the route's revision are set, they must be equal."""
    return _revision_mismatch(g.config.get("revision"), "adapter_config.json revision", g.base.revision)


@rule(Reason.UnsupportedAdapterFeature)
def unsupported_features(g: GateInput) -> str | None:
    """PEFT LoRA variants vLLM does not implement (vLLM's PEFTHelper._validate_features and validate_legal):
    DoRA (use_dora), trained biases (bias != "none", lora_bias), init_lora_weights that rewrite the base
    weights (PiSSA, OLoRA, CorDA, LoftQ; the plain inits in `_PLAIN_INITS` pass), Activated LoRA
    (alora_invocation_tokens), layer_replication, QALoRA (use_qalora) and block-diagonal LoRA (use_bdlora)."""
    cfg = g.config
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
    if not features:
        return None
    return ("vLLM cannot serve " + ", ".join(features) + "; retrain as a plain LoRA adapter (or convert it with "
            "PEFT)")


def python_backtracking_problem(key: str) -> str | None:
    """Why Python's backtracking `re` could take long on pattern key `key` of rank_pattern / alpha_pattern, else
    None. vLLM (vllm/lora/peft_helper.py `_match_pattern`) and PEFT match these keys with `re.match` against every
    adapted module's name when the adapter is loaded, in the engine itself: `(.|.)*x` takes exponential time there
    and stops the replica. RE2 running the gate's own match is not enough, so the key's structure is bounded as
    Python's parser reads it: a repeat (`*`, `+`, `{m,n}`) may only repeat one character or class, never a group,
    an alternation or another repeat, and a key has at most one repeat of more than one (with vLLM's `(.*\\.)?`
    prefix, quadratic in the ~100-character module name)."""
    try:
        from re import _constants as sre_constants, _parser as sre_parse   # Python >= 3.11
    except ImportError:  # pragma: no cover - older Pythons
        import sre_constants  # type: ignore[no-redef]
        import sre_parse  # type: ignore[no-redef]
    try:
        tree = sre_parse.parse(key)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        return f"Python cannot compile it ({exc})"
    repeats = {sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT, getattr(sre_constants, "POSSESSIVE_REPEAT", None)}
    atoms = {sre_constants.LITERAL, sre_constants.NOT_LITERAL, sre_constants.ANY, sre_constants.IN,
             sre_constants.CATEGORY}
    counted = 0

    def walk(items) -> str | None:
        nonlocal counted
        for op, arg in items:
            if op in repeats:
                _, high, body = arg
                if len(body) != 1 or body[0][0] not in atoms:
                    return "it repeats a group, an alternation or a repeat"
                if high > 1:
                    counted += 1
            elif op is sre_constants.SUBPATTERN:
                if (problem := walk(arg[-1])) is not None:
                    return problem
            elif op is sre_constants.BRANCH:
                for branch in arg[1]:
                    if (problem := walk(branch)) is not None:
                        return problem
        return None

    problem = walk(tree)
    if problem is None and counted > 1:
        problem = f"it has {counted} repeats (at most one: a wildcard such as .* once)"
    return problem


def compile_rank_pattern(pattern: dict[str, Any], field: str = "rank_pattern") -> list[tuple[str, Any]]:
    """The keys of a `rank_pattern` (or `alpha_pattern`: `field`) with their RE2 programs for `rank_pattern_key`,
    in PEFT's order. PEFT and vLLM match each key as a Python regex (`re.match(rf"(.*\\.)?({KEY})$", module)`):
    run with Python's backtracking engine on an untrusted key such as `(.|.)*x`, one match takes exponential
    time and holds the GIL. The gate matches with RE2 (linear time, bounded memory) and refuses a key whose
    structure would make vLLM's own match slow (`python_backtracking_problem`). Raises ValueError saying why
    for more than MAX_PATTERN_KEYS keys, a key that is not a string, longer than MAX_PATTERN_CHARS, one RE2
    cannot run (backreferences, lookaround) or one Python would backtrack on."""
    if len(pattern) > MAX_PATTERN_KEYS:
        raise ValueError(f"it has {len(pattern)} keys (at most {MAX_PATTERN_KEYS})")
    out: list[tuple[str, Any]] = []
    for key in pattern:
        if not isinstance(key, str):
            raise ValueError(f"key {key!r} is not a string")
        program, why = _compile_target_pattern(rf"(.*\.)?({key})$")
        if program is None or len(key) > MAX_PATTERN_CHARS:
            why = why or f"it is {len(key)} characters long (at most {MAX_PATTERN_CHARS})"
        else:
            why = python_backtracking_problem(key)
        if why is not None:
            raise ValueError(f"key {key[:80]!r} cannot be checked or matched safely by vLLM: {why}")
        out.append((key, program))
    return out


def rank_pattern_key(pattern: list[tuple[str, Any]], module: str) -> str | None:
    """The `rank_pattern` key that applies to `module` (a full module name), as PEFT picks it
    (peft.utils.other.get_pattern_key): the first key that matches the name's end as a regex
    (`(.*\\.)?(KEY)$`). `pattern`: `compile_rank_pattern`'s programs. None: `r` applies."""
    for key, program in pattern:
        if program.match(module):
            return key
    return None


@rule(Reason.InvalidAdapter)
def config_rank_matches_tensors(g: GateInput) -> str | None:
    """adapter_config.json's `r` (and the `rank_pattern` entry of a module, when one matches it) must be the rank
    of that module's tensors: lora_A is (r, in_features) and lora_B (out_features, r) (lora_embedding_A (r,
    vocab), lora_embedding_B (hidden, r)), and a module has both. PEFT refuses to load an adapter whose
    tensors disagree with its config (size mismatch); vLLM loads it but scales by lora_alpha / r with the
    wrong r (and sizes buffers by it)."""
    r = _int(g.config.get("r"))
    if r is None or r <= 0:
        return (f"adapter_config.json's r is {g.config.get('r')!r}; it must be the adapters' rank, a positive "
                "integer. Re-save the adapter with PEFT")
    pattern = g.config.get("rank_pattern") or {}
    if not isinstance(pattern, dict) or any(_int(v) is None or v <= 0 for v in pattern.values()):
        return (f"adapter_config.json's rank_pattern is {pattern!r}; it must map module name patterns to positive "
                "integer ranks. Re-save the adapter with PEFT")
    alpha = g.config.get("alpha_pattern") or {}
    if not isinstance(alpha, dict):
        return (f"adapter_config.json's alpha_pattern is {str(alpha)[:80]!r}; it must map module name patterns to "
                "alphas. Re-save the adapter with PEFT")
    pairs = (len(pattern) + len(alpha)) * len(g.lora_modules)
    if pairs > MAX_PATTERN_MATCHES:
        return (f"adapter_config.json's rank_pattern and alpha_pattern have {len(pattern) + len(alpha)} keys for "
                f"{len(g.lora_modules)} adapted modules: {pairs} regex matches when the adapter loads (at most "
                f"{MAX_PATTERN_MATCHES}); use fewer keys (one regular expression can cover many modules)")
    programs: list[tuple[str, Any]] = []
    for which, value in (("rank_pattern", pattern), ("alpha_pattern", alpha)):   # vLLM matches both alike
        try:
            compiled = compile_rank_pattern(value, which)
        except ValueError as exc:
            return (f"adapter_config.json's {which} {exc}; write its keys as module names or plain regular "
                    "expressions (no backreferences, lookaround or repeated groups; one wildcard at most), or "
                    "list the modules")
        programs = compiled if which == "rank_pattern" else programs
    problems = []
    for module, shapes in sorted(g.lora_modules.items()):
        a_kind, b_kind = (("lora_embedding_A", "lora_embedding_B") if "lora_embedding_A" in shapes
                          or "lora_embedding_B" in shapes else ("lora_A", "lora_B"))
        a, b = shapes.get(a_kind), shapes.get(b_kind)
        if a is None or b is None:
            problems.append(f"{module} has {a_kind if a is not None else b_kind} without "
                            f"{b_kind if a is not None else a_kind}")
            continue
        if len(a) != 2 or len(b) != 2:
            problems.append(f"{module}: {a_kind} {list(a)} and {b_kind} {list(b)} must be matrices")
            continue
        key = rank_pattern_key(programs, module)
        want = pattern[key] if key is not None else r
        where = f"rank_pattern[{key!r}]" if key is not None else "r"
        if a[0] != b[1]:
            problems.append(f"{module}: {a_kind} {list(a)} and {b_kind} {list(b)} disagree on the rank")
        elif a[0] != want:
            problems.append(f"{module}: {where} is {want} but its {a_kind} is {list(a)} and {b_kind} {list(b)} "
                            f"(rank {a[0]})")
    if not problems:
        return None
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return (f"adapter_config.json disagrees with adapter_model's tensors: {'; '.join(problems[:3])}{more}. PEFT "
            "refuses such an adapter and vLLM would scale it wrongly: re-save it with PEFT (save_pretrained) "
            "instead of editing adapter_config.json")


@rule(Reason.NonFiniteWeights)
def finite_weights(g: GateInput) -> str | None:
    """No adapter tensor may hold NaN or Inf (found by `scan_nonfinite`, cost bounded by SCAN_BYTES): vLLM
    would load it, and every output through it is garbage (or its JSON answer fails: "Out of range float
    values are not JSON compliant"). This is what a diverged training (loss NaN) or an fp16 overflow saves."""
    bad = g.adapter.nonfinite
    if not bad:
        return None
    listed = ", ".join(f"{name} ({n} values)" for name, n in sorted(bad.items())[:3])
    more = f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""
    return (f"adapter tensors hold NaN or Inf values: {listed}{more}. Training diverged or float16 overflowed; "
            "retrain (lower learning rate, bfloat16) from a checkpoint saved while the loss was finite")


@rule(Reason.RankTooLarge)
def rank_within_limit(g: GateInput) -> str | None:
    """The adapter's rank (max of `r`, `rank_pattern` and the lora_A tensors' first dimension) must not exceed
    the engine's --max-lora-rank (spec.engine.maxLoraRank): vLLM sizes its LoRA buffers by it and refuses a
    larger rank ("LoRA rank R is greater than max_lora_rank M")."""
    if g.rank <= g.max_lora_rank:
        return None
    return (f"the adapter's rank is {g.rank} but the route's engine.maxLoraRank is {g.max_lora_rank}; raise "
            f"spec.engine.maxLoraRank to at least {g.rank} or retrain with r <= {g.max_lora_rank}")


@rule(Reason.RankMismatch)
def declared_rank(g: GateInput) -> str | None:
    """An Adapter's spec.rank, when set, must equal the artifact's rank (the route's rank limit trusts it)."""
    if g.declared_rank is None or g.declared_rank == g.rank:
        return None
    return (f"spec.rank declares {g.declared_rank} but the artifact's rank is {g.rank}; correct spec.rank "
            "(or remove it)")


@rule(Reason.UnsupportedModulesToSave)
def only_lora_weights(g: GateInput) -> str | None:
    """The adapter must carry only LoRA factors: vLLM accepts modules_to_save only as a classification head
    (["classifier", "score"]) and refuses other whole-module weights (an lm_head, resized embeddings)."""
    saved = [m for m in (g.config.get("modules_to_save") or []) if m not in SUPPORTED_MODULES_TO_SAVE]
    full = [n for n in g.adapter.full_tensors()
            if not any(f".{m}." in f".{n}" for m in SUPPORTED_MODULES_TO_SAVE)]
    if not saved and not full:
        return None
    what = f"modules_to_save={saved}" if saved else f"full weights {sorted(full)[:4]}"
    return (f"the adapter carries whole-module weights ({what}, e.g. resized embeddings or an lm_head); vLLM "
            "applies only LoRA factors. Retrain without modules_to_save and without adding tokens")


@rule(Reason.UnsupportedDtype)
def float_dtypes(g: GateInput) -> str | None:
    """Every adapter tensor must be a float (safetensors F16, BF16, F32, F64): vLLM casts the LoRA factors to
    its lora dtype; integer or packed (quantized) factors are not weights it can apply."""
    bad_dtypes = sorted({dt for _, dt in g.adapter.tensors.values() if dt not in _FLOAT_DTYPES})
    if not bad_dtypes:
        return None
    return (f"adapter tensors are stored as {bad_dtypes}; vLLM needs float16, bfloat16 or float32 LoRA weights. "
            "Save the adapter unquantized (QLoRA adapters are saved in full precision by PEFT)")


@rule(Reason.UnsupportedQuantization)
def base_quantization(g: GateInput) -> str | None:
    """A quantized base model (config.json quantization_config.quant_method) must use a method vLLM combines
    with LoRA (`LORA_QUANTIZATIONS`)."""
    quant = (g.base.config.get("quantization_config") or {}).get("quant_method")
    if not quant or str(quant).lower() in LORA_QUANTIZATIONS:
        return None
    return (f"the base model is quantized with {quant!r}, which vLLM does not combine with LoRA; serve an "
            "unquantized or a supported (awq, gptq, bitsandbytes, fp8) checkpoint")


@rule(Reason.InvalidTargetModules)
def target_modules_pattern(g: GateInput) -> str | None:
    """target_modules is a list of at most MAX_TARGET_MODULES module names (strings), or one string: a regular
    expression PEFT full-matches against every module name
    (`re.fullmatch`). The gate matches it with RE2 (linear time, so a backtracking pattern cannot hold the
    loader for minutes); a pattern RE2 cannot run (backreferences, lookaround) or longer than
    MAX_PATTERN_CHARS is refused rather than run with Python's backtracking engine."""
    targets = g.config.get("target_modules")
    if isinstance(targets, list) or targets is None:
        return _target_list_problem(targets)
    if not isinstance(targets, str):
        return (f"target_modules must be a list of module names or one regular expression, not "
                f"{type(targets).__name__}; save the adapter with PEFT")
    if targets == "all-linear":
        return None
    _, why = _compile_target_pattern(targets)
    return None if why is None else (f"target_modules {targets[:80]!r} cannot be checked: {why}; write it as a "
                                     "list of module names or a plain regular expression (no backreferences "
                                     "or lookaround)")


@rule(Reason.TargetModulesNotFound)
def target_modules_exist(g: GateInput) -> str | None:
    """PEFT's target_modules (names matched as suffixes, or one regex matched against full names) and every
    module the adapter has LoRA factors for must exist in the base model's weights (vLLM refuses modules it
    does not expect: "expected target modules in … but received …"). Skipped when the base model's files are
    not readable."""
    modules = g.base_modules
    if not modules:
        return None
    missing_targets = _target_patterns_missing(g.config.get("target_modules"), set(modules))
    missing_modules = sorted(m for m in g.lora_modules if m not in modules)
    if not missing_targets and not missing_modules:
        return None
    names = missing_targets or missing_modules[:4]
    return (f"target modules {names} do not exist in the base model ({g.base.identity}); retrain with "
            f"target_modules naming its layers, e.g. {_example_targets(modules)}")


@rule(Reason.BaseModelMismatch)
def matrices_fit_base(g: GateInput) -> str | None:
    """Every LoRA matrix must fit the base weight it adapts: lora_A is (r, in_features), lora_B is
    (out_features, r) of a (out, in) Linear weight; for embeddings lora_embedding_A is (r, vocab). This catches
    an adapter of another model whose recorded name matches. Skipped when the base model's files are not
    readable (or a weight's shape is unknown)."""
    modules = g.base_modules
    if not modules:
        return None
    mismatched = []
    for mod, shapes in g.lora_modules.items():
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
    if not mismatched:
        return None
    return (f"LoRA matrices do not fit the base model's layers: {mismatched[:3]}; the adapter was trained on a "
            "different model (or resized embeddings)")


# The chain, in the order failures are reported.
RULES: tuple[Rule, ...] = (
    adapter_type, declared_base_model, recorded_base_model, declared_base_revision, recorded_base_revision,
    unsupported_features, config_rank_matches_tensors, finite_weights, rank_within_limit, declared_rank,
    only_lora_weights, float_dtypes, base_quantization, target_modules_pattern, target_modules_exist,
    matrices_fit_base,
)


def check(adapter: AdapterFacts, base: BaseFacts, *, max_lora_rank: int, declared_base: str | None = None,
          declared_base_revision: str | None = None, declared_rank: int | None = None,
          model_path: str | None = None) -> list[GateFailure]:
    """Every rule in `RULES` the adapter breaks for this served base model, in chain order (empty: compatible).

    Runs each rule on the same `GateInput`; a violated `final` rule ends the chain.
    """
    subject = GateInput(adapter, base, max_lora_rank, declared_base, declared_base_revision, declared_rank,
                        model_path)
    failures: list[GateFailure] = []
    for r in RULES:
        try:
            failure = r(subject)
        except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError) as exc:
            # adapter_config.json is untrusted JSON: a field of the wrong type ("r": {}, "rank_pattern": 1) is
            # the adapter's fault, reported with the rule that could not read it, never a retried InternalError.
            # The rules after it would read the same field: the chain ends here.
            failures.append(GateFailure(Reason.InvalidAdapter, f"adapter_config.json cannot be checked by rule "
                                        f"{r.__name__}: a field has the wrong type or value ({type(exc).__name__}: "
                                        f"{redacted(str(exc), 200)}); save the adapter with PEFT's save_pretrained"))
            break
        if failure is not None:
            failures.append(failure)
            if r.final:
                break
    return failures


def _target_list_problem(targets: list | None) -> str | None:
    """Why a list target_modules cannot be checked (None: it can): too long, or an entry not a string."""
    if targets is None:
        return None
    if len(targets) > MAX_TARGET_MODULES:
        return (f"target_modules lists {len(targets)} names (at most {MAX_TARGET_MODULES}); list the base "
                "model's layer names, e.g. q_proj, v_proj")
    bad = [t for t in targets if not isinstance(t, str)][:1]
    if bad:
        bad = bad[0]
        return (f"target_modules entries must be module names (strings), not {type(bad).__name__} "
                f"{str(bad)[:40]!r}; save the adapter with PEFT")
    return None


def _target_patterns_missing(targets: Any, modules: set[str]) -> list[str]:
    """The target_modules entries no module of the base model matches (PEFT: a list names modules by suffix at
    a dot, `m == t or m.endswith("." + t)`; a string is a regex full-matched). Linear in targets plus modules x
    name depth (one set of every dot-suffix); a target_modules that target_modules_pattern refuses gives []."""
    if targets in (None, "all-linear", ["all-linear"]):
        return []
    if isinstance(targets, str):   # peft: a regex matched against the full module name
        pattern, _ = _compile_target_pattern(targets)
        if pattern is None:
            return []   # target_modules_pattern reports it
        return [] if any(pattern.fullmatch(m) for m in modules) else [targets]
    if not isinstance(targets, list) or _target_list_problem(targets):
        return []   # target_modules_pattern reports it
    suffixes = set()
    for m in modules:
        parts = m.split(".")
        suffixes.update(".".join(parts[i:]) for i in range(len(parts)))
    return [t for t in targets if t not in suffixes]


def _example_targets(modules: dict[str, Any]) -> str:
    leaves = sorted({m.rsplit(".", 1)[-1] for m, s in modules.items() if s is None or len(s) == 2}
                    - {"embed_tokens", "lm_head", "norm"})
    return str(leaves[:8])


def _compile_target_pattern(pattern: str) -> tuple[Any, str | None]:
    """(compiled RE2 pattern, None) or (None, why it is refused). RE2 runs in time linear in the input and
    refuses what needs backtracking; its program size is bounded (max_mem) so a pattern cannot blow up memory."""
    if len(pattern) > MAX_PATTERN_CHARS:
        return None, f"it is {len(pattern)} characters long (at most {MAX_PATTERN_CHARS})"
    try:
        return compile_re2(pattern), None
    except ValueError as exc:
        return None, str(exc)
