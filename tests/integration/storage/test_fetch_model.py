"""`loraplane fetch-model` (the engine pod's init container) fetching the real tiny model.

MOCK S3: moto's S3 server stands in for S3 (none can exist here); the command uses its real boto3 client.
The https:// path is served by a real local HTTP server."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from loraplane.storage.digest import sha256_dir
from loraplane.storage.cache import fetched_model_path


def fetch(uri: str, cache: Path, tmp_path: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraplane.cli", "fetch-model", uri, "--cache-dir", str(cache),
                           *extra], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env, "LORAPLANE_TERMINATION_LOG": str(tmp_path / "termination-log")})


def test_fetch_model_from_s3_is_verified_and_idempotent(tiny_model_dir, s3_server, tmp_path):
    client = s3_server.client()
    client.create_bucket(Bucket="models")
    for f in sorted(p for p in Path(tiny_model_dir).rglob("*") if p.is_file()):
        client.upload_file(str(f), "models", f"tiny/{f.relative_to(tiny_model_dir).as_posix()}")
    cache = tmp_path / "models" / "fetched"
    uri = "s3://models/tiny/"
    # The stand-in is plain http on loopback: the S3 endpoint passes the fetch policy only with the opt-in.
    refused = fetch(uri, cache, tmp_path, s3_server.env)
    assert refused.returncode == 1 and "AWS_ENDPOINT_URL" in refused.stderr and "allowInsecureHttp" in refused.stderr
    done = fetch(uri, cache, tmp_path, s3_server.env, "--allow-insecure-http")
    assert done.returncode == 0, done.stderr
    where = fetched_model_path(cache, uri)
    assert sha256_dir(where) == sha256_dir(tiny_model_dir)  # byte for byte what was uploaded
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(where).model_type == AutoConfig.from_pretrained(tiny_model_dir).model_type
    # A restarted init container finds the verified copy and downloads nothing (the bucket is gone).
    client.delete_objects(Bucket="models", Delete={"Objects": [{"Key": k} for k in s3_server.keys("models")]})
    again = fetch(uri, cache, tmp_path, s3_server.env, "--allow-insecure-http", "--sha256", sha256_dir(tiny_model_dir))
    assert again.returncode == 0, again.stderr


def test_fetch_model_failures_say_what_to_fix(tiny_model_dir, s3_server, tmp_path):
    s3_server.client().create_bucket(Bucket="empty")
    done = fetch("s3://empty/llama/", tmp_path / "cache", tmp_path, s3_server.env, "--allow-insecure-http")
    assert done.returncode == 1
    written = json.loads((tmp_path / "termination-log").read_text())  # the trainer's form: reason + message
    assert written["reason"] == "ModelFetchFailed"
    message = written["message"]
    assert "spec.baseModel.uri s3://empty/llama/" in message and "no objects under that prefix" in message
    assert "credentialsSecretRef" in message
    # An adapter directory is not a base model.
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    done = fetch(str(tmp_path / "adapter"), tmp_path / "cache", tmp_path, {})
    assert done.returncode == 1 and "no config.json" in (tmp_path / "termination-log").read_text()


def test_fetch_model_from_an_https_archive(tiny_model_dir, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    with tarfile.open(site / "tiny.tar.gz", "w:gz") as tar:
        tar.add(tiny_model_dir, arcname="tiny")  # one top folder, as `tar czf tiny.tar.gz tiny/` makes
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(site), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_port}/tiny.tar.gz"
        # Plain http on loopback is refused unless the route's operator opted in (chart allowInsecureHttp).
        refused = fetch(uri, tmp_path / "cache", tmp_path, {})
        assert refused.returncode == 1 and "allowInsecureHttp" in refused.stderr
        done = fetch(uri, tmp_path / "cache", tmp_path, {}, "--allow-insecure-http")
        assert done.returncode == 0, done.stderr
        assert sha256_dir(fetched_model_path(tmp_path / "cache", uri)) == sha256_dir(tiny_model_dir)
    finally:
        server.shutdown()


@pytest.fixture(autouse=True)
def _quiet_http(monkeypatch):
    monkeypatch.setattr(http.server.SimpleHTTPRequestHandler, "log_message", lambda *a: None)
