"""The one interface every scheme's fetcher implements (like AIBrix's downloader base class)."""

from __future__ import annotations

import os
from abc import ABC
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from loraplane.api.wire.trainer import INSECURE_HTTP_ENV
from loraplane.storage.errors import StorageError, TooLarge
from loraplane.storage.uri import ArtifactUri, Scheme

if TYPE_CHECKING:
    from loraplane.storage.credentials import Credentials


@dataclass(frozen=True)
class FetchPolicy:
    """What a fetch over the network may do, beyond the defaults (https only, public addresses, no size bound).

    `allow_insecure_http`: also plain http:// and loopback addresses (the chart's `allowInsecureHttp`, the
    local quickstart and tests; never needed against a real store). `max_bytes`: the largest download
    accepted (None: unbounded), so a server streaming forever stops at the artifact limit; `max_files`: the
    most files a tree (an S3 prefix, a Hub repo) may hold (None: unbounded). Both are checked against the
    store's listing before a byte is downloaded (`check_listing`), and again against what was written.
    `allow_local_paths`: local `/PATH` and `file://` sources may be read (local runs; the adapter loader in a
    cluster sets it False, since its file system holds other tenants' cached adapters and credentials).
    `private_roots`: folders no local or pvc:// source may name or lie under, whatever `allow_local_paths`
    (the loader's credentials root; an ArtifactCache adds its own root).
    """

    allow_insecure_http: bool = False
    max_bytes: int | None = None
    max_files: int | None = None
    allow_local_paths: bool = True
    private_roots: tuple[str, ...] = ()

    @classmethod
    def from_env(cls) -> "FetchPolicy":
        """The trainer's policy: allow_insecure_http when $LORAPLANE_ALLOW_INSECURE_HTTP is "true"."""
        return cls(allow_insecure_http=os.environ.get(INSECURE_HTTP_ENV, "").lower() == "true")


class Fetcher(ABC):
    """Copies what a URI of its schemes names onto local disk; raises loraplane.storage.errors.StorageError
    subclasses (never a library's own exception types). A scheme implements the operations that make sense
    for it; the others raise StorageError saying so."""

    schemes: ClassVar[tuple[Scheme, ...]] = ()

    @classmethod
    def configured(cls, *, pvc_root: str | Path, http_timeout_s: float | None,
                   send_hub_token: bool = False, policy: FetchPolicy = FetchPolicy(),
                   credentials: "Credentials | None" = None) -> "Fetcher":
        """An instance for `fetcher_for`'s options; a fetcher that takes none of them ignores them
        (`credentials`: used instead of the environment by the fetchers of stores that take credentials)."""
        return cls()

    def fetch_file(self, uri: ArtifactUri, dest: Path) -> Path:
        """Download the one file `uri` names to `dest` (written beside it and renamed when complete, so `dest`
        is whole or absent). Returns `dest`."""
        raise StorageError(uri.text, "not a single file", f"{uri}: a {uri.scheme} URI does not name one file")

    def fetch_tree(self, uri: ArtifactUri, dest: Path) -> Path:
        """Copy the directory `uri` names (a folder, an S3 prefix, a Hub repo snapshot) to the new directory
        `dest` as regular files (no symlinks). Returns `dest`."""
        raise StorageError(uri.text, "not a directory", f"{uri}: a {uri.scheme} URI does not name a directory")


def check_listing(uri: str, sizes: list[int], policy: FetchPolicy | None, what: str = "the listing",
                  total: int | None = None) -> None:
    """Raise TooLarge when a tree of files of these `sizes` (bytes) holds more than `policy.max_files` files or
    more than `policy.max_bytes` bytes in all: called with the store's listing before anything is downloaded
    (an S3 prefix or a Hub repo of 100,000 files or a terabyte must not fill the replica's disk first), and with
    what was written (a store answering with more than it listed). `what` says which in the message; `total`,
    when given, is sum(sizes) (a caller checking after each file keeps it, instead of summing again)."""
    if policy is None:
        return
    if policy.max_files is not None and len(sizes) > policy.max_files:
        raise TooLarge(uri, "too many files", f"{uri}: {what} has {len(sizes)} files (the artifact limit is "
                       f"{policy.max_files})")
    total = sum(sizes) if total is None else total
    if policy.max_bytes is not None and total > policy.max_bytes:
        raise TooLarge(uri, "too large", f"{uri}: {what} holds {total} bytes (the artifact limit is "
                       f"{policy.max_bytes})")


def partial_path(dest: Path) -> Path:
    """Where a download to `dest` is written until complete (same folder, so the rename is atomic)."""
    return dest.with_name(f"{dest.name}.part-{os.getpid()}")
