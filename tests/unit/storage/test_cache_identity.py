"""Issue 13 items 4a and 5, at the storage layer: cache entries are keyed by the artifact's identity (URI +
version + digest), a cache hit is verified again, each fetch uses its own credentials, and a refusal of the
credentials is terminal (FetchAccessDenied, reason AccessDenied) on the first attempt."""

from __future__ import annotations

import contextlib
import io
import tarfile
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from loraplane.api.reasons import Reason
from loraplane.storage.cache import ArtifactCache, FetchAccessDenied, FetchError
from loraplane.storage.credentials import Credentials, origin_of
from loraplane.storage.digest import sha256_dir
from loraplane.storage.errors import AccessDenied, NoCredentials
from loraplane.storage.fetchers import FetchPolicy, fetcher_for
from loraplane.storage.fetchers.hf import HfFetcher
from loraplane.storage.fetchers.s3 import S3Fetcher
from loraplane.storage.uri import cache_key, parse_uri
from support.adapters import write_adapter


def _tarball(src: Path, arcname: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src, arcname=arcname)
    return buf.getvalue()


@pytest.fixture
def cache(tmp_path) -> ArtifactCache:
    # Loopback over plain http stands in for the stores: the tests' explicit opt-in (FetchPolicy).
    return ArtifactCache(tmp_path / "cache", max_bytes=10**9, pvc_root=str(tmp_path / "pvc"),
                         policy=FetchPolicy(allow_insecure_http=True))


def test_cache_key_includes_version_and_digest_but_base_models_keep_the_uri_key():
    uri = "s3://b/adapters/x"
    assert cache_key(uri, "1") != cache_key(uri, "2") != cache_key(uri)
    assert cache_key(uri, "1", "a" * 64) != cache_key(uri, "1", "b" * 64)
    assert cache_key(uri, "1", "A" * 64) == cache_key(uri, "1", "a" * 64)
    assert cache_key(uri) == cache_key(uri, None, None)   # fetched_model_path's key is unchanged


async def test_two_versions_at_one_uri_never_share_or_swap_an_entry(tmp_path, cache):
    """Version 1 is loaded from its entry; version 2, published at the same URI (overwritten in place), gets
    an entry of its own, and version 1's files are not touched (before: one entry per URI, replaced)."""
    src = write_adapter(tmp_path / "src", seed=1)
    v1 = await cache.fetch(str(src), version="1")
    write_adapter(src, seed=2)                     # the store now holds version 2's weights at the same URI
    v2 = await cache.fetch(str(src), version="2")
    assert v2.path != v1.path and v2.sha256 != v1.sha256
    assert sha256_dir(v1.path) == v1.sha256          # what vLLM loaded version 1 from is unchanged
    assert v1.version == "1" and v2.version == "2"
    assert cache.lookup(str(src), "1").sha256 == v1.sha256


async def test_a_cache_hit_whose_files_changed_on_disk_is_fetched_again(tmp_path, cache):
    src = write_adapter(tmp_path / "src")
    digest = sha256_dir(src)
    art = await cache.fetch(str(src), digest, version="1")
    (art.path / "adapter_model.safetensors").write_bytes(b"tampered")
    again = await cache.fetch(str(src), digest, version="1")
    assert sha256_dir(again.path) == digest == again.sha256


@contextlib.asynccontextmanager
async def guarded(tmp_path):
    """An https-like store that serves the archive only with `Authorization: Bearer tok-a` (started in the
    test's own event loop: the fetch runs in a thread beside it)."""
    blob = _tarball(write_adapter(tmp_path / "src"), "adapter")
    seen: list[str | None] = []

    async def archive(request):
        seen.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != "Bearer tok-a":
            return web.Response(status=401)
        return web.Response(body=blob)

    app = web.Application()
    app.router.add_get("/a.tar.gz", archive)
    server = TestServer(app)
    await server.start_server()
    yield str(server.make_url("/a.tar.gz")), seen
    await server.close()


async def test_access_denied_is_terminal_and_names_the_credentials(tmp_path, cache, monkeypatch):
    async with guarded(tmp_path) as (url, seen):
        monkeypatch.setenv("HF_TOKEN", "tok-a")   # the environment's token is not this adapter's credentials
        with pytest.raises(FetchAccessDenied) as info:
            await cache.fetch(url)
        assert info.value.reason == Reason.AccessDenied and info.value.retryable is False
        assert "no source.credentialsSecretRef" in str(info.value) and seen == [None]
        with pytest.raises(FetchAccessDenied, match="Secret other-token"):
            await cache.fetch(url, credentials=Credentials("Secret other-token", {"HF_TOKEN": "wrong"},
                                                           frozenset({origin_of(url)})))
        art = await cache.fetch(url, credentials=Credentials("Secret adapter-token", {"HF_TOKEN": "tok-a"},
                                                             frozenset({origin_of(url)})))
        assert (art.path / "adapter_config.json").is_file()


async def test_credentials_read_from_a_mounted_secret(tmp_path, cache):
    async with guarded(tmp_path) as (url, _):
        whole = tmp_path / "secrets" / "adapter-token"
        whole.mkdir(parents=True)
        (whole / "HF_TOKEN").write_text("tok-a\n")
        unbound = Credentials.from_secret_dir(whole, "adapter-token", None, parse_uri(url))
        with pytest.raises(FetchError, match="ALLOWED_ORIGINS"):   # the Secret does not name this host
            await cache.fetch(url, credentials=unbound)
        (whole / "ALLOWED_ORIGINS").write_text(url.upper().replace("/A.TAR.GZ", "/"))  # case and path ignored
        creds = Credentials.from_secret_dir(whole, "adapter-token", None, parse_uri(url))
        assert creds.get("HF_TOKEN") == "tok-a" and "tok-a" not in repr(creds)
        one_key = tmp_path / "secrets" / "one-key"
        one_key.mkdir()
        (one_key / "token").write_text("tok-a")
        assert Credentials.from_secret_dir(one_key, "one-key", "token", parse_uri("hf://o/r")).get("HF_TOKEN") == "tok-a"
        s3_key = Credentials.from_secret_dir(one_key, "one-key", "token", parse_uri("s3://b/k"))
        assert s3_key.get("AWS_SECRET_ACCESS_KEY") == "tok-a"
        # a Secret that does not exist (optional volume: an empty or missing directory) gives no values
        missing = Credentials.from_secret_dir(tmp_path / "secrets" / "nope", "nope", None, parse_uri(url))
        assert missing.values == {} and missing.origin == "Secret nope"
        assert (await cache.fetch(url, credentials=creds)).sha256


def test_s3_uses_only_the_explicit_credentials(s3_env, monkeypatch, tmp_path):
    """Two adapters, two buckets, two Secrets: each client signs with its own keys, never the environment's."""
    client = s3_env.client()
    for bucket in ("team-a", "team-b"):
        client.create_bucket(Bucket=bucket)
        client.put_object(Bucket=bucket, Key="lora/adapter_config.json", Body=b"{}")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    a = Credentials("Secret a", {"AWS_ACCESS_KEY_ID": "key-a", "AWS_SECRET_ACCESS_KEY": "s-a"})
    b = Credentials("Secret b", {"AWS_ACCESS_KEY_ID": "key-b", "AWS_SECRET_ACCESS_KEY": "s-b"})
    local = FetchPolicy(allow_insecure_http=True)   # the stand-in is plain http on loopback
    fa, fb = (fetcher_for(parse_uri(f"s3://team-{x}/lora"), credentials=c, policy=local)
              for x, c in (("a", a), ("b", b)))
    assert isinstance(fa, S3Fetcher) and fa.client._request_signer._credentials.access_key == "key-a"
    assert fb.client._request_signer._credentials.access_key == "key-b"
    assert (fa.fetch_tree(parse_uri("s3://team-a/lora"), tmp_path / "a") / "adapter_config.json").is_file()
    # a Secret without AWS keys is refused by name, not filled in from the environment or the node's role
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    with pytest.raises(NoCredentials, match="Secret c has no AWS_ACCESS_KEY_ID"):
        S3Fetcher(credentials=Credentials("Secret c", {"HF_TOKEN": "x"})).fetch_tree(
            parse_uri("s3://team-a/lora"), tmp_path / "c")
    assert isinstance(NoCredentials("u", "d"), AccessDenied)


def test_hub_token_is_the_adapters_own(monkeypatch, tmp_path):
    """hf://: explicit credentials give their HF_TOKEN, or no token at all (False), never $HF_TOKEN."""
    import huggingface_hub

    tokens = []

    def fake_snapshot(repo, revision=None, local_files_only=False, token=None):
        tokens.append(token)
        (tmp_path / "snap").mkdir(exist_ok=True)
        (tmp_path / "snap" / "adapter_config.json").write_text("{}")
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setenv("HF_TOKEN", "env-token")
    uri = parse_uri("hf://org/private-lora@v1")
    HfFetcher(Credentials("Secret hf-adapter-token", {"HF_TOKEN": "own"})).fetch_tree(uri, tmp_path / "1")
    HfFetcher(Credentials("Secret empty", {})).fetch_tree(uri, tmp_path / "2")
    HfFetcher().fetch_tree(uri, tmp_path / "3")
    assert tokens == ["own", False, None]


async def test_a_hub_401_is_access_denied_on_the_first_attempt(monkeypatch, cache):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    class Resp:
        status_code = 401
        headers: dict = {}
        request = None

    def denied(*args, **kwargs):
        raise GatedRepoError("401 Client Error: gated repo", response=Resp())

    monkeypatch.setattr(huggingface_hub, "snapshot_download", denied)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", denied)   # the file list is asked for first
    with pytest.raises(FetchAccessDenied, match="Secret hf-adapter-token"):
        await cache.fetch("hf://org/private-lora@v1", version="1",
                          credentials=Credentials("Secret hf-adapter-token", {"HF_TOKEN": "bad"}))
    assert not isinstance(FetchError("x"), FetchAccessDenied)


async def test_a_digest_recorded_later_finds_the_entry_verified_without_it(tmp_path, cache):
    """The Adapter records the digest a replica first verified; the table then pins it. After an engine restart the
    replica reloads from its verified entry even though the source was overwritten meanwhile."""
    src = write_adapter(tmp_path / "src", seed=1)
    first = await cache.fetch(str(src), version="1")
    write_adapter(src, seed=2)                      # overwritten in place under the same version
    again = await cache.fetch(str(src), first.sha256, version="1")
    assert again.path == first.path and sha256_dir(again.path) == first.sha256


async def test_the_base_model_cache_keeps_one_entry_per_uri(tmp_path):
    """fetch-model leaves the model where vLLM's --model looks (fetched_model_path), with or without --sha256."""
    from loraplane.storage.cache import model_cache
    from loraplane.storage.uri import fetched_model_path

    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    art = await model_cache(tmp_path / "models").fetch(str(src), sha256_dir(src))
    assert art.path == fetched_model_path(tmp_path / "models", str(src))
