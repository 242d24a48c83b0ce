"""The compatibility gate's rules, on hand-made adapters against the real tiny model's files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from support.adapters import write_adapter
from loraplane.api.reasons import Reason
from loraplane.loader import gate

IDENTITY = "loraplane/tiny-llama"


@pytest.fixture(scope="module")
def base(tiny_model_dir) -> gate.BaseFacts:
    return gate.read_base(IDENTITY, None, tiny_model_dir)


def reasons(adapter_dir, base, **kw) -> list[str]:
    kw.setdefault("max_lora_rank", 16)
    return [f.reason for f in gate.check(gate.read_adapter(adapter_dir), base, **kw)]


def test_base_facts_come_from_the_weight_files(base):
    modules = base.modules()
    assert modules["model.layers.0.self_attn.q_proj"] == (128, 128)
    assert modules["model.layers.1.self_attn.v_proj"] == (64, 128)
    assert base.config["model_type"] == "llama"


def test_compatible_adapter_passes(tmp_path, base, tiny_model_dir):
    assert reasons(write_adapter(tmp_path / "ok"), base) == []
    # peft records the local path the trainer loaded the model from: the served directory itself matches
    assert reasons(write_adapter(tmp_path / "local", base=str(tiny_model_dir)), base,
                   model_path=str(tiny_model_dir)) == []


def test_rank_above_engine_limit(tmp_path, base):
    failures = gate.check(gate.read_adapter(write_adapter(tmp_path / "r32", r=32)), base, max_lora_rank=16)
    assert [f.reason for f in failures] == ["RankTooLarge"]
    assert "maxLoraRank" in failures[0].message and "32" in failures[0].message
    # rank_pattern raises the effective rank of some modules
    wide = write_adapter(tmp_path / "pattern", r=8, extra_config={"rank_pattern": {"v_proj": 64}})
    assert "RankTooLarge" in reasons(wide, base)


def test_declared_rank_must_match_artifact(tmp_path, base):
    assert reasons(write_adapter(tmp_path / "a", r=8), base, declared_rank=4) == ["RankMismatch"]


def test_wrong_base_model_by_name(tmp_path, base):
    other = write_adapter(tmp_path / "other", base="meta-llama/Llama-3.1-8B")
    assert reasons(other, base) == ["BaseModelMismatch"]
    assert reasons(write_adapter(tmp_path / "declared"), base, declared_base="Qwen/Qwen2-0.5B") == ["BaseModelMismatch"]


def test_wrong_base_model_by_shapes_even_with_a_matching_name(tmp_path, base):
    # Same recorded name, but trained on a model with hidden size 64: the matrices cannot fit.
    failures = gate.check(gate.read_adapter(write_adapter(tmp_path / "small", hidden=64)), base, max_lora_rank=16)
    assert [f.reason for f in failures] == ["BaseModelMismatch"]
    assert "do not fit" in failures[0].message


def test_target_modules_absent(tmp_path, base):
    bad = write_adapter(tmp_path / "w", targets=("q_proj",), extra_config={"target_modules": ["q_proj", "c_attn"]})
    failures = gate.check(gate.read_adapter(bad), base, max_lora_rank=16)
    assert [f.reason for f in failures] == ["TargetModulesNotFound"]
    assert "c_attn" in failures[0].message and "q_proj" in failures[0].message  # names the fix's candidates
    # a regex target that matches nothing
    rx = write_adapter(tmp_path / "rx", extra_config={"target_modules": r".*\.attn\.c_proj"})
    assert "TargetModulesNotFound" in reasons(rx, base)


def test_modules_to_save_and_resized_embeddings_are_refused(tmp_path, base):
    saved = write_adapter(tmp_path / "s", extra_config={"modules_to_save": ["lm_head"]},
                          extra_tensors={"base_model.model.lm_head.modules_to_save.default.weight":
                                         np.zeros((500, 128), np.float32)})
    assert reasons(saved, base) == ["UnsupportedModulesToSave"]
    resized = write_adapter(tmp_path / "e", extra_tensors={"base_model.model.model.embed_tokens.weight":
                                                           np.zeros((500, 128), np.float32)})
    assert reasons(resized, base) == ["UnsupportedModulesToSave"]


def test_unsupported_features_dtypes_and_quantization(tmp_path, base):
    assert reasons(write_adapter(tmp_path / "dora", extra_config={"use_dora": True}), base) == \
        ["UnsupportedAdapterFeature"]
    assert reasons(write_adapter(tmp_path / "pissa", extra_config={"init_lora_weights": "pissa"}), base) == \
        ["UnsupportedAdapterFeature"]
    assert reasons(write_adapter(tmp_path / "int8", dtype=np.int8), base) == ["UnsupportedDtype"]
    assert reasons(write_adapter(tmp_path / "ia3", extra_config={"peft_type": "IA3"}), base) == \
        ["UnsupportedAdapterType"]
    quantized = gate.BaseFacts(IDENTITY, None, base.path, {"quantization_config": {"quant_method": "hqq"}},
                               base.weights)
    assert reasons(write_adapter(tmp_path / "q"), quantized) == ["UnsupportedQuantization"]
    awq = gate.BaseFacts(IDENTITY, None, base.path, {"quantization_config": {"quant_method": "awq"}}, base.weights)
    assert reasons(write_adapter(tmp_path / "q2"), awq) == []


def test_several_rules_are_all_reported(tmp_path, base):
    bad = write_adapter(tmp_path / "bad", r=32, base="meta-llama/Llama-3.1-8B", extra_config={"use_dora": True})
    assert set(reasons(bad, base)) == {"RankTooLarge", "BaseModelMismatch", "UnsupportedAdapterFeature"}


def test_revision_must_match_when_both_pinned(tmp_path):
    facts = gate.BaseFacts(IDENTITY, "a" * 40, None)
    assert reasons(write_adapter(tmp_path / "a"), facts, declared_base_revision="b" * 40) == ["BaseModelMismatch"]
    assert reasons(write_adapter(tmp_path / "b"), facts, declared_base_revision="a" * 40) == []


@pytest.mark.parametrize("recorded,identity,model_path,ok", [
    ("meta-llama/Llama-3.1-8B", "meta-llama/llama-3.1-8b", None, True),
    ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-70B", None, False),
    ("/data/models/Llama-3.1-8B", "meta-llama/Llama-3.1-8B", None, True),
    ("/data/models/Mistral-7B", "meta-llama/Llama-3.1-8B", None, False),
    ("/root/.cache/huggingface/hub/models--meta-llama--Llama-3.1-8B/snapshots/abc", "meta-llama/Llama-3.1-8B",
     None, True),
    ("/root/.cache/huggingface/hub/models--Qwen--Qwen2-7B/snapshots/abc", "meta-llama/Llama-3.1-8B", None, False),
    ("/tmp/x/whatever", "pvc://models/llama", "/tmp/x/whatever", True),
    ("", "meta-llama/Llama-3.1-8B", None, True),   # nothing recorded: only the shapes can tell
])
def test_identity_matching(recorded, identity, model_path, ok):
    assert gate.identity_matches(recorded, identity, model_path)[0] is ok


def _lora_pair(r: int, out: int, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.standard_normal((r, 128)).astype(dtype), rng.standard_normal((out, r)).astype(dtype)


def test_config_rank_must_match_the_tensors(tmp_path, base):
    # adapter_config.json says r=4, the tensors have rank 8: PEFT refuses it, vLLM would scale by alpha/4.
    failures = gate.check(gate.read_adapter(write_adapter(tmp_path / "r", r=8, extra_config={"r": 4})), base,
                          max_lora_rank=16)
    assert [f.reason for f in failures] == [Reason.InvalidAdapter]
    msg = failures[0].message
    assert "model.layers.0.self_attn.q_proj: r is 4 but its lora_A is [8, 128]" in msg and "and 1 more" in msg
    # rank_pattern names the rank of some modules (matched as PEFT does: the end of the module name)
    prefix = "base_model.model.model.layers.{}.self_attn.v_proj"
    four = {f"{prefix.format(layer)}.lora_{k}.weight": t for layer in range(2)
            for k, t in zip("AB", _lora_pair(4, 64))}
    ok = write_adapter(tmp_path / "p", r=8, extra_config={"rank_pattern": {"v_proj": 4}}, extra_tensors=four)
    assert reasons(ok, base) == []
    wrong = write_adapter(tmp_path / "w", r=8, extra_config={"rank_pattern": {"v_proj": 4}})
    failures = gate.check(gate.read_adapter(wrong), base, max_lora_rank=16)
    assert [f.reason for f in failures] == [Reason.InvalidAdapter]
    assert "rank_pattern['v_proj'] is 4 but its lora_A is [8, 128]" in failures[0].message
    # A module with lora_A but no lora_B, a rank the two factors disagree on, an r that is not an integer
    a, _ = _lora_pair(8, 64)
    half = write_adapter(tmp_path / "h", extra_tensors={"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": a})
    assert "has lora_A without lora_B" in gate.check(gate.read_adapter(half), base, max_lora_rank=16)[0].message
    b = _lora_pair(4, 64)[1]
    split = write_adapter(tmp_path / "s", extra_tensors={f"{prefix.format(0)}.lora_B.weight": b})
    assert "disagree on the rank" in gate.check(gate.read_adapter(split), base, max_lora_rank=16)[0].message
    for bad in ("8", None, True, 0):
        assert "InvalidAdapter" in reasons(write_adapter(tmp_path / f"c{bad}", extra_config={"r": bad}), base)
    assert "InvalidAdapter" in reasons(write_adapter(tmp_path / "rx", extra_config={"rank_pattern": {"(": 4}}), base)


def test_nonfinite_weights_are_found_before_loading(tmp_path, base):
    prefix = "base_model.model.model.layers.1.self_attn.q_proj"
    for dtype, value in ((np.float32, np.nan), (np.float16, np.inf), (np.float64, -np.inf)):
        a, b = _lora_pair(8, 128, dtype)
        b[5, 3] = value
        bad = write_adapter(tmp_path / np.dtype(dtype).name, dtype=dtype,
                            extra_tensors={f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b})
        failures = gate.check(gate.read_adapter(bad), base, max_lora_rank=16)
        assert [f.reason for f in failures] == [Reason.NonFiniteWeights], dtype
        assert f"{prefix}.lora_B.weight (1 values)" in failures[0].message
    # bfloat16 (numpy has no such dtype: the scan reads its bits)
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    d = write_adapter(tmp_path / "bf16")
    tensors = {k: torch.tensor(v).to(torch.bfloat16) for k, v in _numpy_tensors(d).items()}
    tensors[f"{prefix}.lora_A.weight"][0, :7] = float("nan")
    save_file(tensors, str(d / "adapter_model.safetensors"))
    assert gate.read_adapter(d).nonfinite == {f"{prefix}.lora_A.weight": 7}
    # huge finite values (the largest bfloat16 below Inf) are not NaN
    tensors[f"{prefix}.lora_A.weight"][0, :7] = 3.3e38
    save_file(tensors, str(d / "adapter_model.safetensors"))
    assert gate.read_adapter(d).nonfinite == {}


def _numpy_tensors(directory) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def test_the_value_scan_is_bounded_and_refuses_corrupt_offsets(tmp_path):
    a, b = _lora_pair(8, 128)
    b[0, 0] = np.nan   # at the start of the tensor: a sampled scan still reads it
    d = write_adapter(tmp_path / "a", extra_tensors={"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": b})
    found, scanned = gate.scan_nonfinite(d / "adapter_model.safetensors", budget=4096)
    assert found == {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": 1}
    assert scanned.startswith("sampled: the first 4096 bytes of each of 8 tensors")
    assert gate.scan_nonfinite(d / "adapter_model.safetensors")[1] == "all"
    assert gate.read_adapter(d, scan_bytes=0).nonfinite == {}
    path = d / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])   # truncated: the last tensor's bytes are missing
    with pytest.raises(ValueError, match="truncated or corrupt"):
        gate.read_adapter(d)


def test_unreadable_adapters_are_reported_not_raised(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="adapter_config.json"):
        gate.read_adapter(tmp_path / "empty")
    (tmp_path / "empty" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        gate.read_adapter(tmp_path / "empty")


# ---- each rule on its own: a passing and a violating input, built in memory ----------------------------------
def _facts(*, config: dict | None = None, tensors: dict | None = None, base_config: dict | None = None,
           weights: dict | None = None, revision: str | None = None, nonfinite: dict | None = None,
           **kw) -> gate.GateInput:
    """A GateInput for a compatible rank-8 q/v adapter of the tiny model, with the given parts replaced."""
    lora = {}
    for layer in range(2):
        for t, out in (("q_proj", 128), ("v_proj", 64)):
            lora[f"base_model.model.model.layers.{layer}.self_attn.{t}.lora_A.weight"] = ((8, 128), "F32")
            lora[f"base_model.model.model.layers.{layer}.self_attn.{t}.lora_B.weight"] = ((out, 8), "F32")
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
           "base_model_name_or_path": IDENTITY, "bias": "none"}
    base_weights = {f"model.layers.{layer}.self_attn.{t}.weight": (out, 128)
                    for layer in range(2) for t, out in (("q_proj", 128), ("k_proj", 64), ("v_proj", 64))}
    adapter = gate.AdapterFacts({**cfg, **(config or {})}, {**lora, **(tensors or {})}, nonfinite or {}, "all")
    base = gate.BaseFacts(IDENTITY, revision, None, base_config or {}, base_weights if weights is None else weights)
    kw.setdefault("max_lora_rank", 16)
    return gate.GateInput(adapter, base, **kw)


# rule -> (a passing input, a violating input)
RULE_CASES = {
    gate.adapter_type: (_facts(config={"peft_type": "lora"}), _facts(config={"peft_type": "IA3"})),
    gate.declared_base_model: (_facts(declared_base="LoRAPlane/Tiny-Llama"), _facts(declared_base="Qwen/Qwen2-0.5B")),
    gate.recorded_base_model: (_facts(config={"base_model_name_or_path": "/models/tiny-llama"}),
                               _facts(config={"base_model_name_or_path": "meta-llama/Llama-3.1-8B"})),
    gate.declared_base_revision: (_facts(revision="a" * 40, declared_base_revision="a" * 40),
                                  _facts(revision="a" * 40, declared_base_revision="b" * 40)),
    gate.recorded_base_revision: (_facts(config={"revision": "b" * 40}),   # the route pins none: nothing to compare
                                  _facts(revision="a" * 40, config={"revision": "b" * 40})),
    gate.unsupported_features: (_facts(config={"init_lora_weights": "gaussian", "use_rslora": True}),
                                _facts(config={"use_dora": True})),
    gate.config_rank_matches_tensors: (_facts(config={"rank_pattern": {r"layers\.1\..*v_proj": 8}}),
                                       _facts(config={"r": 4})),
    gate.finite_weights: (_facts(), _facts(nonfinite={"base_model.model.model.layers.0.self_attn.q_proj.lora_B"
                                                      ".weight": 3})),
    gate.rank_within_limit: (_facts(max_lora_rank=8), _facts(config={"rank_pattern": {"v_proj": 32}})),
    gate.declared_rank: (_facts(declared_rank=8), _facts(declared_rank=16)),
    gate.only_lora_weights: (_facts(config={"modules_to_save": ["score"]},
                                    tensors={"base_model.model.score.modules_to_save.default.weight":
                                             ((2, 128), "F32")}),
                             _facts(tensors={"base_model.model.model.embed_tokens.weight": ((500, 128), "F32")})),
    gate.float_dtypes: (_facts(tensors={"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                                        ((8, 128), "BF16")}),
                        _facts(tensors={"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                                        ((8, 128), "I8")})),
    gate.base_quantization: (_facts(base_config={"quantization_config": {"quant_method": "GPTQ"}}),
                             _facts(base_config={"quantization_config": {"quant_method": "hqq"}})),
    gate.target_modules_pattern: (_facts(config={"target_modules": r".*\.(q|v)_proj"}),
                                  _facts(config={"target_modules": r"(.*)\1"})),
    gate.target_modules_exist: (_facts(config={"target_modules": r".*\.(q|v)_proj"}, weights={}),   # unknown base
                                _facts(config={"target_modules": ["q_proj", "c_attn"]})),
    gate.matrices_fit_base: (_facts(weights={f"model.layers.{layer}.self_attn.{t}.weight": None   # shapes unknown
                                             for layer in range(2) for t in ("q_proj", "v_proj")}),
                             _facts(tensors={"base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight":
                                             ((32, 8), "F32")})),
}


def test_every_rule_has_a_case_a_reason_and_a_docstring():
    assert set(RULE_CASES) == set(gate.RULES)
    for rule in gate.RULES:
        assert isinstance(rule.reason, Reason) and rule.__doc__ and rule.__name__ != "make"


@pytest.mark.parametrize("rule", list(RULE_CASES), ids=lambda r: r.__name__)
def test_rule_passes_and_violates(rule):
    passing, violating = RULE_CASES[rule]
    assert rule(passing) is None
    failure = rule(violating)
    assert failure is not None and failure.reason is rule.reason and failure.message
    assert gate.check(passing.adapter, passing.base, **_check_kwargs(passing)) == []


def _check_kwargs(g: gate.GateInput) -> dict:
    return {"max_lora_rank": g.max_lora_rank, "declared_base": g.declared_base,
            "declared_base_revision": g.declared_base_revision, "declared_rank": g.declared_rank,
            "model_path": g.model_path}


def test_the_chain_stops_at_a_final_rule():
    ia3 = _facts(config={"peft_type": "IA3", "use_dora": True}, max_lora_rank=4)
    assert [f.reason for f in gate.check(ia3.adapter, ia3.base, **_check_kwargs(ia3))] == \
        [Reason.UnsupportedAdapterType]


# ---- hostile adapters (issue 12, item 4): refused promptly with a named reason, never run or read in full ----
def test_safetensors_header_length_is_capped_before_reading(tmp_path):
    # The length field says 100 MB (the format's own limit): the gate must refuse it without reading 100 MB.
    d = write_adapter(tmp_path / "big")
    st = d / "adapter_model.safetensors"
    st.write_bytes((100_000_000).to_bytes(8, "little") + b"{")
    with pytest.raises(gate.GateError) as info:
        gate.read_adapter(d)
    assert info.value.reason is Reason.ArtifactTooLarge and "100000000" in str(info.value)
    # The cap is configurable; a header within it but longer than the file is not safetensors.
    with pytest.raises(gate.GateError) as info:
        gate.read_adapter(d, max_header_bytes=200_000_000)
    assert info.value.reason is Reason.InvalidAdapter
    # A header that is JSON but not a tensor table is InvalidAdapter, not a crash.
    st.write_bytes((2).to_bytes(8, "little") + b"[]")
    with pytest.raises(gate.GateError, match="not a safetensors file"):
        gate.read_adapter(d)


def test_backtracking_target_modules_regex_is_bounded(tmp_path, base):
    import time

    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(1)] + ["a" * 40]
    # Catastrophic for Python's re: nested quantifiers against a long non-matching name.
    evil = r"(a+)+b"
    started = time.monotonic()
    assert gate._target_patterns_missing(evil, set(names)) == [evil]
    assert time.monotonic() - started < 1
    evil_adapter = write_adapter(tmp_path / "evil", extra_config={"target_modules": "(a|aa)+$" * 1})
    started = time.monotonic()
    assert reasons(evil_adapter, base) == ["TargetModulesNotFound"]
    assert time.monotonic() - started < 2
    # What RE2 cannot run (backreferences, lookaround) or a huge pattern is refused with its own reason.
    for pattern in (r"(q)\1_proj", r"(?=q).*_proj", "q" * (gate.MAX_PATTERN_CHARS + 1)):
        bad = write_adapter(tmp_path / f"bad{len(pattern)}", extra_config={"target_modules": pattern})
        failures = gate.check(gate.read_adapter(bad), base, max_lora_rank=16)
        assert [f.reason for f in failures] == [Reason.InvalidTargetModules], pattern
    # An ordinary PEFT regex still matches as re.fullmatch would.
    ok = write_adapter(tmp_path / "ok", extra_config={"target_modules": r".*\.(q_proj|v_proj)"})
    assert reasons(ok, base) == []


def test_adapter_config_size_is_capped_before_reading(tmp_path, monkeypatch):
    """Review p6: a 95 MiB adapter_config.json was read whole and json-decoded (about 3x its size in memory on
    every replica). Now it is refused by its size, before a byte is decoded."""
    d = write_adapter(tmp_path / "big")
    config = json.loads((d / "adapter_config.json").read_text())
    with open(d / "adapter_config.json", "w") as fh:
        fh.write(json.dumps(config)[:-1] + ', "pad": "' + "x" * (gate.MAX_CONFIG_BYTES + 10) + '"}')
    monkeypatch.setattr(gate.json, "loads", lambda *a, **k: pytest.fail("decoded an oversized config"))
    with pytest.raises(gate.GateError) as info:
        gate.read_adapter(d)
    assert info.value.reason is Reason.ArtifactTooLarge and "adapter_config.json" in str(info.value)


@pytest.mark.parametrize("targets", [["q_proj", 1], [None], [["q_proj"]], {"q_proj": 1}, 7,
                                     ["q_proj"] * (gate.MAX_TARGET_MODULES + 1)], ids=lambda t: type(t).__name__ + str(len(t) if hasattr(t, "__len__") else t))
def test_malformed_target_modules_are_refused_by_the_rule(targets, base):
    """Review p5/p6: a non-string entry crashed the suffix match (TypeError -> InternalError, retried); an
    unbounded list was matched O(targets x modules). Now the pattern rule names it, nothing raises."""
    bad = _facts(config={"target_modules": targets})
    failures = gate.check(bad.adapter, bad.base, **_check_kwargs(bad))
    assert [f.reason for f in failures] == [Reason.InvalidTargetModules]
    assert "target_modules" in failures[0].message
    # also against the real tiny model's modules (target_modules_exist runs there)
    assert [f.reason for f in gate.check(bad.adapter, base, max_lora_rank=16)][-1:] != [Reason.InternalError]


def test_target_modules_matching_is_linear(base):
    import time

    modules = {f"model.layers.{layer}.{part}" for layer in range(200) for part in
               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")}
    targets = [f"t{i}" for i in range(gate.MAX_TARGET_MODULES - 2)] + ["q_proj", "self_attn.v_proj"]
    started = time.monotonic()
    missing = gate._target_patterns_missing(targets, modules)
    assert time.monotonic() - started < 0.5   # was about 10 s (10,000 x 1,800 suffix tests in Python)
    assert len(missing) == gate.MAX_TARGET_MODULES - 2 and "q_proj" not in missing
    assert gate._target_patterns_missing(["proj", "layers.0.self_attn.q_proj", "0.self_attn.q_proj"],
                                         modules) == ["proj"]   # PEFT: suffixes at a dot only


@pytest.mark.parametrize("field,value", [("r", {"a": 1}), ("rank_pattern", 1), ("rank_pattern", {"q_proj": "b"}),
                                         ("modules_to_save", 1), ("modules_to_save", ["x", {}])])
def test_a_config_field_of_the_wrong_type_is_an_invalid_adapter(field, value):
    """Any adapter_config.json field of the wrong type is InvalidAdapter naming the field (a rule that checks it, or
    the rule that could not read it), never an exception (the loader reported those as InternalError and retried
    them)."""
    bad = _facts(config={field: value})
    failures = gate.check(bad.adapter, bad.base, **_check_kwargs(bad))
    assert failures and failures[-1].reason == Reason.InvalidAdapter
    assert field in failures[-1].message or "rule" in failures[-1].message, failures


def test_a_backtracking_rank_pattern_key_cannot_freeze_the_loader_or_the_engine(tmp_path, tiny_model_dir):
    """rank_pattern and alpha_pattern keys are regexes PEFT and vLLM (vllm/lora/peft_helper.py _match_pattern)
    match with Python's backtracking `re` against every adapted module's name when the adapter loads: `(.|.)*x`
    takes exponential time on a ~50-character name and holds the GIL. The gate matched them with that engine
    too (the loader froze, event loop included). Now the gate runs RE2 and refuses a key whose structure would
    make vLLM's own match slow (a repeated group or alternation, more than one repeat), so such an adapter is
    InvalidAdapter before it reaches vLLM; ordinary keys pass."""
    import subprocess
    import sys
    from pathlib import Path

    evil = write_adapter(tmp_path / "evil", r=8, extra_config={"rank_pattern": {"(.|.)*x": 4}})
    code = ("import sys; from loraplane.loader import gate; "
            "base = gate.read_base(sys.argv[1], None, __import__('pathlib').Path(sys.argv[2])); "
            "print([str(f.reason) for f in gate.check(gate.read_adapter(__import__('pathlib').Path(sys.argv[3])), "
            "base, max_lora_rank=16)])")
    operator_dir = Path(gate.__file__).resolve().parents[2]
    try:
        done = subprocess.run([sys.executable, "-c", code, IDENTITY, str(tiny_model_dir), str(evil)],
                              capture_output=True, text=True, timeout=30, env={"PYTHONPATH": str(operator_dir)})
    except subprocess.TimeoutExpired:
        pytest.fail("the gate ran a rank_pattern key with a backtracking regex engine (> 30 s for one adapter)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['InvalidAdapter']"
    base = gate.read_base(IDENTITY, None, tiny_model_dir)

    def failures(name: str, **config) -> list[gate.GateFailure]:
        return gate.check(gate.read_adapter(write_adapter(tmp_path / name, r=8, extra_config=config)), base,
                          max_lora_rank=16)

    # Refused, naming the field: what vLLM would backtrack on, what RE2 refuses, too many keys, a non-map.
    for i, (field, value) in enumerate([
            ("rank_pattern", {"(a+)+b": 8}), ("rank_pattern", {"(q|k)*_proj": 8}), ("rank_pattern", {".*.*x": 8}),
            ("alpha_pattern", {"(.|.)*x": 16}), ("rank_pattern", {r"(q)\1_proj": 8}),
            ("rank_pattern", {r"(.|..)*\.q": 8}),   # > 20 s in vLLM's matcher (the regex module) on a module name
            ("rank_pattern", {f"layers\\.{i}\\.q_proj": 8 for i in range(gate.MAX_PATTERN_KEYS + 1)}),
            ("alpha_pattern", [1])]):
        found = failures(f"bad{i}", **{field: value})
        assert [f.reason for f in found] == [Reason.InvalidAdapter], (field, value)
        assert field in found[0].message
    # Passed: module names, one wildcard, a class repeated, an alternation that is not repeated.
    for i, key in enumerate(["q_proj", "model.layers.0.self_attn.q_proj", r"layers\.1\..*q_proj",
                             r"layers\.\d+\.self_attn\.q_proj", r"layers\.(0|1)\.self_attn\.v_proj"]):
        assert gate.python_backtracking_problem(key) is None, key
        assert failures(f"ok{i}", alpha_pattern={key: 16}) == [], key
