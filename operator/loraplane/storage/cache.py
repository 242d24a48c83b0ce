"""A local, size-bounded cache of adapter artifacts, verified by sha256 before vLLM ever sees them.

Each artifact is fetched into a temporary directory inside the cache, hashed, checked against the expected
digest and renamed into place; its metadata file is written last (atomically), so a crash leaves either a
complete entry or garbage that the next start removes. vLLM is then asked to load the cached copy, never the
source: a source overwritten later cannot change what a replica serves.

Sources: a local directory (`/path`, `file:///path`), a mounted PVC (`pvc://CLAIM/PATH`, read under
`pvc_root/CLAIM/PATH`), an archive over `https://` (`.tar.gz`, `.tgz`, `.tar`), `s3://BUCKET/PREFIX` (a
directory of objects or one archive; needs boto3), and `hf://ORG/REPO[@REVISION]` (huggingface_hub; honours
HF_HUB_OFFLINE by reading only the local HF cache).

The same cache (`model_cache`) fetches an `s3://` or `https://` base model into a replica before
vLLM starts (`loraplane fetch-model`, the engine pod's init container).

Digests (loraplane.storage.digest): a directory's sha256_dir; for archives either the archive file's sha256 (what
`sha256sum x.tar.gz` prints) or the unpacked directory's sha256_dir is accepted.

Entries are keyed by the artifact's identity (storage.uri.cache_key: URI + version + expected digest when
known), never by the URI alone: a new version published at the same URI gets its own entry, and the entry an
engine loaded an older version from is never rewritten under it. A cache hit is hashed again before it is
returned, so files changed on disk after verification are fetched anew rather than served.

Credentials: each fetch may carry its own (`credentials`, storage.credentials), used instead of the process
environment. A store that refuses them (HTTP 401/403, S3 AccessDenied, a gated or private Hub repo) raises
`FetchAccessDenied`: terminal, since retrying with the same credentials cannot help.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from loraplane.api.paths import PVC_ROOT
from loraplane.api.redaction import redacted
from loraplane.api.reasons import Reason
from loraplane.storage.archive import (
    ADAPTER_LIMITS, MODEL_LIMITS, ArtifactLimits, check_tree, copy_tree, unpack_archive,
)
from loraplane.storage.digest import directory_size, sha256_dir, sha256_file
from loraplane.storage.credentials import Credentials
from loraplane.storage.errors import (AccessDenied, InvalidContent, MissingDependency, Refused, StorageError, TooLarge,
                                      UnsafeContent)
from loraplane.storage.fetchers import fetcher_for
from loraplane.storage.fetchers.base import FetchPolicy
from loraplane.storage.uri import (  # noqa: F401  (fetched_model_path: also the cache's public name)
    ArtifactUri, Scheme, cache_key, fetched_model_path, parse_uri, try_parse_uri,
)

log = logging.getLogger(__name__)

META_SUFFIX = ".meta.json"


class FetchError(Exception):
    """The artifact could not be fetched; `reason` is the CamelCase reason reported for it (a class default, or
    given per instance), `retryable` whether another attempt may succeed."""

    reason = Reason.FetchFailed
    retryable = True

    def __init__(self, message: str, reason: Reason | None = None, retryable: bool | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        if retryable is not None:
            self.retryable = retryable


class ChecksumMismatch(FetchError):
    """The fetched artifact's sha256 is not the expected one (retried like any fetch failure)."""

    reason = Reason.ChecksumMismatch


class FetchAccessDenied(FetchError):
    """The store refused the credentials (or there were none): retrying with the same ones cannot help."""

    reason = Reason.AccessDenied
    retryable = False


class InvalidArtifact(FetchError):
    """Fetched, but not a PEFT adapter directory: retrying cannot help."""

    reason = Reason.InvalidAdapter
    retryable = False


@dataclass(frozen=True)
class CachedArtifact:
    """One complete, verified cache entry: the URI as written, its directory, the directory's sha256_dir,
    the archive's sha256 (None for a tree), its size in bytes, when it was fetched (Unix seconds) and the
    version it was fetched for (None: unversioned)."""

    uri: str
    path: Path
    sha256: str               # sha256_dir of the cached directory
    archive_sha256: str | None
    size_bytes: int
    fetched_at: float
    version: str | None = None


def _digest_matches(expected: str | None, art: CachedArtifact) -> bool:
    return expected is None or expected.lower() in (art.sha256, art.archive_sha256)


def _root_holding(directory: Path, marker: str) -> Path | None:
    """`directory` if it holds `marker`, else its single subdirectory if that does (an archive's top folder)."""
    if (directory / marker).is_file():
        return directory
    subdirs = [p for p in directory.iterdir() if p.is_dir()]
    if len(subdirs) == 1 and (subdirs[0] / marker).is_file():
        return subdirs[0]
    return None


def adapter_root(directory: Path) -> Path:
    """The directory holding adapter_config.json."""
    if root := _root_holding(directory, "adapter_config.json"):
        return root
    raise InvalidArtifact(
        "no adapter_config.json at the top of the artifact (or of its single folder): the source must be a "
        "PEFT adapter directory as written by `model.save_pretrained(dir)`")


def model_root(directory: Path) -> Path:
    """The directory holding a transformers model's config.json."""
    if root := _root_holding(directory, "config.json"):
        return root
    raise InvalidArtifact("no config.json at the top of the artifact (or of its single folder): a base model must "
                          "be a directory as written by `model.save_pretrained(dir)` (config, weights, tokenizer)")


class ArtifactCache:
    """A verified, size-bounded (`max_bytes`) cache of fetched artifacts under `root`, one entry per artifact
    identity (cache_key: URI, version, expected digest): a directory plus a metadata file written last, so a
    crash never leaves an entry that looks complete. `http_timeout` is seconds per HTTP(S) download; `root_of`
    picks the artifact's directory in the tree; `by_identity` False keys entries by the URI alone (the base-model
    cache, whose entry's path vLLM's --model names: storage.uri.fetched_model_path); `limits` bound what one
    artifact may unpack to (capped at `max_bytes`: an artifact larger than the cache cannot be kept anyway);
    `policy` is what HTTP(S) fetches may do (plain http, loopback: off by default)."""

    def __init__(self, root: Path, max_bytes: int, pvc_root: str = PVC_ROOT, http_timeout: float = 600,
                 root_of: Callable[[Path], Path] = adapter_root, by_identity: bool = True,
                 limits: ArtifactLimits = ADAPTER_LIMITS, policy: FetchPolicy = FetchPolicy()):
        self.root_of = root_of  # which directory of a fetched tree is the artifact (adapter or model)
        self.by_identity = by_identity
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.limits = limits.at_most(max_bytes)
        self.policy = replace(policy, max_bytes=self.limits.max_total_bytes, max_files=self.limits.max_members,
                              private_roots=(*policy.private_roots, str(self.root)))
        self.pvc_root = pvc_root
        self.http_timeout = http_timeout
        self.root.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, asyncio.Lock] = {}
        self._clean_partial()

    # ---- entries -------------------------------------------------------------------------------------------
    def key(self, uri: str, version: str | None = None, sha256: str | None = None) -> str:
        """The entry name of an artifact: cache_key of its identity, or of the URI alone without by_identity."""
        return cache_key(uri, version, sha256) if self.by_identity else cache_key(uri)

    def _entry(self, key: str) -> Path:
        return self.root / key

    def _meta(self, key: str) -> Path:
        return self.root / f"{key}{META_SUFFIX}"

    def _clean_partial(self) -> None:
        """Remove what a crash left: temp dirs and entries without metadata."""
        for p in self.root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
            elif p.is_dir() and not self._meta(p.name).exists():
                shutil.rmtree(p, ignore_errors=True)
            elif p.name.endswith(META_SUFFIX) and not self._entry(p.name.removesuffix(META_SUFFIX)).is_dir():
                p.unlink(missing_ok=True)

    def lookup(self, uri: str, version: str | None = None, sha256: str | None = None) -> CachedArtifact | None:
        """The complete entry of `uri` at `version` fetched for digest `sha256` (cache_key), metadata readable
        and directory present, else None; its digest is not checked again here."""
        key = self.key(uri, version, sha256)
        try:
            raw = json.loads(self._meta(key).read_text())
            art = CachedArtifact(**{**raw, "path": Path(raw["path"])})
        except (OSError, ValueError, TypeError, KeyError):
            return None
        return art if art.path.is_dir() else None

    def entries(self) -> list[tuple[str, CachedArtifact, float]]:
        """(key, artifact, last use) for every complete entry."""
        out = []
        for meta in self.root.glob(f"*{META_SUFFIX}"):
            key = meta.name.removesuffix(META_SUFFIX)
            try:
                raw = json.loads(meta.read_text())
                out.append((key, CachedArtifact(**{**raw, "path": Path(raw["path"])}), meta.stat().st_mtime))
            except (OSError, ValueError, TypeError, KeyError):
                continue
        return out

    def total_bytes(self) -> int:
        """The size of every complete entry, in bytes (as recorded at fetch time)."""
        return sum(art.size_bytes for _, art, _ in self.entries())

    def _touch(self, key: str) -> None:
        try:
            os.utime(self._meta(key))
        except OSError:
            pass

    def evict(self, protect: set[Path] = frozenset()) -> list[str]:
        """Drop least-recently-used entries until the cache fits max_bytes; never entries in `protect`
        (adapters vLLM may re-read from disk). Returns the evicted URIs."""
        entries = sorted(self.entries(), key=lambda e: e[2])
        total = sum(art.size_bytes for _, art, _ in entries)
        evicted = []
        for key, art, _ in entries:
            if total <= self.max_bytes:
                break
            if art.path in protect:
                continue
            self._meta(key).unlink(missing_ok=True)   # metadata first: a half-removed entry is never "complete"
            shutil.rmtree(self._entry(key), ignore_errors=True)
            total -= art.size_bytes
            evicted.append(art.uri)
            log.info("evicted %s (%d bytes) from the adapter cache", redacted(art.uri), art.size_bytes)
        return evicted

    # ---- fetching ------------------------------------------------------------------------------------------
    async def fetch(self, uri: str, expected_sha256: str | None = None,
                    protect: set[Path] = frozenset(), *, version: str | None = None,
                    credentials: Credentials | None = None) -> CachedArtifact:
        """The verified local copy of `uri` at `version` (the artifact's identity with `expected_sha256`:
        cache_key), fetched if missing, stale or changed on disk since it was verified. `credentials`: this
        artifact's own, used instead of the environment. Raises FetchError subclasses."""
        self._check_local(uri)   # before any lookup: an entry cached under an older policy is not served either
        key = self.key(uri, version, expected_sha256)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self.lookup(uri, version, expected_sha256)
            if cached and _digest_matches(expected_sha256, cached) and await self._intact(cached) \
                    and not await self._local_source_changed(uri, cached, expected_sha256):
                self._touch(key)
                return cached
            if expected_sha256 is not None and cached is None and self.by_identity:
                # The digest was recorded after this version was verified without one (the Adapter pins what a
                # replica first served): that entry is this artifact, whatever the source holds now.
                verified = self.lookup(uri, version, None)
                if verified and _digest_matches(expected_sha256, verified) and await self._intact(verified):
                    self._touch(self.key(uri, version, None))
                    return verified
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
            try:
                archive_sha = await self._download(uri, tmp / "src", credentials)
                root = self.root_of(tmp / "src")
                digest = await asyncio.to_thread(sha256_dir, root)
                art = CachedArtifact(uri=uri, path=self._entry(key), sha256=digest,
                                     archive_sha256=archive_sha, size_bytes=directory_size(root),
                                     fetched_at=time.time(), version=version)
                if not _digest_matches(expected_sha256, art):
                    raise ChecksumMismatch(
                        f"artifact sha256 is {digest}" + (f" (archive {archive_sha})" if archive_sha else "")
                        + f", expected {expected_sha256}: the artifact changed after its digest was recorded, "
                          "or source.sha256 is wrong; fix spec.source.sha256 or restore the artifact")
                self._install(key, art, root)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            self.evict(protect | {art.path})
            return art

    def _check_local(self, uri: str) -> None:
        """Refuse (FetchError LocalSourceRefused, not retried) a `/PATH` or `file://` source when the policy
        does not allow local paths, and a local or pvc:// source that names or lies under one of the policy's
        private roots (this cache, the loader's credentials), links resolved."""
        parsed = try_parse_uri(uri)
        if parsed is None or not parsed.is_local:
            return
        if parsed.scheme == Scheme.LOCAL and not self.policy.allow_local_paths:
            raise FetchError(f"spec.source.uri {redacted(uri)!r} is a local path, read from the replica's own file "
                             "system: local paths are for local runs (loraplane run, a loader with --table); "
                             "publish the adapter to pvc://, s3://, https:// or hf://",
                             Reason.LocalSourceRefused, retryable=False)
        local = parsed.local_path(self.pvc_root)
        if local is None:
            return
        real = Path(os.path.realpath(local))
        for root in self.policy.private_roots:
            private = Path(os.path.realpath(root))
            if real == private or real.is_relative_to(private) or private.is_relative_to(real):
                raise FetchError(f"spec.source.uri {redacted(uri)!r} names the loader's own folder {root} (its "
                                 "adapter cache or credentials), which no source may read; publish the adapter "
                                 "to pvc://, s3://, https:// or hf://", Reason.LocalSourceRefused, retryable=False)

    async def _intact(self, cached: CachedArtifact) -> bool:
        """The entry's files still hash to the digest recorded when it was verified (nothing rewrote them)."""
        try:
            return await asyncio.to_thread(sha256_dir, cached.path) == cached.sha256
        except OSError:
            return False

    async def _local_source_changed(self, uri: str, cached: CachedArtifact, expected: str | None) -> bool:
        """A local/PVC source without a pinned digest may be rewritten in place: re-hash it to notice."""
        if expected is not None or self._local_path(uri) is None:
            return False
        try:   # a source that now holds a device file or a link outside must not be read: refetch (and refuse)
            await asyncio.to_thread(check_tree, self.root_of(self._local_path(uri)), self.limits, uri)
        except (StorageError, FetchError):
            return True
        except OSError:
            return False
        try:
            return await asyncio.to_thread(sha256_dir, self.root_of(self._local_path(uri))) != cached.sha256
        except (OSError, FetchError):
            return False  # the source vanished: keep serving the verified copy

    def _install(self, key: str, art: CachedArtifact, root: Path) -> None:
        entry, meta = self._entry(key), self._meta(key)
        meta.unlink(missing_ok=True)
        if entry.exists():
            aside = self.root / f".tmp-old-{key}-{os.getpid()}"
            entry.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)
        root.rename(entry)
        tmp_meta = meta.with_name(f".tmp-{meta.name}")
        tmp_meta.write_text(json.dumps({**asdict(art), "path": str(art.path)}))
        os.replace(tmp_meta, meta)

    def _local_path(self, uri: str) -> Path | None:
        parsed = try_parse_uri(uri)
        return parsed.local_path(self.pvc_root) if parsed else None

    async def _download(self, uri: str, dest: Path, credentials: Credentials | None = None) -> str | None:
        """Materialise `uri` as directory `dest`; return the archive's sha256 when it was an archive.
        Fetcher errors become FetchError (retryable), FetchAccessDenied or InvalidArtifact (not)."""
        try:
            parsed = parse_uri(uri)
        except ValueError as exc:
            raise InvalidArtifact(f"{exc}") from exc
        try:
            return await asyncio.to_thread(self._materialise, parsed, dest, credentials)
        except UnsafeContent as exc:
            raise InvalidArtifact(str(exc), Reason.UnsafeArtifact) from exc
        except TooLarge as exc:
            raise InvalidArtifact(str(exc), Reason.ArtifactTooLarge) from exc
        except Refused as exc:
            raise FetchError(str(exc), Reason.InsecureSource, retryable=False) from exc
        except (InvalidContent, MissingDependency) as exc:
            raise InvalidArtifact(str(exc)) from exc
        except AccessDenied as exc:
            whose = (f"the credentials of {credentials.origin}" if credentials is not None
                     else "the loader's own identity (no source.credentialsSecretRef)")
            raise FetchAccessDenied(f"{exc} (fetched with {whose}); check source.credentialsSecretRef, the "
                                    "Secret's keys and what they may read, then restart the replica or change "
                                    "the Adapter to try again") from exc
        except StorageError as exc:
            raise FetchError(str(exc)) from exc

    def _materialise(self, uri: ArtifactUri, dest: Path, credentials: Credentials | None = None) -> str | None:
        """A directory is copied as is; one archive (.tar.gz, .tgz, .tar) is fetched, hashed and unpacked."""
        fetcher = fetcher_for(uri, pvc_root=self.pvc_root, http_timeout_s=self.http_timeout, policy=self.policy,
                              credentials=credentials)
        if uri.is_local:
            local = uri.local_path(self.pvc_root)
            assert local is not None
            if local.is_file() and uri.is_archive:
                return self._unpack(local, dest, uri.text)
            hint = " (is the PVC mounted in the pod?)" if uri.scheme == Scheme.PVC else ""
            copy_tree(local, dest, self.limits, uri.text, hint)   # no device files, FIFOs or links leaving it
            return None
        if uri.is_http and not uri.is_archive:
            raise InvalidArtifact(f"{uri}: an https:// artifact must be a .tar.gz, .tgz or .tar archive "
                                  "of its directory")
        if uri.is_archive and uri.scheme != Scheme.HF:
            archive = fetcher.fetch_file(uri, dest.parent / uri.name)
            return self._unpack(archive, dest, uri.text)
        fetcher.fetch_tree(uri, dest)
        return None

    def _unpack(self, archive: Path, dest: Path, uri: str) -> str:
        """Hash and unpack `archive` into `dest` within `self.limits` (storage.archive.unpack_archive: refused
        members and limits raise UnsafeContent / TooLarge / InvalidContent). Returns the archive's sha256."""
        size = archive.stat().st_size
        if size > self.limits.max_total_bytes:
            raise TooLarge(uri, "archive too large", f"{archive.name} is {size} bytes (the artifact limit is "
                           f"{self.limits.max_total_bytes})")
        # A local archive may be a link to the real file: open its target (unpack_archive refuses links and
        # anything but a regular file before reading a byte).
        unpack_archive(archive.resolve(), dest, self.limits, uri)
        return sha256_file(archive)


def model_cache(root: Path, pvc_root: str = PVC_ROOT, policy: FetchPolicy = FetchPolicy()) -> ArtifactCache:
    """The cache that fetches base models (engine pod init container, trainer): no size bound but MODEL_LIMITS,
    since its one entry is the model in use; an entry is a directory with config.json, keyed by URI alone."""
    return ArtifactCache(root, max_bytes=1 << 62, pvc_root=pvc_root, root_of=model_root, by_identity=False,
                         limits=MODEL_LIMITS, policy=policy)
