"""Issue 12, item 6: the operator-level spec policy. A FineTuneJob or ModelRoute author may no longer run any
image, any vLLM flag (--trust-remote-code), any Secret through engine.env or any ServiceAccount: what the policy
does not allow is refused with reason PolicyViolation naming the field and the setting, and nothing is created."""

from __future__ import annotations

import copy

import pytest

from loraplane.api import FineTuneJob, ModelRoute
from loraplane.api.reasons import Reason
from loraplane.builders.policy import (DEFAULT_ENGINE_ARGS, SETTING_ACCOUNTS, SETTING_ENGINE_ARGS, SETTING_IMAGES,
                                       SETTING_SECRETS, SETTING_TRUST, SpecPolicy, engine_arg_violations,
                                       image_repository)
from loraplane.builders.settings import BuildSettings
from loraplane.controllers.settings import OperatorSettings

FTJ_BODY = {"apiVersion": "loraplane.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "j", "namespace": "ns", "uid": "u", "generation": 1},
            "spec": {"baseModel": {"name": "org/base"}, "dataset": {"uri": "/d.jsonl"},
                     "output": {"adapterName": "a"}}}
ROUTE_BODY = {"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute",
              "metadata": {"name": "r", "namespace": "ns", "uid": "ru", "generation": 3},
              "spec": {"baseModel": {"name": "org/base", "credentialsSecretRef": {"name": "hf", "key": "token"}},
                       "routes": [{"name": "m", "backends": [{"base": True}]}]}}


def ftj(**spec) -> FineTuneJob:
    body = copy.deepcopy(FTJ_BODY)
    body["spec"].update(spec)
    return FineTuneJob.model_validate(body)


def route(engine=None, router=None) -> ModelRoute:
    body = copy.deepcopy(ROUTE_BODY)
    body["spec"]["engine"] = engine or {}
    if router:
        body["spec"]["router"] = router
    return ModelRoute.model_validate(body)


def fields(settings: BuildSettings, obj) -> list[tuple[str, str]]:
    return [(v.field, v.setting) for v in settings.violations(obj)]


@pytest.mark.parametrize("ref,repo", [
    ("vllm/vllm-openai:v0.32.0", "vllm/vllm-openai"), ("reg:5000/a/b:1@sha256:" + "a" * 64, "reg:5000/a/b"),
    ("reg:5000/a/b", "reg:5000/a/b"), ("busybox", "busybox"),
])
def test_image_repository(ref, repo):
    assert image_repository(ref) == repo


def test_images_are_the_operators_repositories_or_an_allowed_glob():
    s = BuildSettings()
    assert fields(s, ftj()) == [] and fields(s, route()) == []                     # defaults: nothing asked
    assert fields(s, route({"image": "vllm/vllm-openai:v0.31.0"})) == []           # another tag of the engine
    assert fields(s, ftj(image="ghcr.io/loraplane/loraplane:0.0.9")) == []          # another tag of ours
    assert fields(s, ftj(image="evil.example/miner:1")) == [("spec.image", SETTING_IMAGES)]
    assert fields(s, route({"image": "vllm/vllm-openai-evil:1"}, {"image": "docker.io/x:1"})) == [
        ("spec.engine.image", SETTING_IMAGES), ("spec.router.image", SETTING_IMAGES)]
    allowed = BuildSettings(policy=SpecPolicy(allowed_images=("registry.example.com/ml/*",)))
    assert fields(allowed, ftj(image="registry.example.com/ml/trainer/cu12:1")) == []
    assert fields(allowed, ftj(image="registry.example.com/other:1")) == [("spec.image", SETTING_IMAGES)]


def test_extra_args_are_an_allow_list_with_a_safe_default():
    s = BuildSettings()
    ok = ["--enable-prefix-caching", "--max-num-seqs", "64", "--max_num_batched_tokens=4096", "--seed", "-1"]
    assert fields(s, route({"extraArgs": ok})) == []
    bad = ["--trust-remote-code", "--chat-template", "/etc/passwd", "--port=9", "--api-key", "k",
           "--allowed-local-media-path", "/", "--tool-parser-plugin", "x.py", "--enable-auto-tool-choice",
           "--trust-remote", "--trust_remote_code", "--lora-modules", "a=/x", "--host", "0.0.0.0"]
    got = [(v.field, v.setting) for v in engine_arg_violations(bad, s.policy)]
    assert got == [("spec.engine.extraArgs[0]", SETTING_TRUST), ("spec.engine.extraArgs[1]", SETTING_ENGINE_ARGS),
                   ("spec.engine.extraArgs[3]", "none: use the spec's own field"),
                   ("spec.engine.extraArgs[4]", SETTING_ENGINE_ARGS), ("spec.engine.extraArgs[6]", SETTING_ENGINE_ARGS),
                   ("spec.engine.extraArgs[8]", SETTING_ENGINE_ARGS), ("spec.engine.extraArgs[10]", SETTING_ENGINE_ARGS),
                   ("spec.engine.extraArgs[11]", SETTING_ENGINE_ARGS),   # an abbreviation argparse would expand
                   ("spec.engine.extraArgs[12]", SETTING_TRUST),         # vLLM reads _ as -
                   ("spec.engine.extraArgs[13]", "none: use the spec's own field"),
                   ("spec.engine.extraArgs[15]", "none: use the spec's own field")]
    assert [v.field for v in engine_arg_violations(["/model", "--seed", "1"], s.policy)] == ["spec.engine.extraArgs[0]"]
    assert [v.field for v in engine_arg_violations(["--seed", "@/mnt/pvc/m/args"], s.policy)] == [
        "spec.engine.extraArgs[1]"]
    trusted = SpecPolicy(allow_trust_remote_code=True)
    assert engine_arg_violations(["--trust-remote-code"], trusted) == []
    # The operator's own flags stay refused whatever the list says: they would override what the spec set.
    assert engine_arg_violations(["--port", "9"], SpecPolicy(allowed_engine_args=("--port",)))
    assert "--trust-remote-code" not in DEFAULT_ENGINE_ARGS


def test_env_may_read_only_the_routes_own_secret_or_an_allowed_one():
    s = BuildSettings()
    own = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    other = {"name": "X", "valueFrom": {"secretKeyRef": {"name": "payments-db", "key": "password"}}}
    plain = {"name": "Y", "value": "1"}
    cm = {"name": "Z", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}
    assert fields(s, route({"env": [own, plain, cm]})) == []
    assert fields(s, route({"env": [plain, other]})) == [("spec.engine.env[1].valueFrom.secretKeyRef", SETTING_SECRETS)]
    allowed = BuildSettings(policy=SpecPolicy(allowed_env_secrets=("payments-*",)))
    assert fields(allowed, route({"env": [other]})) == []
    # Code loaded from a path the author controls (a PVC the base model URI mounts): never, whatever the policy.
    hooks = [{"name": "LD_PRELOAD", "value": "/mnt/pvc/m/x.so"}, {"name": "PYTHONPATH", "value": "/mnt/pvc/m"},
             {"name": "PYTHONUNBUFFERED", "value": "1"}]
    assert fields(allowed, route({"env": hooks})) == [("spec.engine.env[0].name", "none: bake it into an allowed image"),
                                                      ("spec.engine.env[1].name", "none: bake it into an allowed image")]


def test_service_account_override_needs_the_policy():
    assert fields(BuildSettings(), ftj(serviceAccountName="default")) == [("spec.serviceAccountName",
                                                                            SETTING_ACCOUNTS)]
    allowed = BuildSettings(policy=SpecPolicy(allowed_service_accounts=("trainer-*",)))
    assert fields(allowed, ftj(serviceAccountName="trainer-gpu")) == []
    assert fields(allowed, ftj(serviceAccountName="admin")) == [("spec.serviceAccountName", SETTING_ACCOUNTS)]


def test_the_message_names_the_field_and_the_setting():
    (v,) = BuildSettings().violations(route({"extraArgs": ["--trust-remote-code"]}))
    text = str(v)
    assert "spec.engine.extraArgs[0]" in text and "--trust-remote-code" in text
    assert "operator.policy.allowTrustRemoteCode" in text and "LORAPLANE_ALLOW_TRUST_REMOTE_CODE" in text
    assert Reason.PolicyViolation.fix


def test_operator_settings_read_the_policy_from_the_environment(monkeypatch):
    assert OperatorSettings.from_env().build.policy == SpecPolicy()
    monkeypatch.setenv("LORAPLANE_ALLOWED_IMAGES", "registry.example.com/ml/*, quay.io/x/*")
    monkeypatch.setenv("LORAPLANE_ALLOWED_ENGINE_ARGS", "--seed,--enforce-eager")
    monkeypatch.setenv("LORAPLANE_ALLOW_TRUST_REMOTE_CODE", "true")
    monkeypatch.setenv("LORAPLANE_ALLOWED_ENV_SECRETS", "hf-*")
    monkeypatch.setenv("LORAPLANE_ALLOWED_SERVICE_ACCOUNTS", "trainer")
    assert OperatorSettings.from_env().build.policy == SpecPolicy(
        allowed_images=("registry.example.com/ml/*", "quay.io/x/*"), allowed_engine_args=("--seed", "--enforce-eager"),
        allow_trust_remote_code=True, allowed_env_secrets=("hf-*",), allowed_service_accounts=("trainer",))
    monkeypatch.setenv("LORAPLANE_ALLOWED_ENGINE_ARGS", "")   # set but empty: no flag at all
    assert OperatorSettings.from_env().build.policy.allowed_engine_args == ()


def test_the_trainer_never_trusts_remote_code():
    """There is no spec field for it and the trainer never passes trust_remote_code (transformers' default is
    False): a FineTuneJob cannot make the trainer run a model repository's Python."""
    import ast
    import inspect

    from loraplane.trainer import model
    tree = ast.parse(inspect.getsource(model))
    assert not [k for k in ast.walk(tree) if isinstance(k, ast.keyword) and k.arg == "trust_remote_code"]
    assert "trust_remote_code" not in FineTuneJob.model_json_schema(by_alias=False).__repr__()
