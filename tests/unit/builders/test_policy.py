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
                                       image_repository, DEFAULT_ENGINE_ENV, ENGINE_OWNED_ENV,
                                       SETTING_ENGINE_ENV)
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
    s = BuildSettings(policy=SpecPolicy(allowed_engine_env=("MY_*", "X", "Y", "Z")))
    own = {"name": "MY_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    other = {"name": "X", "valueFrom": {"secretKeyRef": {"name": "payments-db", "key": "password"}}}
    plain = {"name": "Y", "value": "1"}
    cm = {"name": "Z", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}
    assert fields(s, route({"env": [own, plain, cm]})) == []
    assert fields(s, route({"env": [plain, other]})) == [("spec.engine.env[1].valueFrom.secretKeyRef", SETTING_SECRETS)]
    allowed = BuildSettings(policy=SpecPolicy(allowed_env_secrets=("payments-*",), allowed_engine_env=("*",)))
    assert fields(allowed, route({"env": [other]})) == []
    # Code loaded from a path the author controls (a PVC the base model URI mounts): never, whatever the policy.
    hooks = [{"name": "LD_PRELOAD", "value": "/mnt/pvc/m/x.so"}, {"name": "PYTHONPATH", "value": "/mnt/pvc/m"},
             {"name": "OMP_NUM_THREADS", "value": "1"}]
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
    monkeypatch.setenv("LORAPLANE_ALLOWED_ENGINE_ENV", "VLLM_*,NCCL_DEBUG")
    assert OperatorSettings.from_env().build.policy == SpecPolicy(
        allowed_images=("registry.example.com/ml/*", "quay.io/x/*"), allowed_engine_args=("--seed", "--enforce-eager"),
        allow_trust_remote_code=True, allowed_env_secrets=("hf-*",), allowed_service_accounts=("trainer",),
        allowed_engine_env=("VLLM_*", "NCCL_DEBUG"))
    monkeypatch.setenv("LORAPLANE_ALLOWED_ENGINE_ARGS", "")   # set but empty: no flag at all
    assert OperatorSettings.from_env().build.policy.allowed_engine_args == ()
    monkeypatch.setenv("LORAPLANE_ALLOWED_ENGINE_ENV", "")   # set but empty: no variable at all
    assert OperatorSettings.from_env().build.policy.allowed_engine_env == ()


def test_the_trainer_never_trusts_remote_code():
    """There is no spec field for it and the trainer never passes trust_remote_code (transformers' default is
    False): a FineTuneJob cannot make the trainer run a model repository's Python."""
    import ast
    import inspect

    from loraplane.trainer import model
    tree = ast.parse(inspect.getsource(model))
    assert not [k for k in ast.walk(tree) if isinstance(k, ast.keyword) and k.arg == "trust_remote_code"]
    assert "trust_remote_code" not in FineTuneJob.model_json_schema(by_alias=False).__repr__()


NEVER = "none: bake it into an allowed image"
OWNED = "none: the operator owns it"


def env_fields(policy: SpecPolicy, *entries: dict) -> list[tuple[str, str]]:
    return fields(BuildSettings(policy=policy), route({"env": list(entries)}))


def test_the_operators_engine_env_names_are_never_a_users():
    """Attack review 2, item 1: `VLLM_API_KEY: ""` switched vLLM's key check off (the user entry replaced the
    operator's), VLLM_ALLOW_RUNTIME_LORA_UPDATING=False broke the loader, VLLM_SERVER_DEV_MODE=1 opened
    /collective_rpc, /update_weights and /sleep without a key. Refused even when a glob allows every name, and
    every name engine_env writes is covered (a new operator variable cannot be forgotten)."""
    from loraplane.builders.engine_pod import engine_env
    everything = SpecPolicy(allowed_engine_env=("*",))
    r = route()
    ours = {e["name"] for e in engine_env(r)}
    assert ours <= ENGINE_OWNED_ENV and {"VLLM_API_KEY", "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "HF_HOME"} <= ours
    for name in sorted(ENGINE_OWNED_ENV):
        assert env_fields(everything, {"name": name, "value": ""}) == [("spec.engine.env[0].name", OWNED)], name
    assert env_fields(everything, {"name": "VLLM_SERVER_DEV_MODE", "value": "1"}) == [("spec.engine.env[0].name", NEVER)]
    # And were a spec to get past the policy, the operator's entry still wins.
    body = copy.deepcopy(ROUTE_BODY)
    body["spec"]["engine"] = {"env": [{"name": "VLLM_API_KEY", "value": ""}, {"name": "OMP_NUM_THREADS", "value": "2"}]}
    env = engine_env(ModelRoute.model_validate(body))
    (key,) = [e for e in env if e["name"] == "VLLM_API_KEY"]
    assert "valueFrom" in key and "value" not in key and {"name": "OMP_NUM_THREADS", "value": "2"} in env


@pytest.mark.parametrize("name", [
    # Credentials to the author's server (with baseModel.credentialsSecretRef): endpoints, proxies, CAs.
    "HF_ENDPOINT", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "ALL_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CA_BUNDLE",
    # The author's code run by vLLM or what it loads.
    "SAGEMAKER_MODEL_PATH", "CUSTOM_SCRIPT_FILENAME", "PYTHONPYCACHEPREFIX", "PYTHONPATH", "LD_PRELOAD", "HOME",
    "XDG_CACHE_HOME", "VLLM_CACHE_ROOT", "VLLM_CONFIG_ROOT", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR",
    "VLLM_PLUGINS", "HF_MODULES_CACHE", "VLLM_LOGGING_CONFIG_PATH", "VLLM_ALLOW_INSECURE_SERIALIZATION",
])
def test_code_loading_and_endpoint_env_names_are_refused_whatever_the_policy(name):
    """Attack review 2, items 2 and 3: HF_ENDPOINT sent the credentials Secret to the author's server; SageMaker's
    CUSTOM_SCRIPT_FILENAME / SAGEMAKER_MODEL_PATH and PYTHONPYCACHEPREFIX ran the author's code. The default
    allows none of them, and no glob of allowedEngineEnv can."""
    entry = {"name": name, "value": "https://attacker.example/"}
    assert env_fields(SpecPolicy(), entry) != []
    assert env_fields(SpecPolicy(allowed_engine_env=("*", name)), entry) in (
        [("spec.engine.env[0].name", NEVER)], [("spec.engine.env[0].name", OWNED)])


def test_engine_env_names_are_an_allow_list():
    """Names outside DEFAULT_ENGINE_ENV need operator.policy.allowedEngineEnv (a deny-list missed whole classes)."""
    assert env_fields(SpecPolicy(), *({"name": n, "value": "1"} for n in DEFAULT_ENGINE_ENV)) == []
    unknown = {"name": "NCCL_DEBUG", "value": "INFO"}
    assert env_fields(SpecPolicy(), unknown) == [("spec.engine.env[0].name", SETTING_ENGINE_ENV)]
    assert env_fields(SpecPolicy(allowed_engine_env=("NCCL_*",)), unknown) == []
    assert env_fields(SpecPolicy(allowed_engine_env=()), {"name": "OMP_NUM_THREADS", "value": "1"}) == [
        ("spec.engine.env[0].name", SETTING_ENGINE_ENV)]


def test_the_default_engine_env_names_exist_in_vllm():
    """Every VLLM_* default is a variable of the installed vLLM's envs.py (a typo would allow nothing useful)."""
    envs = pytest.importorskip("vllm.envs")
    names = set(envs.environment_variables)
    assert [n for n in DEFAULT_ENGINE_ENV if n.startswith("VLLM_") and n not in names] == []


def test_the_default_engine_args_exist_in_vllm():
    """Attack review 2, item 4: --swap-space, --disable-log-requests, --max-seq-len-to-capture, --preemption-mode and
    --max-num-partial-prefills are not vLLM 0.32 flags (vLLM exits). Every default is a flag of the installed
    vLLM's own server parser, by its full name (not an argparse abbreviation)."""
    pytest.importorskip("vllm")
    try:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    except ImportError:   # older layout
        from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    options = make_arg_parser(FlexibleArgumentParser())._option_string_actions
    assert [a for a in DEFAULT_ENGINE_ARGS if a not in options] == []


def keda_route(address: str | None) -> ModelRoute:
    body = copy.deepcopy(ROUTE_BODY)
    body["spec"]["autoscaling"] = {"backend": "keda", "minReplicas": 0, "maxReplicas": 2,
                                   **({"prometheusAddress": address} if address is not None else {})}
    return ModelRoute.model_validate(body)


def test_a_keda_prometheus_address_needs_the_policy():
    """Issue 12 review: KEDA's operator GETs <prometheusAddress>/api/v1/query from its own network position, so an
    address the author picks is a request KEDA sends for them (the metadata service, an internal API; a `#` makes
    KEDA's query a fragment and the path the author's). Allowed only by a glob of the policy, and only as a plain
    http(s) base URL whatever the globs say."""
    from loraplane.builders.policy import SETTING_PROMETHEUS

    where = "spec.autoscaling.prometheusAddress"
    assert fields(BuildSettings(), keda_route(None)) == []           # the default address
    for address in ("http://prometheus.monitoring:9090", "http://169.254.169.254/latest/meta-data/"):
        assert fields(BuildSettings(), keda_route(address)) == [(where, SETTING_PROMETHEUS)], address
    allowed = BuildSettings(policy=SpecPolicy(allowed_prometheus_addresses=("http://prometheus.monitoring*",
                                                                            "http://*")))
    assert fields(allowed, keda_route("http://prometheus.monitoring:9090")) == []
    for bad in ("http://169.254.169.254/latest/meta-data/iam#", "http://x/?a=b", "http://u:p@x:9090",
                "file:///etc/passwd", "http://", "http://x:port", "gopher://x"):
        assert fields(allowed, keda_route(bad)) == [(where, "none: write the Prometheus base URL")], bad
