"""Link amplification (review p4): one in-limit file plus thousands of links to it (symlinks or hard links, in an
archive or a local/PVC directory) must cost one file, not thousands.

Before the fix the archive check counted only regular members and digest/cache followed every link: a 16 KiB
archive made the loader hash N x the limit and record size_bytes = N x the file, so evict() threw out every other
adapter. Hugging Face cache layouts (relative symlinks from snapshots/ into blobs/) must keep working, with the
digest they had.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

import loraplane.storage.digest as digest_mod
from loraplane.api.reasons import Reason
from loraplane.storage.archive import ArtifactLimits
from loraplane.storage.cache import ArtifactCache, FetchError
from loraplane.storage.digest import directory_size, sha256_dir
from support.adapters import write_adapter

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20
LIMITS = ArtifactLimits(max_members=5000, max_member_bytes=4 * MiB, max_total_bytes=8 * MiB)
LINKS = 1500


@pytest.fixture
def cache(tmp_path) -> ArtifactCache:
    return ArtifactCache(tmp_path / "cache", max_bytes=8 * MiB, pvc_root=str(tmp_path / "pvc"), limits=LIMITS)


@pytest.fixture
def reads(monkeypatch) -> list[int]:
    """The size of every file sha256_dir reads in full."""
    seen: list[int] = []
    real = digest_mod.sha256_file

    def counting(path):
        seen.append(Path(path).stat().st_size)
        return real(path)

    monkeypatch.setattr(digest_mod, "sha256_file", counting)
    return seen


def _tar(tmp_path: Path, link_type: bytes, size: int = 3 * MiB) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        config = b'{"peft_type": "LORA"}'
        info = tarfile.TarInfo("adapter_config.json")
        info.size = len(config)
        tar.addfile(info, io.BytesIO(config))
        info = tarfile.TarInfo("w.bin")
        info.size = size
        tar.addfile(info, io.BytesIO(bytes(size)))
        for i in range(LINKS):
            info = tarfile.TarInfo(f"l{i}")
            info.type, info.linkname = link_type, "w.bin"
            tar.addfile(info)
    path = tmp_path / "evil.tar.gz"
    path.write_bytes(buf.getvalue())
    return path


async def _two_honest(tmp_path: Path, cache: ArtifactCache) -> list[str]:
    uris = []
    for name in ("good1", "good2"):
        src = write_adapter(tmp_path / name)
        (src / "adapter_model.safetensors").write_bytes(os.urandom(MiB))
        uris.append(str(src))
        await cache.fetch(str(src))
    return uris


async def test_symlink_members_are_read_and_counted_once(tmp_path, cache, reads):
    honest = await _two_honest(tmp_path, cache)
    reads.clear()
    art = await cache.fetch(str(_tar(tmp_path, tarfile.SYMTYPE)))
    assert art.size_bytes < 4 * MiB                       # the file once, not 1500 times
    assert sum(reads) < 4 * MiB    # and hashed once
    assert {a.uri for _, a, _ in cache.entries()} >= set(honest)   # nothing evicted for it


async def test_hard_link_members_count_as_copies(tmp_path, cache):
    await _two_honest(tmp_path, cache)
    with pytest.raises(FetchError) as info:
        await cache.fetch(str(_tar(tmp_path, tarfile.LNKTYPE)))
    assert info.value.reason == Reason.ArtifactTooLarge


async def test_local_directory_of_links_is_copied_once(tmp_path, cache, reads):
    honest = await _two_honest(tmp_path, cache)
    src = write_adapter(tmp_path / "links")
    (src / "w.bin").write_bytes(bytes(3 * MiB))
    for i in range(LINKS // 2):
        (src / f"s{i}").symlink_to("w.bin")
        os.link(src / "w.bin", src / f"h{i}")
    reads.clear()
    art = await cache.fetch(str(src))
    assert art.size_bytes < 4 * MiB
    assert sum(reads) < 8 * MiB   # the copy (and the source, re-hashed) once each
    assert (art.path / "s7").read_bytes() == bytes(3 * MiB)
    assert {a.uri for _, a, _ in cache.entries()} >= set(honest)


def _old_sha256_dir(root: Path) -> str:
    """The digest as defined before the fix (every link followed): an HF cache layout must keep it."""
    files = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())
    h = hashlib.sha256()
    for p in files:
        h.update(f"{hashlib.sha256(p.read_bytes()).hexdigest()} {p.relative_to(root).as_posix()}\n".encode())
    return h.hexdigest()


async def test_hugging_face_cache_layout_keeps_working(tmp_path, cache):
    # The adapter's files are relative symlinks into a blob store, as in a Hugging Face cache snapshot.
    repo = tmp_path / "models--org--adapter"
    blobs = repo / ".blobs"
    blobs.mkdir(parents=True)
    for name, data in (("adapter_config.json", b'{"peft_type": "LORA"}'), ("adapter_model.safetensors", b"w" * 99)):
        blob = hashlib.sha256(data).hexdigest()
        (blobs / blob).write_bytes(data)
        (repo / name).symlink_to(f".blobs/{blob}")
    expected = _old_sha256_dir(repo)
    assert sha256_dir(repo) == expected
    assert directory_size(repo) == 21 + 99
    archive = tmp_path / "hf.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(repo, arcname="models--org--adapter")
    art = await cache.fetch(str(archive))
    assert (art.path / "adapter_model.safetensors").read_bytes() == b"w" * 99
    assert art.sha256 == expected
    assert (await cache.fetch(str(repo))).sha256 == expected   # the same tree from a local directory
