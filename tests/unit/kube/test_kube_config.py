"""loraplane.kube.config: which credential source wins, and that a token is read again on reload."""

from __future__ import annotations

import pytest
import yaml

from loraplane.kube.config import ConfigException, KubeConfig


def write_kubeconfig(path, token_file, server="https://10.0.0.1:6443"):
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"tokenFile": str(token_file)}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}))
    return path


async def test_explicit_kubeconfig_wins_and_a_reload_reads_the_token_again(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")   # an in-cluster environment, overridden
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    token = tmp_path / "token"
    token.write_text("first")
    config = KubeConfig.from_environment(write_kubeconfig(tmp_path / "kc", token))
    cfg = await config.configuration()
    assert (cfg.host, cfg.verify_ssl) == ("https://10.0.0.1:6443", False)
    assert await config.authorization() == "Bearer first"
    token.write_text("rotated")
    await config.reload()                                        # what the client does after an HTTP 401
    assert await config.authorization() == "Bearer rotated"


def test_default_kubeconfig_outside_a_cluster_and_a_clear_error_without_any(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kc", tmp_path / "token")))
    assert KubeConfig.from_environment().source.startswith("kubeconfig ")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(ConfigException, match="no in-cluster service account and no kubeconfig"):
        KubeConfig.from_environment()
