"""Hostile adapter files against the gate's readers (attack round on the loader's untrusted input): every file
the gate cannot read or that vLLM's safetensors could not open is refused as InvalidAdapter with a message naming
the file and the fix, never an exception the loader reports as a retried InternalError, and no adapter-controlled
text makes the gate (or the message it produces) take time quadratic in its size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from support.adapters import write_adapter
from loraplane.api.reasons import Reason
from loraplane.loader import gate

OPERATOR_DIR = str(Path(gate.__file__).resolve().parents[2])
F16_2x2 = {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]}


def _write_safetensors(path: Path, header: dict | bytes, data: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


# name -> (header, data section): each one the safetensors library refuses to open (so vLLM cannot load it)
HOSTILE_HEADERS = {
    "dtype lie (F16 2x2 in 4 bytes)": ({"a": {**F16_2x2, "data_offsets": [0, 4]}}, b"\0" * 4),
    "overlapping tensors": ({"a": F16_2x2, "b": F16_2x2}, b"\0" * 8),
    "gap between tensors": ({"a": F16_2x2, "b": {**F16_2x2, "data_offsets": [16, 24]}}, b"\0" * 24),
    "bytes after the last tensor": ({"a": F16_2x2}, b"\0" * 12),
    "shape product overflows": ({"a": {**F16_2x2, "shape": [2 ** 40, 2 ** 40]}}, b"\0" * 8),
    "negative dimension": ({"a": {**F16_2x2, "shape": [-2, -2]}}, b"\0" * 8),
    "float dimension": ({"a": {**F16_2x2, "shape": [2.0, 2]}}, b"\0" * 8),
    "bool dimension": ({"a": {**F16_2x2, "shape": [True, 4]}}, b"\0" * 8),
    "infinite dimension": (b'{"a": {"dtype": "F16", "shape": [1e400, 2], "data_offsets": [0, 8]}}', b"\0" * 8),
    "infinite offset": (b'{"a": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 1e400]}}', b"\0" * 8),
    "entry not an object": ({"a": [1, 2]}, b""),
    "deeply nested header": (b"[" * 100_000 + b"]" * 100_000, b""),
    "dimension beyond usize": ({"a": {**F16_2x2, "shape": [2 ** 64, 0]}}, b""),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_a_safetensors_header_vllm_could_not_open_is_an_invalid_adapter(tmp_path, case):
    """The gate read only each entry's shape (int() of anything) and dtype: a file whose offsets overlap, leave
    gaps, disagree with its shape and dtype, or whose shape overflows passed the gate and failed in vLLM (a
    LoadFailed retried five times); 1e400 or a deeply nested header raised OverflowError / RecursionError
    (no ValueError: an InternalError, retried). Now the header is checked as safetensors checks it."""
    from safetensors import safe_open

    d = write_adapter(tmp_path / "a")
    path = d / "adapter_model.safetensors"
    _write_safetensors(path, *HOSTILE_HEADERS[case])
    with pytest.raises(Exception):   # the premise: the library vLLM loads adapters with refuses this file
        with safe_open(str(path), "np") as fh:
            list(fh.keys())
    with pytest.raises(gate.GateError) as info:
        gate.read_adapter(d)
    assert info.value.reason is Reason.InvalidAdapter
    assert "adapter_model.safetensors" in str(info.value)


def test_a_shape_of_many_huge_dimensions_is_refused_in_linear_time():
    """The shape's product was Python's unbounded int: 400,000 dimensions of 2**62 (8 MB, within the header limit)
    took minutes to multiply (quadratic). Now the product stops where safetensors' usize checked_mul overflows."""
    code = ("import json, pathlib, tempfile; from loraplane.loader import gate; "
            "d = pathlib.Path(tempfile.mkdtemp()); (d / 'adapter_config.json').write_text('{}'); "
            "h = json.dumps({'a': {'dtype': 'F16', 'shape': [2 ** 62] * 390_000, 'data_offsets': [0, 8]}}).encode(); "
            "(d / 'adapter_model.safetensors').write_bytes(len(h).to_bytes(8, 'little') + h + bytes(8)); "
            "exec('try: gate.read_adapter(d)\\nexcept gate.GateError as e: print(e.reason)')")
    assert _bounded(code) == "InvalidAdapter"


def test_well_formed_headers_still_pass(tmp_path):
    d = write_adapter(tmp_path / "a")
    assert gate.read_adapter(d).tensors   # written by safetensors itself
    # zero-sized, scalar and unknown-dtype tensors are valid safetensors (the float_dtypes rule judges dtypes)
    _write_safetensors(d / "adapter_model.safetensors",
                       {"a": {"dtype": "F16", "shape": [0, 2], "data_offsets": [0, 0]},
                        "b": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
                        "c": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [4, 6]},
                        "d": {"dtype": "F16", "shape": [2 ** 63, 0], "data_offsets": [6, 6]},   # no overflow
                        "__metadata__": {"format": "pt"}}, b"\0" * 6)
    assert gate.read_adapter(d).tensors == {"a": ((0, 2), "F16"), "b": ((), "F32"), "c": ((2,), "F8_E4M3"),
                                            "d": ((2 ** 63, 0), "F16")}


@pytest.mark.parametrize("config", [b"[" * 100_000 + b"]" * 100_000, b'{"r": ' + b"9" * 5000 + b"}",
                                    b'{"r": 8, "x": "\xff"}'], ids=["deep", "huge-int", "not-utf8"])
def test_an_adapter_config_python_cannot_parse_is_an_invalid_adapter(tmp_path, config):
    """A deeply nested adapter_config.json raised RecursionError out of read_adapter (no ValueError: the loader's
    gate step did not catch it, InternalError, retried)."""
    d = write_adapter(tmp_path / "a")
    (d / "adapter_config.json").write_bytes(config)
    with pytest.raises(gate.GateError) as info:
        gate.read_adapter(d)
    assert info.value.reason is Reason.InvalidAdapter and "adapter_config.json" in str(info.value)


def test_a_pickled_adapter_that_is_not_a_state_dict_is_an_invalid_adapter(tmp_path):
    torch = pytest.importorskip("torch")
    d = write_adapter(tmp_path / "a")
    (d / "adapter_model.safetensors").unlink()
    for content in (b"not a pickle", None):
        if content is None:
            torch.save([torch.zeros(2)], d / "adapter_model.bin")   # loads, but is a list
        else:
            (d / "adapter_model.bin").write_bytes(content)
        with pytest.raises(gate.GateError) as info:
            gate.read_adapter(d)
        assert info.value.reason is Reason.InvalidAdapter and "adapter_model.bin" in str(info.value)


def test_a_pickled_adapter_that_would_inflate_in_memory_is_refused_before_loading(tmp_path, monkeypatch):
    """adapter_model.bin went straight to torch.load, which inflates deflated zip members: a 4 KB file whose
    member is a deflated tensor of zeros loads as 4 MB (200 KB -> 200 MB measured; within the 8 GiB artifact
    limit, terabytes: the loader is OOM-killed). torch.save stores members uncompressed, so only such files
    are read now; the legacy pre-zip pickle (which allocates the sizes its header claims) is refused too."""
    import zipfile

    torch = pytest.importorskip("torch")
    d = write_adapter(tmp_path / "a")
    (d / "adapter_model.safetensors").unlink()
    plain = d / "adapter_model.bin"
    torch.save({"base_model.model.x.lora_A.weight": torch.zeros(1_000_000)}, plain)
    assert gate.read_adapter(d).tensors   # what torch.save writes is still read
    bomb = tmp_path / "bomb.bin"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for name in src.namelist():
            out.writestr(name, src.read(name))
    assert bomb.stat().st_size < 50_000 < 4_000_000 <= sum(i.file_size for i in zipfile.ZipFile(bomb).infolist())
    bomb.replace(plain)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load read an inflating archive"))
    with pytest.raises(gate.GateError, match="is compressed") as info:
        gate.read_adapter(d)
    assert info.value.reason is Reason.InvalidAdapter
    monkeypatch.undo()
    torch.save({"x": torch.zeros(4)}, plain, _use_new_zipfile_serialization=False)
    with pytest.raises(gate.GateError, match="not a torch.save archive"):
        gate.read_adapter(d)


def _moe_facts(modules: int, keys: int) -> gate.AdapterFacts:
    """A rank-8 adapter of `modules` q_proj modules whose rank_pattern has `keys` keys matching none of them."""
    tensors = {}
    for i in range(modules):
        prefix = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = ((8, 4), "F16")
        tensors[f"{prefix}.lora_B.weight"] = ((4, 8), "F16")
    return gate.AdapterFacts({"r": 8, "rank_pattern": {f"expert\\.{k}\\.w1": 8 for k in range(keys)}}, tensors)


def test_rank_pattern_keys_times_modules_is_bounded():
    """Every rank_pattern / alpha_pattern key is matched against every adapted module, by the gate and again by
    vLLM when the adapter loads: 512 keys over 38,000 modules (within the key and header limits) held the gate
    ~30 s and then the engine as long. Now (keys x modules) is at most MAX_PATTERN_MATCHES."""
    import time

    base = gate.BaseFacts("x", None, None)
    started = time.monotonic()
    hostile = gate.check(_moe_facts(4_000, 512), base, max_lora_rank=8)
    assert time.monotonic() - started < 1.0, "matched 2,048,000 (key, module) pairs"
    assert [f.reason for f in hostile] == [Reason.InvalidAdapter]
    assert "rank_pattern" in hostile[0].message and str(gate.MAX_PATTERN_MATCHES) in hostile[0].message
    assert gate.check(_moe_facts(4_000, 20), base, max_lora_rank=8) == []   # a large honest adapter passes


def _bounded(code: str, timeout: float = 20) -> str:
    """Run `code` in a fresh interpreter; fail when it takes longer than `timeout` seconds."""
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                              env={"PYTHONPATH": OPERATOR_DIR})
    except subprocess.TimeoutExpired:
        pytest.fail(f"took over {timeout}s: time superlinear in an adapter-controlled value")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_long_recorded_base_model_path_is_matched_in_linear_time():
    """peft's base_model_name_or_path (up to MAX_CONFIG_BYTES) was searched with a regex for a Hugging Face cache
    snapshot that backtracks quadratically: `models--a` + `--` * 200,000 held the gate (and the GIL, so the
    loader's event loop) for minutes. Now it is parsed by path components."""
    code = ("from loraplane.loader import gate; "
            "rec = 'models--a' + '--' * 200_000 + '/snapshots/'; "
            "print(gate.identity_matches(rec, 'meta-llama/Llama-3.1-8B', None)[0])")
    assert _bounded(code) == "False"
    # What the regex found, the parser finds
    assert gate.hf_snapshot("/root/.cache/huggingface/hub/models--meta-llama--Llama-3.1-8B/snapshots/abc/") == (
        "meta-llama/Llama-3.1-8B", "abc")
    assert gate.hf_snapshot("x/models--org--name--more/snapshots/r") == ("org/name--more", "r")
    for path in ("models--org/snapshots/r", "models--org--name/snapshots/", "models--org--name/refs/r", ""):
        assert gate.hf_snapshot(path) is None, path
