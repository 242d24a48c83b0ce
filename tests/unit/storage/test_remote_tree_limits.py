"""Remote trees obey the artifact limits before they fill the disk (attack round on the loader's fetchers).

Archives, local and pvc:// trees were bounded (test_hostile_artifacts), but an s3:// prefix and an hf:// repo were
downloaded whole: every object, however many and however large, into the replica's disk, then copied into the
cache. Now the store's own listing (S3 ListObjectsV2 sizes, the Hub's file metadata) is checked against the
cache's limits first, and what was written is checked again (a store answering with more than it listed).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from loraplane.api.reasons import Reason
from loraplane.storage.archive import ArtifactLimits
from loraplane.storage.cache import ArtifactCache, FetchError
from loraplane.storage.fetchers import FetchPolicy
from loraplane.storage.fetchers.s3 import S3Fetcher

pytestmark = pytest.mark.timeout(60)
LIMITS = ArtifactLimits(max_members=5, max_member_bytes=1000, max_total_bytes=1000)


@pytest.fixture
def cache(tmp_path) -> ArtifactCache:
    return ArtifactCache(tmp_path / "cache", max_bytes=1 << 30, limits=LIMITS,
                         policy=FetchPolicy(allow_insecure_http=True))


def _downloads(monkeypatch) -> list[str]:
    """The keys S3Fetcher downloads (spied on; they still download)."""
    seen: list[str] = []
    real = S3Fetcher.client.fget

    class Spy:
        def __init__(self, client):
            self._client = client

        def __getattr__(self, name):
            return getattr(self._client, name)

        def download_file(self, bucket, key, path, *args, **kwargs):
            seen.append(key)
            return self._client.download_file(bucket, key, path, *args, **kwargs)

    monkeypatch.setattr(S3Fetcher, "client", property(lambda self: Spy(real(self))))
    return seen


async def test_an_s3_prefix_over_the_limits_is_refused_before_a_download(s3_env, cache, monkeypatch):
    client = s3_env.client()
    client.create_bucket(Bucket="wide")
    for i in range(LIMITS.max_members + 1):
        client.put_object(Bucket="wide", Key=f"many/f{i}", Body=b"x")
    client.put_object(Bucket="wide", Key="big/adapter_model.safetensors", Body=b"x" * (LIMITS.max_total_bytes + 1))
    downloads = _downloads(monkeypatch)
    for prefix, needle in (("many", f"{LIMITS.max_members + 1} files"), ("big", f"{LIMITS.max_total_bytes + 1} bytes")):
        with pytest.raises(FetchError) as info:
            await cache.fetch(f"s3://wide/{prefix}")
        assert info.value.reason == Reason.ArtifactTooLarge and needle in str(info.value), str(info.value)
    assert downloads == []
    # within the limits it is fetched as before
    client.put_object(Bucket="wide", Key="ok/adapter_config.json", Body=b"{}")
    assert (await cache.fetch("s3://wide/ok")).path.joinpath("adapter_config.json").read_text() == "{}"


async def test_an_s3_archive_over_the_limit_is_refused_before_its_download(s3_env, cache, monkeypatch):
    client = s3_env.client()
    client.create_bucket(Bucket="arch")
    client.put_object(Bucket="arch", Key="a.tar.gz", Body=b"x" * (LIMITS.max_total_bytes + 1))
    downloads = _downloads(monkeypatch)
    with pytest.raises(FetchError) as info:
        await cache.fetch("s3://arch/a.tar.gz")
    assert info.value.reason == Reason.ArtifactTooLarge and "the object" in str(info.value)
    assert downloads == []


def _snapshot(root: Path, files: int, size: int = 1) -> Path:
    root.mkdir(parents=True)
    (root / "adapter_config.json").write_text("{}")
    for i in range(files - 1):
        (root / f"f{i}").write_bytes(b"x" * size)
    return root


async def test_an_hf_repo_over_the_limits_is_refused(cache, monkeypatch, tmp_path):
    import huggingface_hub

    # Online: the Hub's file list says too much: nothing is downloaded.
    def listing(self, repo, revision=None, files_metadata=False, token=None):
        assert files_metadata
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=f"f{i}", size=10) for i in range(50)])

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", listing)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda *a, **k: pytest.fail("downloaded a repository over the limits"))
    with pytest.raises(FetchError) as info:
        await cache.fetch("hf://org/wide-lora")
    assert info.value.reason == Reason.ArtifactTooLarge and "the repository has 50 files" in str(info.value)

    # Offline (a cache someone else filled), or a repo grown since it was listed: the snapshot is checked.
    snapshots = {"wide": _snapshot(tmp_path / "wide", LIMITS.max_members + 1),
                 "big": _snapshot(tmp_path / "big", 2, LIMITS.max_total_bytes + 1),
                 "ok": _snapshot(tmp_path / "ok", 2)}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **k: str(snapshots[repo.split("/")[1]]))
    for name in ("wide", "big"):
        with pytest.raises(FetchError) as info:
            await cache.fetch(f"hf://org/{name}")
        assert info.value.reason == Reason.ArtifactTooLarge and "the snapshot" in str(info.value), name
    assert (await cache.fetch("hf://org/ok")).path.joinpath("adapter_config.json").read_text() == "{}"


def test_an_hf_repo_in_the_local_cache_is_fetched_while_the_hub_is_down(tmp_path):
    """Attack round 3: the Hub listing that bounds a repo before its download (model_info) must not fail the
    fetch when the Hub cannot be reached. snapshot_download serves the replica's cached snapshot then (and the
    snapshot is still bounded); the listing raised the HTTP client's ConnectError instead, out of the cache as no
    FetchError, so an adapter already cached could not be loaded during a Hub outage. Run in a subprocess:
    huggingface_hub reads HF_HOME and HF_ENDPOINT when it is imported."""
    import socket
    import subprocess
    import sys

    import loraplane

    with socket.socket() as s:   # a port nothing listens on: the connection is refused, as with the Hub down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = tmp_path / "hf" / "hub" / "models--org--cached-lora"
    (repo / "snapshots" / ("a" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("a" * 40) / "adapter_config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    code = (
        "import asyncio, sys\n"
        "from loraplane.storage.archive import ArtifactLimits\n"
        "from loraplane.storage.cache import ArtifactCache\n"
        f"cache = ArtifactCache({str(tmp_path / 'cache')!r}, max_bytes=1 << 30, limits=ArtifactLimits(5, 1000, 1000))\n"
        "print(asyncio.run(cache.fetch('hf://org/cached-lora')).path.joinpath('adapter_config.json').read_text())\n")
    env = {"PYTHONPATH": str(Path(loraplane.__file__).resolve().parents[1]), "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_DISABLE_TELEMETRY": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "{}", done.stderr[-2000:]


def test_an_hf_repo_neither_cached_nor_reachable_is_said_to_be_unreachable_not_offline(tmp_path):
    """With the Hub down and the repo not in the local cache, snapshot_download raises LocalEntryNotFoundError,
    the error it also raises in offline mode; the loader said "HF_HUB_OFFLINE is set" though it was not, sending
    the user to the wrong setting. Online, it is a failure a retry may fix, said as such."""
    import socket
    import subprocess
    import sys

    import loraplane

    with socket.socket() as s:   # a port nothing listens on: the connection is refused, as with the Hub down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import asyncio\n"
        "from loraplane.storage.archive import ArtifactLimits\n"
        "from loraplane.storage.cache import ArtifactCache, FetchError\n"
        f"cache = ArtifactCache({str(tmp_path / 'cache')!r}, max_bytes=1 << 30, limits=ArtifactLimits(5, 1000, 1000))\n"
        "try:\n"
        "    asyncio.run(cache.fetch('hf://org/not-cached'))\n"
        "except FetchError as exc:\n"
        "    print(exc)\n")
    env = {"PYTHONPATH": str(Path(loraplane.__file__).resolve().parents[1]), "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_DISABLE_TELEMETRY": "1", "PATH": "/usr/bin:/bin",
           "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50, env=env)
    said = done.stdout.strip()
    assert done.returncode == 0 and "could not be reached" in said and "HF_HUB_OFFLINE" not in said, (
        said, done.stderr[-2000:])


def test_an_s3_prefix_of_millions_of_objects_is_refused_without_listing_them_all(tmp_path):
    """Attack round 3: the prefix's listing was checked only once complete: a prefix of millions of objects cost
    thousands of ListObjectsV2 requests (minutes) and every key in memory before the refusal. The listing stops
    at the first page past the file limit."""
    from loraplane.storage.errors import TooLarge
    from loraplane.storage.uri import parse_uri

    pages_read = []

    class Paginator:
        def paginate(self, Bucket, Prefix):
            for n in range(50):   # 50,000 objects, 1,000 a page as S3 lists them
                pages_read.append(n)
                yield {"Contents": [{"Key": f"{Prefix}f{n}-{i}", "Size": 1} for i in range(1000)]}

    client = SimpleNamespace(get_paginator=lambda name: Paginator(),
                             download_file=lambda *a: pytest.fail("downloaded from a prefix over the limits"))
    fetcher = S3Fetcher(client, policy=FetchPolicy(max_files=LIMITS.max_members, max_bytes=LIMITS.max_total_bytes))
    with pytest.raises(TooLarge, match="too many files|has 1000 files"):
        fetcher.fetch_tree(parse_uri("s3://huge/adapter"), tmp_path / "dest")
    assert len(pages_read) == 1
