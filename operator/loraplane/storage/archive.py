"""Turning an untrusted artifact into a directory without letting it take the machine down.

An artifact (an Adapter's `source.uri`, a base model's `uri`) is written by whoever can create the object or
the store behind it, and one hostile artifact must not crash or evict every replica of a shared route. Both
ways an artifact becomes a directory go through here:

- `unpack_archive`: a .tar/.tar.gz/.tgz (also bzip2/xz). Python's tarfile extraction filter "data" (PEP 706)
  refuses absolute and '..' paths, device files, FIFOs and links leaving the destination; on top of it every
  member header is checked *before* its data is read against `ArtifactLimits` (member count, a member's size,
  the total unpacked size; a sparse member counts with its real, expanded size, which tarfile reports as
  `TarInfo.size`), and the decompressed stream is bounded as a whole and per read, so a gzip bomb, a header
  claiming terabytes or a huge pax/long-name header stops at the limit instead of filling disk or memory.
- `copy_tree`: a local or PVC directory. It is walked without following links: a device file, FIFO or socket
  is refused, a symlink must resolve inside the directory to a regular file (copied as that file), and each
  file is opened with O_NOFOLLOW and checked with fstat (a file swapped for a link or a FIFO after the walk is
  refused, not followed or blocked on); the same limits apply to what is copied. Each source file (inode) is
  read and counted once: its other names (symlinks, hard links) become hard links to the one copy, so a
  directory of thousands of links to one file costs one file, not thousands.

Hard-link members of an archive count against the total as copies of their target (tarfile copies when the
file system refuses a hard link); symlink members cost no bytes and are counted as members only.

Every refusal is a storage error naming the member and the rule: UnsafeContent or TooLarge (both
InvalidContent: retrying cannot help).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import stat
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from loraplane.storage.errors import InvalidContent, NotFound, TooLarge, Unavailable, UnsafeContent

GiB = 1 << 30
# The largest single read tarfile may make of the decompressed stream: member data is read in 16 KiB pieces,
# headers (512 bytes, pax records, GNU long names) in one read each; no honest header comes near 1 MiB.
MAX_READ = 1 << 20
_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArtifactLimits:
    """What one artifact may hold: `max_members` entries (files, directories, links), `max_member_bytes` per
    file and `max_total_bytes` in all (unpacked sizes, in bytes). The adapter cache also caps the total at its
    own size; `ADAPTER_LIMITS` and `MODEL_LIMITS` are the defaults of the two caches."""

    max_members: int = 10_000
    max_member_bytes: int = 8 * GiB
    max_total_bytes: int = 8 * GiB

    def at_most(self, total_bytes: int) -> "ArtifactLimits":
        """These limits with the total (and each member) capped at `total_bytes`."""
        cap = min(self.max_total_bytes, total_bytes)
        return ArtifactLimits(self.max_members, min(self.max_member_bytes, cap), cap)


# LoRA adapters are megabytes to a few GiB (rank 256 on a 70B model in float32 is about 7 GiB).
ADAPTER_LIMITS = ArtifactLimits()
# A base model is the route owner's own artifact: large (hundreds of GiB), but still bounded.
MODEL_LIMITS = ArtifactLimits(max_members=100_000, max_member_bytes=1 << 40, max_total_bytes=4 << 40)


def _kind(mode: int) -> str:
    return ("a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")


class _BoundedStream:
    """The decompressed archive as tarfile reads it, refusing a read past `limit` bytes in all or one larger
    than MAX_READ (a header claiming a huge pax record or long name)."""

    def __init__(self, raw, limit: int, uri: str, name: str):
        self.raw, self.limit, self.uri, self.name = raw, limit, uri, name

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > MAX_READ:
            raise TooLarge(self.uri, "oversized header",
                           f"{self.name}: a member header asks for a read of {size} bytes (at most {MAX_READ})")
        data = self.raw.read(size)
        if self.raw.tell() > self.limit:
            raise TooLarge(self.uri, "archive too large",
                           f"{self.name} unpacks to more than {self.limit} bytes (the artifact limit)")
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def seekable(self) -> bool:
        return True


def _decompressed(fh):
    """The file's decompressed stream, by magic number (gzip, bzip2, xz or a plain tar)."""
    magic = fh.read(6)
    fh.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=fh, mode="rb")
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(fh)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(fh)
    return fh


def _checked_members(tar: tarfile.TarFile, limits: ArtifactLimits, uri: str, name: str) -> Iterator[tarfile.TarInfo]:
    """The archive's members, read one header at a time, each checked before tarfile touches its data."""
    count = total = 0
    sizes: dict[str, int] = {}   # regular members by name: what a hard link to one of them unpacks to
    for member in tar:
        count += 1
        if count > limits.max_members:
            raise TooLarge(uri, "too many members",
                           f"{name} holds more than {limits.max_members} members (the artifact limit)")
        if member.name.startswith("/") or ".." in member.name.split("/"):
            raise UnsafeContent(uri, "path outside", f"{name}: member {member.name!r} is an absolute or '..' path; "
                                "an archive's paths are relative to its top")
        if member.ischr() or member.isblk() or member.isfifo() or not (member.isreg() or member.isdir()
                                                                        or member.issym() or member.islnk()):
            raise UnsafeContent(uri, "special file", f"{name}: member {member.name!r} is a device file, FIFO or "
                                "other special file; an artifact holds only files and directories")
        if member.isreg() or member.islnk():
            # For a sparse member tarfile reports the expanded size here (what would land on disk and be hashed).
            # A hard link counts as a copy of its target: where the file system refuses os.link, tarfile writes
            # one. (A symlink costs no bytes; digest and cache read and count each inode once.)
            size = member.size if member.isreg() else sizes.get(member.linkname.rstrip("/"), 0)
            if member.isreg():
                sizes[member.name.rstrip("/")] = size
            if size > limits.max_member_bytes:
                raise TooLarge(uri, "member too large", f"{name}: member {member.name!r} is {size} bytes "
                               f"unpacked (at most {limits.max_member_bytes})")
            total += size
            if total > limits.max_total_bytes:
                raise TooLarge(uri, "archive too large", f"{name} unpacks to more than {limits.max_total_bytes} "
                               "bytes (the artifact limit)")
        yield member


def unpack_archive(archive: Path, dest: Path, limits: ArtifactLimits, uri: str) -> None:
    """Unpack the tar `archive` (optionally gzip/bzip2/xz-compressed) into the new directory `dest`.

    Raises UnsafeContent for a member that is absolute, leaves `dest` ('..', a link pointing outside) or is a
    device file/FIFO; TooLarge past `limits` (see the module docstring); InvalidContent (as UnsafeContent's
    parent) for a file that is not a readable tar archive. `uri` is what messages name.
    """
    dest.mkdir(parents=True)
    name = archive.name
    # Slack for headers and padding: 512-byte blocks around each member, and the end-of-archive blocks.
    limit = limits.max_total_bytes + limits.max_members * 2048 + (1 << 20)
    try:
        fd = os.open(archive, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise NotFound(uri, str(exc), f"{name}: cannot open the archive: {exc}") from exc
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafeContent(uri, "not a regular file", f"{name} is {_kind(os.fstat(fd).st_mode)}")
        try:
            stream = _BoundedStream(_decompressed(fh), limit, uri, name)
            with tarfile.open(fileobj=stream, mode="r:") as tar:   # type: ignore[call-overload]
                tar.extractall(dest, members=_checked_members(tar, limits, uri, name), filter="data")
        except tarfile.FilterError as exc:   # absolute or '..' path, link outside, special file
            raise UnsafeContent(uri, type(exc).__name__, f"{name}: {exc}; the archive must hold only the "
                                "artifact's files and directories") from exc
        # KeyError: a hard link to a member the archive does not have (tarfile's fallback copy looks it up);
        # zlib.error: a corrupt deflate stream. Both are the artifact's fault: InvalidContent, never retried.
        except (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error, ValueError, KeyError) as exc:
            raise InvalidContent(uri, "not a tar archive", f"{name} is not a readable tar archive: {exc}") from exc


def _open_regular(path: Path, rel: str, uri: str) -> int:
    """An O_NOFOLLOW, non-blocking descriptor of `path`, refused unless it is a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise UnsafeContent(uri, "unreadable", f"{rel}: cannot be opened as a regular file ({exc})") from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UnsafeContent(uri, "special file", f"{rel} is {_kind(mode)}; an artifact holds only files")
    return fd


def walk_tree(src: Path, limits: ArtifactLimits, uri: str, hint: str = "") -> Iterator[tuple[str, Path | None]]:
    """(relative path, file to read) for each entry of the local directory `src`, in walk order; the file is
    None for a directory. Links are not followed: a symlink must resolve inside `src` to a regular file.

    Raises NotFound when `src` is not a directory (its message ends with `hint`), UnsafeContent for a device
    file, FIFO, socket, a link leaving `src` or to a directory, TooLarge past `limits.max_members` or a file's
    `max_member_bytes`.
    """
    try:
        root = src.resolve(strict=True)
    except OSError as exc:
        raise NotFound(uri, "no such directory", f"{src} does not exist{hint}") from exc
    if not root.is_dir():
        raise NotFound(uri, "no such directory", f"{src} does not exist or is not a directory{hint}")
    count = 0

    def fail(exc: OSError) -> None:
        raise Unavailable(uri, str(exc), f"reading {src}: {exc}")

    for dirpath, dirnames, filenames in os.walk(root, onerror=fail, followlinks=False):
        for entry in sorted(dirnames) + sorted(filenames):
            path = Path(dirpath, entry)
            rel = path.relative_to(root).as_posix()
            count += 1
            if count > limits.max_members:
                raise TooLarge(uri, "too many files", f"{src} holds more than {limits.max_members} entries "
                               "(the artifact limit)")
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                yield rel, None
                continue
            if stat.S_ISLNK(st.st_mode):
                target = Path(os.path.realpath(path))
                if not target.is_relative_to(root):
                    raise UnsafeContent(uri, "link outside", f"{rel} links to {target}, outside the artifact "
                                        f"directory {src}")
                st = os.stat(target)
                if stat.S_ISDIR(st.st_mode):
                    raise UnsafeContent(uri, "link to a directory", f"{rel} links to a directory; an artifact "
                                        "holds files and directories, links only to files")
                path = target
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeContent(uri, "special file", f"{rel} is {_kind(st.st_mode)}; an artifact holds only "
                                    "files and directories")
            if st.st_size > limits.max_member_bytes:
                raise TooLarge(uri, "file too large", f"{rel} is {st.st_size} bytes (at most "
                               f"{limits.max_member_bytes})")
            yield rel, path


def check_tree(src: Path, limits: ArtifactLimits, uri: str) -> None:
    """Refuse the local directory `src` as copy_tree would (walk_tree's errors, TooLarge past the total)."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for _, path in walk_tree(src, limits, uri):
        if path is not None:
            st = path.stat()
            if (st.st_dev, st.st_ino) in seen:
                continue   # another name of a file already counted (copy_tree links it)
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
            if total > limits.max_total_bytes:
                raise TooLarge(uri, "too large", f"{src} holds more than {limits.max_total_bytes} bytes")


def copy_tree(src: Path, dest: Path, limits: ArtifactLimits, uri: str, hint: str = "") -> None:
    """Copy the local directory `src` to the new directory `dest` as regular files (walk_tree decides what is
    admitted; links inside become copies of their file). Each source file (inode) is copied once; its other
    names become hard links to that copy (or, where `dest`'s file system refuses hard links, copies counted
    against the limits). Raises walk_tree's errors, TooLarge once more than `limits.max_total_bytes` were
    copied, Unavailable when reading or writing fails."""
    dest.mkdir(parents=True)
    total = 0
    copied: dict[tuple[int, int], Path] = {}   # source (device, inode) -> its copy in dest
    for rel, path in walk_tree(src, limits, uri, hint):
        target = dest / rel
        if path is None:
            target.mkdir(exist_ok=True)
            continue
        fd = _open_regular(path, rel, uri)
        st = os.fstat(fd)
        first = copied.get((st.st_dev, st.st_ino))
        if first is not None:
            try:
                os.link(first, target)
                os.close(fd)
                continue
            except OSError:
                pass   # no hard links there: copy it (counted below)
        copied.setdefault((st.st_dev, st.st_ino), target)
        written = 0
        try:
            with os.fdopen(fd, "rb") as fh, open(target, "xb") as out:
                while chunk := fh.read(_COPY_CHUNK):
                    written += len(chunk)
                    if written > limits.max_member_bytes or total + written > limits.max_total_bytes:
                        raise TooLarge(uri, "too large", f"{rel}: the artifact is larger than its limit "
                                       f"({limits.max_member_bytes} bytes per file, {limits.max_total_bytes} "
                                       "in all)")
                    out.write(chunk)
        except OSError as exc:
            raise Unavailable(uri, str(exc), f"copying {rel} from {src}: {exc}") from exc
        total += written
