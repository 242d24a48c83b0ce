"""Issue 13 item 5 in the builders: an Adapter's source.credentialsSecretRef reaches the replica. The serving
table names the Secret per adapter, and the engine pod mounts each referenced Secret read-only in the loader
(optional, so a missing one fails its adapter, not the pod); vLLM never sees adapter credentials."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

from loraplane.api.adapter import Adapter
from loraplane.api.modelroute import ModelRoute
from loraplane.api.paths import ADAPTER_CREDENTIALS_ROOT
from loraplane.builders import engine_pod, modelroute, resolve
from loraplane.builders.settings import BuildSettings
from loraplane.loader.cli import add_loader_arguments

ROOT = Path(__file__).resolve().parents[3]
BASE = "Qwen/Qwen2.5-1.5B-Instruct"


def _route() -> ModelRoute:
    return ModelRoute.model_validate({
        "apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute", "metadata": {"name": "chat", "namespace": "ml"},
        "spec": {"baseModel": {"name": BASE}, "routes": [{"selector": {"matchLabels": {"team": "x"}}, "prefix": ""}]}})


def _adapter(name: str, uri: str, secret: dict | None) -> Adapter:
    source = {"uri": uri, **({"credentialsSecretRef": secret} if secret else {})}
    return Adapter.model_validate({
        "apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter",
        "metadata": {"name": name, "namespace": "ml", "labels": {"team": "x"}},
        "spec": {"baseModel": {"name": BASE}, "source": source, "version": "1"}})


def test_two_adapters_two_buckets_two_secrets_are_mounted_in_the_loader_only():
    route = _route()
    adapters = [_adapter("a", "s3://team-a/lora", {"name": "team-a-s3"}),
                _adapter("b", "s3://team-b/lora", {"name": "team-b-s3"}),
                _adapter("c", "hf://org/private-lora@v1", {"name": "hf-adapter-token", "key": "token"}),
                _adapter("d", "hf://org/public-lora", None),
                _adapter("e", "s3://team-a/other", {"name": "team-a-s3"})]
    table = resolve(route, adapters).table
    by_name = {a.adapter: a for a in table.adapters}
    assert (by_name["a"].credentials_secret, by_name["b"].credentials_secret) == ("team-a-s3", "team-b-s3")
    assert (by_name["c"].credentials_secret, by_name["c"].credentials_key) == ("hf-adapter-token", "token")
    assert by_name["d"].credentials_secret is None
    assert engine_pod.adapter_secrets(table) == ["hf-adapter-token", "team-a-s3", "team-b-s3"]

    pod = modelroute.engine_deployment(route, table, BuildSettings())["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for secret in ("team-a-s3", "team-b-s3", "hf-adapter-token"):
        vol = volumes[engine_pod.credentials_volume_name(secret)]
        assert vol["secret"] == {"secretName": secret, "optional": True}
    engine, loader = pod["containers"]
    loader_mounts = {m["mountPath"]: m for m in loader["volumeMounts"]}
    assert loader_mounts[f"{ADAPTER_CREDENTIALS_ROOT}/team-a-s3"]["readOnly"] is True
    assert not [m for m in engine["volumeMounts"] if m["mountPath"].startswith(ADAPTER_CREDENTIALS_ROOT)]
    # the loader reads them where they are mounted
    args = argparse.ArgumentParser()
    add_loader_arguments(args)
    parsed = args.parse_args(loader["command"][3:])
    assert parsed.credentials_root == ADAPTER_CREDENTIALS_ROOT


def test_a_long_or_dotted_secret_name_gets_a_valid_volume_name():
    for secret in ("a.b.c", "x" * 200):
        name = engine_pod.credentials_volume_name(secret)
        assert len(name) <= 63 and "." not in name
    assert engine_pod.credentials_volume_name("x" * 200) != engine_pod.credentials_volume_name("y" * 200)


def test_render_of_the_documented_adapter_shows_its_secret():
    """docs/examples/adapter.yaml with the example route: the rendered replica mounts Secret hf-token."""
    out = subprocess.run([sys.executable, "-m", "loraplane.cli", "render", "-f", "docs/examples/adapter.yaml",
                          "-f", "docs/examples/modelroute.yaml"], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(ROOT / "operator"), "PATH": "/usr/bin:/bin"}).stdout
    docs = list(yaml.safe_load_all(out))
    secrets = [v["secret"]["secretName"] for d in docs if d["kind"] == "Deployment"
               for v in d["spec"]["template"]["spec"].get("volumes", []) if "secret" in v]
    assert "hf-token" in secrets


def test_a_secret_key_that_is_not_a_kubernetes_key_is_refused_at_validation():
    """A key is a file name in the mounted Secret: `a/b` or `../x` would leave it. The API refuses what Kubernetes
    would never store as a key, naming the field, before anything renders or resolves it."""
    import pytest
    from pydantic import ValidationError

    from loraplane.api.validation import format_validation_error

    for key in ("a/b", "../token", ""):
        with pytest.raises(ValidationError) as info:
            _adapter("x", "hf://org/r", {"name": "s", "key": key})
        assert "credentialsSecretRef.key" in format_validation_error(info.value, "")
    assert _adapter("x", "hf://org/r", {"name": "s", "key": "hf_token.v2"}).spec.source.credentials_secret_ref.key
