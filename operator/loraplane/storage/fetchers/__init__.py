"""One fetcher per scheme, behind one interface (`base.Fetcher`): local/PVC, HTTP(S), S3, Hugging Face Hub.

The trainer (datasets, base models, adapter upload, checkpoint mirror), the loader (adapters, through the
verified cache) and `loraplane fetch-model` (base models, through the same cache) all fetch with these.
"""

from __future__ import annotations

from pathlib import Path

from loraplane.api.paths import PVC_ROOT
from loraplane.storage.fetchers.base import Fetcher
from loraplane.storage.uri import ArtifactUri, Scheme


def fetcher_for(uri: ArtifactUri, *, pvc_root: str | Path = PVC_ROOT, http_timeout_s: float | None = None) -> Fetcher:
    """The fetcher of `uri`'s scheme. `pvc_root`: where pvc:// claims are mounted; `http_timeout_s`: the
    budget of a whole HTTP download (None: only the per-read timeout)."""
    if uri.scheme in (Scheme.LOCAL, Scheme.PVC):
        from loraplane.storage.fetchers.local import LocalFetcher

        return LocalFetcher(pvc_root)
    if uri.scheme in (Scheme.HTTP, Scheme.HTTPS):
        from loraplane.storage.fetchers.http import HttpFetcher

        return HttpFetcher(http_timeout_s)
    if uri.scheme == Scheme.S3:
        from loraplane.storage.fetchers.s3 import S3Fetcher

        return S3Fetcher()
    from loraplane.storage.fetchers.hf import HfFetcher

    return HfFetcher()


__all__ = ["Fetcher", "fetcher_for"]
