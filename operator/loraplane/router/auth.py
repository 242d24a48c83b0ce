"""API keys: which callers may use the router's OpenAI-compatible endpoints (`Authorization: Bearer <key>`)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from loraplane.kube.mounted import file_stamp

log = logging.getLogger("loraplane.router")

_MAX_ACCEPTED = 4096  # verified header values remembered; bounded by the keys in use, this only caps abuse


class ApiKeys:
    """The accepted API keys, from a file (one key per line, `#` comments) or a folder (a mounted Secret:
    every file not starting with `.`, one or more keys each).

    Only SHA-256 digests of the keys are kept in memory and compared. `reload()` re-reads them when the
    files changed, so a rotated Secret applies without a restart (the router's file loop calls it).
    Raises ValueError when constructed from a source without any key, OSError when it cannot be read.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._digests: frozenset[bytes] = frozenset()
        self._accepted: set[bytes] = set()  # header values already verified (cleared when the keys change)
        self._stamp: tuple | None = None
        self.reload()
        if not self._digests:
            raise ValueError(f"--api-keys-file {self.path}: no keys found (one key per line; '#' comments); "
                             "omit the option to run without API keys")

    def _files(self) -> list[Path]:
        if self.path.is_dir():
            return sorted(p for p in self.path.iterdir() if p.is_file() and not p.name.startswith("."))
        return [self.path]

    def reload(self) -> bool:
        """Re-read the keys if any file changed (one stat per file otherwise); True when they were re-read."""
        files = self._files()
        stamp = tuple((str(p), file_stamp(p)) for p in files)
        if stamp == self._stamp:
            return False
        keys = set()
        for p in files:
            # Keys end at "\n" only: str.splitlines() would also cut a key at U+2028, U+0085 or \x1c-\x1e (making
            # its pieces valid keys). Stripped of what `check` strips from the header (ASCII whitespace).
            for line in p.read_text(encoding="utf-8").split("\n"):
                line = line.strip(" \t\r\x0b\x0c")
                if line and not line.startswith("#"):
                    keys.add(hashlib.sha256(line.encode()).digest())
        self._digests, self._stamp = frozenset(keys), stamp
        self._accepted = set()
        log.info("API keys loaded: %d", len(keys))
        return True

    def check(self, authorization: bytes | None) -> bool:
        """Whether an `Authorization` header value (raw bytes, None when absent) is `Bearer <an accepted key>`.

        The hot path: a value seen before costs one set lookup; a new one costs one SHA-256. The scheme name is
        matched in any case (`bearer`, `BEARER`): RFC 9110 section 11.1 makes authentication schemes
        case-insensitive, and some HTTP clients lower-case it.
        """
        if authorization in self._accepted:
            return True
        if not authorization or authorization[:7].lower() != b"bearer ":
            return False
        if hashlib.sha256(authorization[7:].strip()).digest() in self._digests:
            if len(self._accepted) < _MAX_ACCEPTED:  # only verified values are remembered
                self._accepted.add(authorization)
            return True
        return False
