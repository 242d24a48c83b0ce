"""The artifact cache: verified, atomic, LRU-bounded copies of adapters from paths, PVCs and https archives."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from support.adapters import write_adapter
from loraplane.storage.digest import sha256_dir, sha256_file
from loraplane.storage.cache import ArtifactCache, ChecksumMismatch, FetchError, InvalidArtifact
from loraplane.storage.fetchers import FetchPolicy


@pytest.fixture
def cache(tmp_path) -> ArtifactCache:
    # The test servers listen on loopback over plain http: the tests opt in explicitly, as the quickstart does.
    return ArtifactCache(tmp_path / "cache", max_bytes=10**9, pvc_root=str(tmp_path / "pvc"),
                         policy=FetchPolicy(allow_insecure_http=True))


async def test_local_directory_is_copied_and_verified(tmp_path, cache):
    src = write_adapter(tmp_path / "src")
    art = await cache.fetch(str(src), sha256_dir(src))
    assert art.path.parent == cache.root and art.path != src
    assert sha256_dir(art.path) == art.sha256 == sha256_dir(src)
    assert (art.path / "adapter_config.json").is_file()
    # a second fetch is a cache hit (same entry, nothing rewritten)
    mtime = (art.path / "adapter_model.safetensors").stat().st_mtime_ns
    again = await cache.fetch(str(src), art.sha256)
    assert again.path == art.path and (again.path / "adapter_model.safetensors").stat().st_mtime_ns == mtime


async def test_checksum_mismatch_refuses_and_leaves_nothing(tmp_path, cache):
    src = write_adapter(tmp_path / "src")
    with pytest.raises(ChecksumMismatch, match="expected 0{64}"):
        await cache.fetch(str(src), "0" * 64)
    assert cache.lookup(str(src)) is None
    assert [p.name for p in cache.root.iterdir()] == []


async def test_unpinned_local_source_rewritten_in_place_is_fetched_again(tmp_path, cache):
    src = write_adapter(tmp_path / "src", seed=1)
    first = await cache.fetch(str(src))
    write_adapter(src, seed=2)
    second = await cache.fetch(str(src))
    assert second.sha256 != first.sha256 == first.sha256
    assert sha256_dir(second.path) == sha256_dir(src)


async def test_pvc_uri_reads_the_mounted_claim(tmp_path, cache):
    write_adapter(tmp_path / "pvc" / "adapters" / "run-1" / "final")
    art = await cache.fetch("pvc://adapters/run-1/final")
    assert (art.path / "adapter_config.json").is_file()
    with pytest.raises(FetchError, match="is the PVC mounted"):
        await cache.fetch("pvc://other/x")


async def test_not_an_adapter_is_invalid(tmp_path, cache):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.bin").write_bytes(b"x")
    with pytest.raises(InvalidArtifact, match="adapter_config.json"):
        await cache.fetch(str(tmp_path / "junk"))
    with pytest.raises(InvalidArtifact, match="scheme"):
        await cache.fetch("ftp://example.com/a")


def _tarball(src: Path, arcname: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src, arcname=arcname)
    return buf.getvalue()


async def test_https_archive_verified_by_archive_or_directory_digest(tmp_path, cache):
    src = write_adapter(tmp_path / "src")
    blob = _tarball(src, "my-adapter")
    (tmp_path / "blob.tar.gz").write_bytes(blob)
    app = web.Application()
    
    async def archive(request):
        return web.Response(body=blob)

    async def gone(request):
        return web.Response(status=404)

    app.router.add_get("/a.tar.gz", archive)
    app.router.add_get("/gone.tar.gz", gone)
    server = TestServer(app)   # a real HTTP server on a loopback port
    await server.start_server()
    url = str(server.make_url("/a.tar.gz"))

    art = await cache.fetch(url, sha256_file(tmp_path / "blob.tar.gz"))   # what `sha256sum a.tar.gz` prints
    assert art.sha256 == sha256_dir(src) and (art.path / "adapter_config.json").is_file()
    # the unpacked directory's digest is accepted too (another expected digest: an entry of its own, same files)
    assert sha256_dir((await cache.fetch(url, sha256_dir(src))).path) == art.sha256
    with pytest.raises(FetchError, match="HTTP 404"):
        await cache.fetch(str(server.make_url("/gone.tar.gz")))
    await server.close()


async def test_lru_eviction_keeps_protected_and_recent_entries(tmp_path):
    srcs = [write_adapter(tmp_path / f"s{i}", seed=i) for i in range(4)]
    size = sum(p.stat().st_size for p in srcs[0].iterdir())
    cache = ArtifactCache(tmp_path / "cache", max_bytes=int(size * 2.5))
    a0 = await cache.fetch(str(srcs[0]))
    await cache.fetch(str(srcs[1]))
    await cache.fetch(str(srcs[2]), protect={a0.path})   # s1 is the oldest unprotected: evicted
    assert cache.lookup(str(srcs[0])) and cache.lookup(str(srcs[2])) and not cache.lookup(str(srcs[1]))
    await cache.fetch(str(srcs[3]))                         # nothing protected now: s0 (oldest) goes
    assert not cache.lookup(str(srcs[0])) and cache.lookup(str(srcs[3]))
    assert cache.total_bytes() <= cache.max_bytes


def test_partial_entries_from_a_crash_are_removed(tmp_path):
    root = tmp_path / "cache"
    (root / ".tmp-abc" / "src").mkdir(parents=True)
    (root / "deadbeef").mkdir()            # an entry whose metadata was never written
    (root / "cafe.meta.json").write_text(json.dumps({"path": str(root / "cafe")}))   # its entry is gone
    (root / "beef").mkdir()
    (root / "beef.meta.json").write_text(json.dumps({"not": "complete"}))          # unreadable metadata
    cache = ArtifactCache(root, max_bytes=10**9)
    assert sorted(p.name for p in root.iterdir()) == ["beef", "beef.meta.json"]
    assert cache.entries() == [] and cache.lookup("anything") is None


async def test_hf_uri_offline_without_a_local_copy_fails_clearly(cache, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FetchError, match="HF_HUB_OFFLINE"):
        await cache.fetch("hf://someone/some-adapter@main")
