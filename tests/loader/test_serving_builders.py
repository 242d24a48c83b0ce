"""The pure builders of a serving replica: vLLM's command line/env and the loader sidecar."""

from __future__ import annotations

import argparse

import pytest

from loraplane.api.modelroute import ModelRoute
from loraplane.builders import serving
from loraplane.loader.main import add_loader_arguments


def route(**spec) -> ModelRoute:
    base = {"baseModel": {"name": "meta-llama/Llama-3.1-8B-Instruct", "revision": "abc123"}}
    return ModelRoute.model_validate({"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute",
                                      "metadata": {"name": "chat", "namespace": "ml"}, "spec": {**base, **spec}})


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_engine_command_carries_the_route_engine_settings():
    r = route(servedModelName="llama", engine={"maxLoras": 8, "maxLoraRank": 64, "maxModelLen": 4096,
                                                  "dtype": "bfloat16", "tensorParallelSize": 2,
                                                  "extraArgs": ["--enable-prefix-caching"]})
    cmd = serving.engine_command(r)
    assert cmd[:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert flag(cmd, "--model") == "meta-llama/Llama-3.1-8B-Instruct" and flag(cmd, "--revision") == "abc123"
    assert flag(cmd, "--served-model-name") == "llama" and "--enable-lora" in cmd
    assert (flag(cmd, "--max-loras"), flag(cmd, "--max-lora-rank"), flag(cmd, "--max-cpu-loras")) == ("8", "64", "16")
    assert (flag(cmd, "--dtype"), flag(cmd, "--max-model-len"), flag(cmd, "--tensor-parallel-size")) == \
        ("bfloat16", "4096", "2")
    assert flag(cmd, "--port") == str(serving.ENGINE_PORT)
    assert cmd[-1] == "--enable-prefix-caching"          # extraArgs come last, so they can override
    assert serving.engine_command(r) == cmd               # deterministic


def test_engine_env_enables_runtime_lora_and_passes_user_env_last():
    r = route(engine={"env": [{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}]},
              baseModel={"name": "org/m", "credentialsSecretRef": {"name": "hf"}})
    env = serving.engine_env(r)
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in env
    assert {"name": "HF_HOME", "value": serving.HF_HOME} in env
    token = next(e for e in env if e["name"] == "HF_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "HF_TOKEN", "optional": True}
    assert env[-1] == {"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}


@pytest.mark.parametrize("uri,model", [
    ("pvc://models/llama/8b", "/mnt/pvc/models/llama/8b"),
    ("file:///data/llama", "/data/llama"),
    ("/data/llama", "/data/llama"),
])
def test_uri_base_models_are_served_from_their_path_in_the_pod(uri, model):
    r = route(baseModel={"uri": uri})
    assert flag(serving.engine_command(r), "--model") == model
    assert serving.model_path_in_replica(r.spec.base_model) == model
    assert serving.served_model_name(r) == uri.rstrip("/").rsplit("/", 1)[-1]


def test_pvc_base_model_and_adapter_claims_are_mounted_read_only():
    r = route(baseModel={"uri": "pvc://models/llama"})
    volumes = serving.serving_volumes(r, adapter_claims=["adapters", "models"])
    claims = [v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v]
    assert claims == ["models", "adapters"]
    loader = serving.loader_container(r, "ml", "loraplane:1", adapter_claims=["adapters"])
    mounts = {m["mountPath"]: m for m in loader["volumeMounts"]}
    assert mounts["/mnt/pvc/adapters"]["readOnly"] and mounts["/mnt/pvc/models"]["readOnly"]
    # vLLM reads adapters from the cache both containers share, at the same path
    engine = serving.engine_container(r)
    assert {m["mountPath"] for m in engine["volumeMounts"]} >= {serving.ADAPTER_CACHE_PATH, serving.MODEL_CACHE_PATH}
    assert serving.ADAPTER_CACHE_PATH in mounts


def test_engine_container_probes_and_gpu_resources():
    c = serving.engine_container(route(engine={"gpus": 2, "memory": "64Gi"}))
    assert c["resources"]["limits"] == {"nvidia.com/gpu": "2", "memory": "64Gi"}  # strings: SSA-safe
    assert c["startupProbe"]["httpGet"] == {"path": "/health", "port": serving.ENGINE_PORT}
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 1800
    assert "resources" not in serving.engine_container(route(engine={"gpus": 0}))


def test_loader_container_arguments_parse_with_the_loader_cli():
    c = serving.loader_container(route(), "ml", "ghcr.io/x/loraplane:1")
    assert c["command"][:3] == ["python3", "-m", "loraplane.loader"]
    parser = argparse.ArgumentParser()
    add_loader_arguments(parser)
    args = parser.parse_args(c["command"][3:])
    assert (args.configmap, args.namespace, args.port) == ("chat-serving", "ml", serving.LOADER_PORT)
    assert args.vllm_url == f"http://127.0.0.1:{serving.ENGINE_PORT}"
    assert str(args.cache_dir) == serving.ADAPTER_CACHE_PATH
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert c["ports"] == [{"name": "loader", "containerPort": serving.LOADER_PORT}]
