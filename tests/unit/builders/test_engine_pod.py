"""The pure builders of a serving replica: vLLM's command line/env and the loader sidecar."""

from __future__ import annotations

import argparse

import pytest

from loraplane.api.modelroute import ModelRoute
from loraplane.builders import engine_pod
from loraplane.loader.cli import add_loader_arguments


def route(**spec) -> ModelRoute:
    base = {"baseModel": {"name": "meta-llama/Llama-3.1-8B-Instruct", "revision": "abc123"}}
    return ModelRoute.model_validate({"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute",
                                      "metadata": {"name": "chat", "namespace": "ml"}, "spec": {**base, **spec}})


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_engine_command_carries_the_route_engine_settings():
    r = route(servedModelName="llama", engine={"maxLoras": 8, "maxLoraRank": 64, "maxModelLen": 4096,
                                                  "dtype": "bfloat16", "tensorParallelSize": 2, "gpus": 2,
                                                  "extraArgs": ["--enable-prefix-caching"]})
    cmd = engine_pod.engine_command(r)
    assert cmd[:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert flag(cmd, "--model") == "meta-llama/Llama-3.1-8B-Instruct" and flag(cmd, "--revision") == "abc123"
    assert flag(cmd, "--served-model-name") == "llama" and "--enable-lora" in cmd
    assert (flag(cmd, "--max-loras"), flag(cmd, "--max-lora-rank"), flag(cmd, "--max-cpu-loras")) == ("8", "64", "16")
    assert (flag(cmd, "--dtype"), flag(cmd, "--max-model-len"), flag(cmd, "--tensor-parallel-size")) == \
        ("bfloat16", "4096", "2")
    assert flag(cmd, "--port") == str(engine_pod.ENGINE_PORT)
    assert cmd[-1] == "--enable-prefix-caching"          # extraArgs come last, so they can override
    assert engine_pod.engine_command(r) == cmd               # deterministic


def test_engine_env_enables_runtime_lora_and_passes_user_env_last():
    r = route(engine={"env": [{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}]},
              baseModel={"name": "org/m", "credentialsSecretRef": {"name": "hf"}})
    env = engine_pod.engine_env(r)
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in env
    assert {"name": "HF_HOME", "value": engine_pod.HF_HOME} in env
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
    assert flag(engine_pod.engine_command(r), "--model") == model
    assert engine_pod.model_path_in_replica(r.spec.base_model) == model
    assert engine_pod.served_model_name(r) == uri.rstrip("/").rsplit("/", 1)[-1]


def test_pvc_base_model_and_adapter_claims_are_mounted_read_only():
    r = route(baseModel={"uri": "pvc://models/llama"})
    volumes = engine_pod.serving_volumes(r, adapter_claims=["adapters", "models"])
    claims = [v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v]
    assert claims == ["models", "adapters"]
    loader = engine_pod.loader_container(r, "ml", "loraplane:1", adapter_claims=["adapters"])
    mounts = {m["mountPath"]: m for m in loader["volumeMounts"]}
    assert mounts["/mnt/pvc/adapters"]["readOnly"] and mounts["/mnt/pvc/models"]["readOnly"]
    # vLLM reads adapters from the cache both containers share, at the same path
    engine = engine_pod.engine_container(r)
    assert {m["mountPath"] for m in engine["volumeMounts"]} >= {engine_pod.ADAPTER_CACHE_PATH, engine_pod.MODEL_CACHE_PATH}
    assert engine_pod.ADAPTER_CACHE_PATH in mounts


def test_engine_container_probes_and_gpu_resources():
    c = engine_pod.engine_container(route(engine={"gpus": 2, "memory": "64Gi"}))
    assert c["resources"]["limits"] == {"nvidia.com/gpu": "2", "memory": "64Gi"}  # strings: SSA-safe
    assert c["startupProbe"]["httpGet"] == {"path": "/health", "port": engine_pod.ENGINE_PORT}
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 1800
    assert "resources" not in engine_pod.engine_container(route(engine={"gpus": 0}))


def test_a_replica_is_ready_within_two_seconds_of_serving():
    """Regression (issue 11, the e2e apply→first-token benchmark): with a 10 s startup and 5 s readiness period,
    a replica whose vLLM and loader were up counted as Ready (Endpoints, so the router) 6-7 s later. Both probe
    every 2 s now; a replica still needs as long as before (15 s and more) of failed probes to be taken out."""
    loader = engine_pod.loader_container(route(), "ml", "ghcr.io/x/loraplane:1")
    for c, probes in ((engine_pod.engine_container(route()), ("startupProbe", "readinessProbe")),
                      (loader, ("readinessProbe",))):
        for name in probes:
            assert c[name]["periodSeconds"] <= 2, (c["name"], name)
        ready = c["readinessProbe"]
        assert ready["periodSeconds"] * ready.get("failureThreshold", 3) >= 15, c["name"]


def test_loader_container_arguments_parse_with_the_loader_cli():
    c = engine_pod.loader_container(route(), "ml", "ghcr.io/x/loraplane:1")
    assert c["command"][:3] == ["python3", "-m", "loraplane.loader"]
    parser = argparse.ArgumentParser()
    add_loader_arguments(parser)
    args = parser.parse_args(c["command"][3:])
    assert (args.configmap, args.namespace, args.port) == ("chat-serving", "ml", engine_pod.LOADER_PORT)
    assert args.vllm_url == f"http://127.0.0.1:{engine_pod.ENGINE_PORT}"
    assert str(args.cache_dir) == engine_pod.ADAPTER_CACHE_PATH
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert c["ports"] == [{"name": "loader", "containerPort": engine_pod.LOADER_PORT}]


def test_s3_base_model_is_fetched_by_an_init_container_that_vllm_and_the_loader_read():
    from kubernetes_validate import validate

    from loraplane.builders import BuildSettings, modelroute, resolve
    from loraplane.storage.cache import fetched_model_path
    from loraplane.loader.fetch_model import add_fetch_model_arguments

    r = route(baseModel={"uri": "s3://models/llama-3-8b/", "credentialsSecretRef": {"name": "s3-creds"}})
    r.metadata.uid = "0b6c1f5e-8d1e-4f59-9f0e-2f5d7b8c9a10"
    table = resolve(r, []).table
    pod = modelroute.engine_deployment(r, table, BuildSettings(image="lp:1"))["spec"]["template"]["spec"]
    (fetch,) = pod["initContainers"]
    assert fetch["name"] == engine_pod.MODEL_FETCH_CONTAINER and fetch["image"] == "lp:1"
    assert fetch["command"][:3] == ["loraplane", "fetch-model", "s3://models/llama-3-8b/"]
    args = argparse.ArgumentParser()
    add_fetch_model_arguments(args)
    parsed = args.parse_args(fetch["command"][2:])  # the command parses with the real entry point
    where = fetched_model_path(parsed.cache_dir, parsed.uri)
    assert {e["name"] for e in fetch["env"]} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}
    assert all(e["valueFrom"]["secretKeyRef"]["name"] == "s3-creds" for e in fetch["env"] if "valueFrom" in e)
    assert fetch["volumeMounts"][0] == {"name": engine_pod.MODEL_CACHE_VOLUME, "mountPath": engine_pod.MODEL_CACHE_PATH}
    vllm = next(c for c in pod["containers"] if c["name"] == engine_pod.ENGINE_CONTAINER)
    assert flag(vllm["command"], "--model") == str(where)             # vLLM serves the fetched copy
    assert flag(vllm["command"], "--served-model-name") == "llama-3-8b"
    assert table.model_path == str(where)                            # the loader's gate reads the same
    assert str(where).startswith(engine_pod.MODEL_CACHE_PATH + "/")     # on the volume both containers mount
    validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": pod}, "1.30.0", strict=True)
    pinned = route(baseModel={"uri": "https://m.example/llama.tar.gz", "sha256": "c" * 64})
    assert engine_pod.model_fetch_container(pinned, "lp:1")["command"][-2:] == ["--sha256", "c" * 64]
    assert engine_pod.served_model_name(pinned) == "llama"
    # Hub and PVC models need no fetch.
    assert engine_pod.model_fetch_container(route(), "lp:1") is None
    assert engine_pod.model_fetch_container(route(baseModel={"uri": "pvc://models/llama"}), "lp:1") is None


def test_only_the_loader_holds_an_api_token_and_it_may_write_nothing():
    """Issue 12 item 3: the token was automounted into every container (vLLM runs model code) and the loader's
    Role could patch every pod of the namespace. Now only the loader mounts it, and the Role only reads."""
    from loraplane.api.paths import SERVICE_ACCOUNT_PATH
    from loraplane.builders import BuildSettings, modelroute
    from loraplane.api.wire.serving import ServingTable

    r = route(baseModel={"uri": "s3://models/llama"})   # with the fetch-model init container
    table = ServingTable(route="chat", namespace="ml", base_model="llama", served_model_name="llama",
                         max_lora_rank=16, max_loras=4)
    pod = modelroute.engine_deployment(r, table, BuildSettings())["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    token_volumes = {v["name"] for v in pod["volumes"] if "projected" in v}
    sources = [next(iter(s)) for v in pod["volumes"] if "projected" in v for s in v["projected"]["sources"]]
    assert sources == ["serviceAccountToken", "configMap", "downwardAPI"]   # token, ca.crt, namespace
    for c in pod["containers"] + pod["initContainers"]:
        mounted = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
        holds = [n for n in mounted if n in token_volumes]
        if c["name"] == engine_pod.LOADER_CONTAINER:
            assert [mounted[n] for n in holds] == [SERVICE_ACCOUNT_PATH]   # where kube/config.py reads it
        else:
            assert holds == [], c["name"]
    rules = next(m for m in modelroute.engine_rbac(r) if m["kind"] == "Role")["rules"]
    assert all(set(rule["verbs"]) <= {"get", "list", "watch"} for rule in rules)
    assert all(rule.get("resourceNames") == ["chat-serving"] for rule in rules)


def test_vllm_accepts_connections_only_from_its_routes_routers():
    """Issue 12 item 1 (b): a NetworkPolicy per route, on by default: ingress to the engine pods' vLLM port only
    from the same route's router pods; the loader's read-only port stays reachable; a switch turns it off."""
    from loraplane.api.wire.serving import ServingTable
    from loraplane.builders import BuildSettings, modelroute

    def selected(selector: dict, labels: dict) -> bool:
        return all(labels.get(k) == v for k, v in selector["matchLabels"].items())

    r, other = route(), route()
    other.metadata.name = "other"
    table = ServingTable(route="chat", namespace="ml", base_model="llama", served_model_name="llama",
                         max_lora_rank=16, max_loras=4)
    kids = modelroute.children(r, table, BuildSettings())
    (policy,) = [k for k in kids if k["kind"] == "NetworkPolicy"]
    assert [k["kind"] for k in kids].index("NetworkPolicy") < [k["kind"] for k in kids].index("Deployment")
    spec = policy["spec"]
    engine = modelroute.engine_deployment(r, table, BuildSettings())["spec"]["template"]["metadata"]["labels"]
    routers = modelroute.router_deployment(r, BuildSettings())["spec"]["template"]["metadata"]["labels"]
    others = modelroute.router_deployment(other, BuildSettings())["spec"]["template"]["metadata"]["labels"]
    other_engine = modelroute.engine_deployment(other, table, BuildSettings())["spec"]["template"]["metadata"]
    assert selected(spec["podSelector"], engine) and not selected(spec["podSelector"], other_engine["labels"])
    assert spec["policyTypes"] == ["Ingress"]

    def allowed(port: int, labels: dict) -> bool:
        return any(any(p["port"] == port for p in rule["ports"])
                   and ("from" not in rule or any(selected(peer["podSelector"], labels) for peer in rule["from"]))
                   for rule in spec["ingress"])

    assert allowed(engine_pod.ENGINE_PORT, routers)
    assert not allowed(engine_pod.ENGINE_PORT, others) and not allowed(engine_pod.ENGINE_PORT, engine)
    assert not allowed(engine_pod.ENGINE_PORT, {})
    assert allowed(engine_pod.LOADER_PORT, {})     # read-only /status, /metrics: the operator's relay
    off = BuildSettings(network_policies=False)
    assert not any(k["kind"] == "NetworkPolicy" for k in modelroute.children(r, table, off))
    assert ("networking.k8s.io/v1", "NetworkPolicy", "ml", "chat-engine") in modelroute.unwanted_children(r, off)


# ---- issue 16: /dev/shm and the base-model cache ------------------------------------------------------------

def _volume(r: ModelRoute, name: str) -> dict:
    return next(v for v in engine_pod.serving_volumes(r) if v["name"] == name)


@pytest.mark.parametrize("engine,size", [({}, "2Gi"), ({"tensorParallelSize": 2, "gpus": 2}, "4Gi"),
                                         ({"tensorParallelSize": 8, "gpus": 8}, "16Gi"),
                                         ({"tensorParallelSize": 2, "gpus": 2, "shmSize": "12Gi"}, "12Gi")])
def test_dev_shm_is_memory_backed_and_sized_from_tensor_parallelism(engine, size):
    """vLLM's tensor-parallel workers need a /dev/shm larger than the runtime's 64 MiB (NCCL, torch shm)."""
    r = route(engine=engine)
    assert _volume(r, engine_pod.SHM_VOLUME) == {"name": engine_pod.SHM_VOLUME,
                                                 "emptyDir": {"medium": "Memory", "sizeLimit": size}}
    mounts = {m["mountPath"]: m["name"] for m in engine_pod.engine_container(r)["volumeMounts"]}
    assert mounts["/dev/shm"] == engine_pod.SHM_VOLUME


def test_the_model_cache_is_a_bounded_emptydir_by_default_or_the_users_claim_or_node_path():
    assert _volume(route(), engine_pod.MODEL_CACHE_VOLUME)["emptyDir"] == {"sizeLimit": "100Gi"}
    assert _volume(route(engine={"modelCache": {"sizeLimit": "300Gi"}}),
                   engine_pod.MODEL_CACHE_VOLUME)["emptyDir"] == {"sizeLimit": "300Gi"}
    assert _volume(route(engine={"modelCache": {"claimName": "models"}}), engine_pod.MODEL_CACHE_VOLUME) == {
        "name": engine_pod.MODEL_CACHE_VOLUME, "persistentVolumeClaim": {"claimName": "models"}}
    assert _volume(route(engine={"modelCache": {"hostPath": "/var/cache/loraplane"}}),
                   engine_pod.MODEL_CACHE_VOLUME) == {"name": engine_pod.MODEL_CACHE_VOLUME,
                                                      "hostPath": {"path": "/var/cache/loraplane", "type": "Directory"}}


@pytest.mark.parametrize("cache", [{"claimName": "a", "hostPath": "/x"}, {"hostPath": "/var/../etc"},
                                   {"hostPath": "relative"}, {"hostPath": "/a/./b"}])
def test_a_model_cache_names_one_place_and_a_normalised_path(cache):
    with pytest.raises(ValueError, match="modelCache|hostPath"):
        route(engine={"modelCache": cache})


def test_a_node_path_model_cache_needs_the_policy():
    from loraplane.builders.policy import SETTING_HOST_PATHS, SpecPolicy
    from loraplane.builders.settings import BuildSettings

    r = route(engine={"modelCache": {"hostPath": "/var/cache/loraplane/models"}})
    refused = BuildSettings().violations(r)
    assert [(v.field, v.setting) for v in refused] == [("spec.engine.modelCache.hostPath", SETTING_HOST_PATHS)]
    allowed = BuildSettings(policy=SpecPolicy(allowed_model_cache_host_paths=("/var/cache/loraplane/*",)))
    assert allowed.violations(r) == []
    assert BuildSettings().violations(route(engine={"modelCache": {"claimName": "models"}})) == []


def test_an_embedding_route_runs_vllms_pooling_runner_without_lora_and_tells_the_loader():
    """spec.engine.task embed: `--runner pooling` (vLLM 0.32's flag; its `--convert auto` turns a *ForCausalLM
    into an embedding model), no LoRA flags nor runtime-LoRA env, and the loader warms it with an embedding
    (`--engine-task embed`); the default task is generate, unchanged."""
    embed = route(engine={"task": "embed", "maxModelLen": 512})
    cmd = engine_pod.engine_command(embed)
    assert flag(cmd, "--runner") == "pooling"
    assert not [a for a in cmd if "lora" in a.lower()], cmd
    assert flag(cmd, "--max-model-len") == "512" and flag(cmd, "--served-model-name")
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in {e["name"] for e in engine_pod.engine_env(embed)}
    parser = argparse.ArgumentParser()
    add_loader_arguments(parser)
    loader = engine_pod.loader_container(embed, "ml", "ghcr.io/x/loraplane:1")
    assert parser.parse_args(loader["command"][3:]).engine_task == "embed"

    generate = engine_pod.engine_command(route())
    assert "--runner" not in generate and "--enable-lora" in generate
    assert parser.parse_args(engine_pod.loader_container(route(), "ml", "i")["command"][3:]).engine_task == \
        "generate"


def test_vllm_knows_the_pooling_runner_flag():
    """The flag the builder passes is one vLLM 0.32's own argument parser accepts (not a guess)."""
    pytest.importorskip("vllm")
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = EngineArgs.add_cli_args(FlexibleArgumentParser()).parse_args(["--model", "m", "--runner", "pooling"])
    assert args.runner == "pooling"


def test_the_engine_key_secret_name_carries_the_route_uid_and_is_a_valid_name_for_any_route_name():
    """Issue 17: the name is unique to the route object (its uid), so a route deleted and created again never
    meets its predecessor's Secret; the longest route name (50 characters: its Services are named after it) with
    a uid is far below Secret names' 253; without a uid (`loraplane render`) it is `<route>-engine-key`."""
    import re

    from loraplane.api.modelroute import ModelRoute as MR

    def named(name: str, uid: str | None) -> MR:
        return MR.model_validate({"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute",
                                  "metadata": {"name": name, "namespace": "ns", **({"uid": uid} if uid else {})},
                                  "spec": {"baseModel": {"name": "org/base"}}})

    uid1, uid2 = "0b7c1c4e-5f4a-4d3b-9a43-1f2e3d4c5b6a", "9d8e7f60-1a2b-4c3d-8e9f-a0b1c2d3e4f5"
    assert engine_pod.engine_key_secret_name(named("chat", uid1)) == f"chat-engine-key-{uid1}"
    assert engine_pod.engine_key_secret_name(named("chat", None)) == "chat-engine-key"
    subdomain = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    long = "r" * 50
    names = {engine_pod.engine_key_secret_name(named(long, u)) for u in (uid1, uid2)}
    assert names == {f"{long}-engine-key-{uid1}", f"{long}-engine-key-{uid2}"} and all(map(subdomain.match, names))
    env = engine_pod.engine_key_env(named("chat", uid1))
    assert env[0]["valueFrom"]["secretKeyRef"]["name"] == f"chat-engine-key-{uid1}"
