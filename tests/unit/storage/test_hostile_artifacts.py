"""Hostile artifacts (issue 12, item 4): each is refused promptly, by name, before it fills disk or memory.

Every artifact is built here, tiny, in a tmp dir: a sparse tar member and a header claiming gigabytes, a gzip
bomb, too many members, an oversized pax header, device/FIFO/link members, and local sources holding a symlink
to /dev/zero, a FIFO or a link outside. Before the fix the cache unpacked or copied them (a sparse 2 GiB file
hashed in full, /dev/zero copied forever, a FIFO blocked on).
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import time
from pathlib import Path

import pytest

from support.adapters import write_adapter
from loraplane.api.reasons import Reason
from loraplane.storage.archive import ArtifactLimits
from loraplane.storage.cache import ArtifactCache, FetchError

pytestmark = pytest.mark.timeout(60)   # the old code hashed gigabytes or blocked: fail, do not hang
MiB = 1 << 20
LIMITS = ArtifactLimits(max_members=50, max_member_bytes=4 * MiB, max_total_bytes=8 * MiB)


@pytest.fixture
def cache(tmp_path) -> ArtifactCache:
    return ArtifactCache(tmp_path / "cache", max_bytes=10**9, pvc_root=str(tmp_path / "pvc"), limits=LIMITS)


def _adapter_members(tar: tarfile.TarFile, tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "adapter-src")
    tar.add(src / "adapter_config.json", arcname="adapter_config.json")


def _header(info: tarfile.TarInfo, **patch: tuple[int, bytes]) -> bytes:
    """A GNU header block for `info` with byte ranges replaced (offset, bytes) and the checksum recomputed."""
    block = bytearray(info.tobuf(format=tarfile.GNU_FORMAT)[:512])
    for offset, data in patch.values():
        block[offset:offset + len(data)] = data
    block[148:156] = b" " * 8
    block[148:155] = b"%06o\0" % sum(block)
    return bytes(block)


def _sparse_tar(tmp_path: Path, real_size: int) -> bytes:
    """A gzipped tar with adapter_config.json and a GNU sparse 'adapter_model.safetensors' of `real_size`
    bytes whose one data byte sits at the end: a few hundred bytes on the wire."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        _adapter_members(tar, tmp_path)
        end = buf.tell()
    raw = bytearray(buf.getvalue()[:end])
    info = tarfile.TarInfo("adapter_model.safetensors")
    info.type, info.size = tarfile.GNUTYPE_SPARSE, 1
    sparse_map = tarfile.itn(real_size - 1, 12, tarfile.GNU_FORMAT) + tarfile.itn(1, 12, tarfile.GNU_FORMAT)
    raw += _header(info, sparse=(386, sparse_map), realsize=(483, tarfile.itn(real_size, 12, tarfile.GNU_FORMAT)))
    raw += b"x" + b"\0" * 511 + b"\0" * 1024
    return gzip.compress(bytes(raw))


async def _refused(cache: ArtifactCache, uri: str, reason: Reason, needle: str = "") -> FetchError:
    started = time.monotonic()
    with pytest.raises(FetchError) as info:
        await cache.fetch(uri)
    assert time.monotonic() - started < 5, "refused, but not promptly"
    assert info.value.reason == reason, str(info.value)
    assert needle in str(info.value)
    assert not [p for p in cache.root.iterdir()], "nothing of a refused artifact stays in the cache"
    return info.value


async def test_sparse_member_counts_with_its_real_size(tmp_path, cache):
    archive = tmp_path / "sparse.tar.gz"
    archive.write_bytes(_sparse_tar(tmp_path, 2 << 30))   # 2 GiB on disk and in the digest, < 1 KB here
    assert archive.stat().st_size < 1024
    await _refused(cache, str(archive), Reason.ArtifactTooLarge, "2147483648")


async def test_member_header_claiming_a_huge_size_is_refused_before_its_data(tmp_path, cache):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        _adapter_members(tar, tmp_path)
        end = buf.tell()
    info = tarfile.TarInfo("adapter_model.safetensors")
    info.size = 1 << 40   # 1 TiB claimed, nothing follows
    archive = tmp_path / "liar.tar"
    archive.write_bytes(buf.getvalue()[:end] + info.tobuf(format=tarfile.GNU_FORMAT))
    await _refused(cache, str(archive), Reason.ArtifactTooLarge, "adapter_model.safetensors")


async def test_gzip_bomb_and_member_count(tmp_path, cache):
    # 64 MiB of zeros in one member: about 64 KB gzipped (a ratio of 1000), over the 4 MiB member limit.
    bomb = io.BytesIO()
    with gzip.GzipFile(fileobj=bomb, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        info = tarfile.TarInfo("adapter_model.safetensors")
        info.size = 64 * MiB
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    assert len(bomb.getvalue()) < 200_000
    (tmp_path / "bomb.tar.gz").write_bytes(bomb.getvalue())
    await _refused(cache, str(tmp_path / "bomb.tar.gz"), Reason.ArtifactTooLarge)
    # Many members, each small: the total and the count are bounded too.
    many = io.BytesIO()
    with tarfile.open(fileobj=many, mode="w:gz") as tar:
        for i in range(200):
            info = tarfile.TarInfo(f"f{i}")
            tar.addfile(info, io.BytesIO(b""))
    (tmp_path / "many.tar.gz").write_bytes(many.getvalue())
    await _refused(cache, str(tmp_path / "many.tar.gz"), Reason.ArtifactTooLarge, "more than 50 members")
    # A pax header of 8 MiB (gzip makes it small) is never read into memory.
    pax = io.BytesIO()
    with tarfile.open(fileobj=pax, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("adapter_config.json")
        info.pax_headers = {"comment": "x" * (8 * MiB)}
        tar.addfile(info, io.BytesIO(b""))
    (tmp_path / "pax.tar.gz").write_bytes(pax.getvalue())
    await _refused(cache, str(tmp_path / "pax.tar.gz"), Reason.ArtifactTooLarge)


@pytest.mark.parametrize("kind", ["chr", "fifo", "symlink-dev-zero", "symlink-outside", "hardlink-outside",
                                  "dotdot", "absolute"])
async def test_special_and_escaping_members_are_refused(tmp_path, cache, kind):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        _adapter_members(tar, tmp_path)
        info = tarfile.TarInfo("adapter_model.safetensors")
        if kind == "chr":
            info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 5   # /dev/zero
        elif kind == "fifo":
            info.type = tarfile.FIFOTYPE
        elif kind == "symlink-dev-zero":
            info.type, info.linkname = tarfile.SYMTYPE, "/dev/zero"
        elif kind == "symlink-outside":
            info.type, info.linkname = tarfile.SYMTYPE, "../../../../etc/hostname"
        elif kind == "hardlink-outside":
            info.type, info.linkname = tarfile.LNKTYPE, "/etc/hostname"
        elif kind == "dotdot":
            info.name = "../escape"
        else:
            info.name = "/tmp/escape"
        tar.addfile(info, io.BytesIO(b""))
    (tmp_path / "a.tar").write_bytes(buf.getvalue())
    await _refused(cache, str(tmp_path / "a.tar"), Reason.UnsafeArtifact)
    assert not (tmp_path / "escape").exists()


async def test_local_source_with_links_and_special_files_is_refused(tmp_path, cache):
    src = write_adapter(tmp_path / "zero")
    (src / "adapter_model.safetensors").unlink()
    (src / "adapter_model.safetensors").symlink_to("/dev/zero")
    await _refused(cache, str(src), Reason.UnsafeArtifact, "/dev/zero")

    outside = write_adapter(tmp_path / "outside")
    (outside / "extra.json").symlink_to("/etc/hostname")
    await _refused(cache, f"file://{outside}", Reason.UnsafeArtifact, "outside the artifact")

    fifo = write_adapter(tmp_path / "pvc" / "claim" / "fifo")
    os.mkfifo(fifo / "README.md")   # opening it would block the loader forever
    await _refused(cache, "pvc://claim/fifo", Reason.UnsafeArtifact, "FIFO")

    # A source that IS a directory of device files (source.uri: /dev).
    await _refused(cache, "/dev", Reason.UnsafeArtifact)

    # Links that stay inside the artifact and name a file are copied as that file.
    ok = write_adapter(tmp_path / "ok")
    (ok / "alias.json").symlink_to(ok / "adapter_config.json")
    art = await cache.fetch(str(ok))
    assert (art.path / "alias.json").read_bytes() == (ok / "adapter_config.json").read_bytes()
    assert not (art.path / "alias.json").is_symlink()


async def test_local_tree_over_the_limits(tmp_path, cache):
    big = write_adapter(tmp_path / "big")
    with open(big / "padding.bin", "wb") as fh:
        fh.truncate(64 * MiB)   # sparse on disk, 64 MiB to read
    await _refused(cache, str(big), Reason.ArtifactTooLarge, "padding.bin")
    many = write_adapter(tmp_path / "many")
    for i in range(60):
        (many / f"f{i}").write_bytes(b"")
    await _refused(cache, str(many), Reason.ArtifactTooLarge, "more than 50")


async def test_an_unpinned_source_that_turns_hostile_is_not_read(tmp_path, cache):
    src = write_adapter(tmp_path / "src")
    await cache.fetch(str(src))
    (src / "extra.bin").symlink_to("/dev/zero")   # rewritten in place after the first fetch
    with pytest.raises(FetchError) as info:
        await cache.fetch(str(src))
    assert info.value.reason == Reason.UnsafeArtifact


async def test_a_hard_link_to_a_missing_member_is_invalid_not_retried(tmp_path, cache):
    """Issue 12 review: tarfile's fallback for a hard link whose target is not in the archive raises KeyError,
    which unpack_archive let through: the loader's catch-all retried (re-downloaded) it as an unknown error.
    It is the artifact's fault: InvalidAdapter, terminal, naming the archive."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        _adapter_members(tar, tmp_path)
        link = tarfile.TarInfo("adapter_model.safetensors")
        link.type, link.linkname = tarfile.LNKTYPE, "not-in-the-archive"
        tar.addfile(link)
    (tmp_path / "a.tar").write_bytes(buf.getvalue())
    error = await _refused(cache, str(tmp_path / "a.tar"), Reason.InvalidAdapter, "a.tar")
    assert error.retryable is False
