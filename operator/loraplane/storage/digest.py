"""Artifact digests shared by the trainer (which records them) and the adapter loader (which verifies them).

One definition, so that the sha256 a FineTuneJob writes into an Adapter is the one the loader checks:

- a file's digest is the plain sha256 of its bytes (what `sha256sum FILE` prints);
- a directory's digest is the sha256 of one line per regular file, in sorted order of the relative POSIX
  path: `<sha256 of the file> <relative path>\\n` (what `cd DIR && find . -type f | sort | xargs sha256sum`
  hashes, minus the leading "./"). Symlinks are followed; empty directories do not count.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file's bytes (what `sha256sum FILE` prints), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def directory_files(root: Path) -> list[Path]:
    """Regular files under `root`, sorted by relative POSIX path (the order the digest uses)."""
    root = Path(root)
    return sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


def sha256_dir(root: Path) -> str:
    """The digest of a directory's contents (see the module docstring); independent of timestamps and owners."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    digest = hashlib.sha256()
    for path in directory_files(root):
        digest.update(f"{sha256_file(path)} {path.relative_to(root).as_posix()}\n".encode())
    return digest.hexdigest()


def directory_size(root: Path) -> int:
    """Total size in bytes of the regular files under `root` (symlinks followed)."""
    return sum(p.stat().st_size for p in directory_files(root))
