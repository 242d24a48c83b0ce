"""One fetcher per scheme, behind one interface (`base.Fetcher`): local/PVC, HTTP(S), S3, Hugging Face Hub.

The trainer (datasets, base models, adapter upload, checkpoint mirror), the loader (adapters, through the
verified cache) and `loraplane fetch-model` (base models, through the same cache) all fetch with these.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from loraplane.api.paths import PVC_ROOT
from loraplane.storage.credentials import Credentials
from loraplane.storage.fetchers.base import Fetcher, FetchPolicy
from loraplane.storage.uri import ArtifactUri, Scheme

# Which fetcher serves each scheme, as "module:Class". Imported on first use, so boto3 or huggingface_hub load
# only in a process that fetches a URI of theirs. A new scheme registers here (its class lists it in `schemes`).
REGISTRY: dict[Scheme, str] = {
    Scheme.LOCAL: "loraplane.storage.fetchers.local:LocalFetcher",
    Scheme.PVC: "loraplane.storage.fetchers.local:LocalFetcher",
    Scheme.HTTP: "loraplane.storage.fetchers.http:HttpFetcher",
    Scheme.HTTPS: "loraplane.storage.fetchers.http:HttpFetcher",
    Scheme.S3: "loraplane.storage.fetchers.s3:S3Fetcher",
    Scheme.HF: "loraplane.storage.fetchers.hf:HfFetcher",
}


def fetcher_class(scheme: Scheme) -> type[Fetcher]:
    """The Fetcher class registered for `scheme`. Raises ValueError for a scheme nothing serves, TypeError when
    the registered class does not declare the scheme (a registration mistake)."""
    try:
        target = REGISTRY[scheme]
    except KeyError:
        raise ValueError(f"no fetcher serves {scheme} URIs (register one in storage/fetchers/__init__.py)") from None
    module, _, name = target.partition(":")
    cls = getattr(importlib.import_module(module), name)
    if scheme not in cls.schemes:
        raise TypeError(f"{target} is registered for {scheme} but its `schemes` are {cls.schemes}")
    return cls


def fetcher_for(uri: ArtifactUri, *, pvc_root: str | Path = PVC_ROOT, http_timeout_s: float | None = None,
                send_hub_token: bool = False, policy: FetchPolicy = FetchPolicy(),
                credentials: Credentials | None = None) -> Fetcher:
    """The fetcher of `uri`'s scheme. `pvc_root`: where pvc:// claims are mounted; `http_timeout_s`: the
    budget of a whole HTTP download (None: only the per-read timeout); `send_hub_token`: send $HF_TOKEN with
    https requests to huggingface.co (off unless the caller's user gave the token for that); `policy`: plain
    http/loopback opt-in and the download size bound (FetchPolicy); `credentials`: this fetch's own
    credentials, used instead of the process environment (storage.credentials). ValueError for an unserved
    scheme."""
    return fetcher_class(uri.scheme).configured(pvc_root=pvc_root, http_timeout_s=http_timeout_s,
                                                send_hub_token=send_hub_token, policy=policy,
                                                credentials=credentials)


__all__ = ["REGISTRY", "Credentials", "FetchPolicy", "Fetcher", "fetcher_class", "fetcher_for"]
