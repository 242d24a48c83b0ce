"""Artifact digests shared by the trainer (which records them) and the adapter loader (which verifies them).

One definition, so that the sha256 a FineTuneJob writes into an Adapter is the one the loader checks:

- a file's digest is the plain sha256 of its bytes (what `sha256sum FILE` prints);
- a directory's digest is the sha256 of one line per file, in sorted order of the relative POSIX path:
  `<sha256 of the file> <relative path>\\n` (what `cd DIR && find . -type f | sort | xargs sha256sum` hashes,
  minus the leading "./"); empty directories do not count.

Links: a symlink to a regular file inside the directory counts as that file under the link's own path (a Hugging
Face cache keeps `snapshots/REV/FILE -> ../../blobs/SHA`); a symlink leaving the directory, dangling or to a
directory does not count, and symlinked directories are not descended into. Each file (inode) is read at most
once however many names (symlinks, hard links) it has, and `directory_size` counts it once: thousands of links
to one file in an artifact cost one read, not thousands (a small hostile archive cannot make the loader hash or
account gigabytes).
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file's bytes (what `sha256sum FILE` prints), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(root: Path) -> list[tuple[str, Path, os.stat_result]]:
    """(relative POSIX path, file to read, its stat) for every file the digest counts (module docstring),
    sorted by relative path. Links are resolved here, once each, and never followed into directories."""
    real_root = Path(os.path.realpath(root))
    out: list[tuple[str, Path, os.stat_result]] = []
    for dirpath, _dirnames, filenames in os.walk(root, followlinks=False):
        for name in filenames:
            path = Path(dirpath, name)
            try:
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    target = Path(os.path.realpath(path))
                    if not target.is_relative_to(real_root):
                        continue
                    st = os.stat(target)
                    path = target
            except OSError:
                continue   # dangling link, or removed while walking
            if stat.S_ISREG(st.st_mode):
                out.append((Path(dirpath, name).relative_to(root).as_posix(), path, st))
    out.sort(key=lambda entry: entry[0])
    return out


def sha256_dir(root: Path) -> str:
    """The digest of a directory's contents (see the module docstring); independent of timestamps and owners.
    Each distinct file (device, inode) is read once. Raises NotADirectoryError when `root` is not a directory,
    OSError when a file cannot be read."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    digest = hashlib.sha256()
    seen: dict[tuple[int, int], str] = {}
    for rel, path, st in _files(root):
        inode = (st.st_dev, st.st_ino)
        if inode not in seen:
            seen[inode] = sha256_file(path)
        digest.update(f"{seen[inode]} {rel}\n".encode())
    return digest.hexdigest()


def directory_size(root: Path) -> int:
    """Bytes the files under `root` take: each distinct file (device, inode) counted once, whatever number of
    names (symlinks inside `root`, hard links) it has."""
    sizes = {(st.st_dev, st.st_ino): st.st_size for _, _, st in _files(Path(root))}
    return sum(sizes.values())
