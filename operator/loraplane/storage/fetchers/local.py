"""Local paths and mounted PersistentVolumeClaims (`/PATH`, `file:///PATH`, `pvc://CLAIM/PATH`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from loraplane.api.paths import PVC_ROOT
from loraplane.storage.archive import MODEL_LIMITS, copy_tree
from loraplane.storage.errors import NotFound, Unavailable
from loraplane.storage.fetchers.base import Fetcher, FetchPolicy, partial_path
from loraplane.storage.uri import ArtifactUri, Scheme


class LocalFetcher(Fetcher):
    """Copies from this machine's file system; pvc:// URIs are read at `pvc_root/CLAIM/PATH`, where the pod
    mounts each claim (builders write the same mount)."""

    schemes = (Scheme.LOCAL, Scheme.PVC)

    def __init__(self, pvc_root: str | Path = PVC_ROOT):
        self.pvc_root = pvc_root

    @classmethod
    def configured(cls, *, pvc_root: str | Path, http_timeout_s: float | None,
                   send_hub_token: bool = False, policy: FetchPolicy = FetchPolicy(),
                   credentials=None) -> "LocalFetcher":
        """Fetcher.configured: only `pvc_root` applies (nothing goes over the network, no credentials)."""
        return cls(pvc_root)

    def path(self, uri: ArtifactUri) -> Path:
        """Where `uri` is on this machine (pvc: `pvc_root/CLAIM/PATH`); AssertionError for a remote URI."""
        path = uri.local_path(self.pvc_root)
        assert path is not None, f"{uri} is not a local URI"
        return path

    def _hint(self, uri: ArtifactUri) -> str:
        return " (is the PVC mounted in the pod?)" if uri.scheme == Scheme.PVC else ""

    def fetch_file(self, uri: ArtifactUri, dest: Path) -> Path:
        """Copy the file to `dest` (complete or absent). Raises NotFound when it is not a file, Unavailable
        when the copy fails."""
        src = self.path(uri)
        if not src.is_file():
            raise NotFound(uri.text, "no such file", f"{src} does not exist or is not a file{self._hint(uri)}")
        tmp = partial_path(dest)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise Unavailable(uri.text, str(exc), f"copying {src}: {exc}") from exc
        return dest

    def fetch_tree(self, uri: ArtifactUri, dest: Path) -> Path:
        """Copy the directory to the new `dest` as regular files, through storage.archive.copy_tree (links
        inside it copied as their file; device files, FIFOs and links leaving it refused) within MODEL_LIMITS.
        Raises NotFound when it is not a directory, UnsafeContent / TooLarge for what copy_tree refuses,
        Unavailable when the copy fails."""
        copy_tree(self.path(uri), dest, MODEL_LIMITS, uri.text, self._hint(uri))
        return dest
