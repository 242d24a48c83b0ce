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
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

from loraplane.storage.digest import directory_size, sha256_dir, sha256_file

log = logging.getLogger(__name__)

META_SUFFIX = ".meta.json"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


class FetchError(Exception):
    """The artifact could not be fetched; `reason` is the CamelCase reason reported for it."""

    reason = "FetchFailed"
    retryable = True


class ChecksumMismatch(FetchError):
    reason = "ChecksumMismatch"


class InvalidArtifact(FetchError):
    """Fetched, but not a PEFT adapter directory: retrying cannot help."""

    reason = "InvalidAdapter"
    retryable = False


@dataclass(frozen=True)
class CachedArtifact:
    uri: str
    path: Path
    sha256: str               # sha256_dir of the cached directory
    archive_sha256: str | None
    size_bytes: int
    fetched_at: float


def cache_key(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:32]


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


def fetched_model_path(cache_dir: str | Path, uri: str) -> Path:
    """Where `loraplane fetch-model` leaves the base model at `uri` (what vLLM's --model then names)."""
    return Path(cache_dir) / cache_key(uri)


class ArtifactCache:
    def __init__(self, root: Path, max_bytes: int, pvc_root: str = "/mnt/pvc", http_timeout: float = 600,
                 root_of: Callable[[Path], Path] = adapter_root):
        self.root_of = root_of  # which directory of a fetched tree is the artifact (adapter or model)
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.pvc_root = pvc_root
        self.http_timeout = http_timeout
        self.root.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, asyncio.Lock] = {}
        self._clean_partial()

    # ---- entries -------------------------------------------------------------------------------------------
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

    def lookup(self, uri: str) -> CachedArtifact | None:
        key = cache_key(uri)
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
        return sum(art.size_bytes for _, art, _ in self.entries())

    def _touch(self, uri: str) -> None:
        try:
            os.utime(self._meta(cache_key(uri)))
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
            log.info("evicted %s (%d bytes) from the adapter cache", art.uri, art.size_bytes)
        return evicted

    # ---- fetching ------------------------------------------------------------------------------------------
    async def fetch(self, uri: str, expected_sha256: str | None = None,
                    protect: set[Path] = frozenset()) -> CachedArtifact:
        """The verified local copy of `uri`, fetched if missing or stale. Raises FetchError subclasses."""
        lock = self._locks.setdefault(uri, asyncio.Lock())
        async with lock:
            cached = self.lookup(uri)
            if cached and _digest_matches(expected_sha256, cached) and not await self._local_source_changed(
                    uri, cached, expected_sha256):
                self._touch(uri)
                return cached
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
            try:
                archive_sha = await self._download(uri, tmp / "src")
                root = self.root_of(tmp / "src")
                digest = await asyncio.to_thread(sha256_dir, root)
                art = CachedArtifact(uri=uri, path=self._entry(cache_key(uri)), sha256=digest,
                                     archive_sha256=archive_sha, size_bytes=directory_size(root),
                                     fetched_at=time.time())
                if not _digest_matches(expected_sha256, art):
                    raise ChecksumMismatch(
                        f"artifact sha256 is {digest}" + (f" (archive {archive_sha})" if archive_sha else "")
                        + f", expected {expected_sha256}: the artifact changed after its digest was recorded, "
                          "or source.sha256 is wrong; fix spec.source.sha256 or restore the artifact")
                self._install(art, root)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            self.evict(protect | {art.path})
            return art

    async def _local_source_changed(self, uri: str, cached: CachedArtifact, expected: str | None) -> bool:
        """A local/PVC source without a pinned digest may be rewritten in place: re-hash it to notice."""
        if expected is not None or self._local_path(uri) is None:
            return False
        try:
            return await asyncio.to_thread(sha256_dir, self.root_of(self._local_path(uri))) != cached.sha256
        except (OSError, FetchError):
            return False  # the source vanished: keep serving the verified copy

    def _install(self, art: CachedArtifact, root: Path) -> None:
        key = cache_key(art.uri)
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
        if uri.startswith("pvc://"):
            return Path(self.pvc_root) / uri.removeprefix("pvc://")
        if uri.startswith("file://"):
            return Path(uri.removeprefix("file://"))
        if uri.startswith("/"):
            return Path(uri)
        return None

    async def _download(self, uri: str, dest: Path) -> str | None:
        """Materialise `uri` as directory `dest`; return the archive's sha256 when it was an archive."""
        local = self._local_path(uri)
        if local is not None:
            if local.is_file() and local.name.endswith(ARCHIVE_SUFFIXES):
                return await asyncio.to_thread(self._unpack, local, dest)
            if not local.is_dir():
                raise FetchError(f"{local} does not exist or is not a directory"
                                 + (" (is the PVC mounted in the pod?)" if uri.startswith("pvc://") else ""))
            try:
                await asyncio.to_thread(shutil.copytree, local, dest, symlinks=False)
            except OSError as exc:
                raise FetchError(f"copying {local}: {exc}") from exc
            return None
        if uri.startswith(("https://", "http://")):
            return await self._download_http(uri, dest)
        if uri.startswith("s3://"):
            return await asyncio.to_thread(self._download_s3, uri, dest)
        if uri.startswith("hf://"):
            await asyncio.to_thread(self._download_hf, uri, dest)
            return None
        raise InvalidArtifact(f"unsupported URI scheme in {uri!r}: use a path, pvc://, https://, s3:// or hf://")

    def _unpack(self, archive: Path, dest: Path) -> str:
        digest = sha256_file(archive)
        dest.mkdir(parents=True)
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(dest, filter="data")  # refuses absolute paths, '..' and device files
        except (tarfile.TarError, OSError) as exc:
            raise InvalidArtifact(f"{archive.name} is not a readable tar archive: {exc}") from exc
        return digest

    async def _download_http(self, uri: str, dest: Path) -> str:
        name = uri.split("?", 1)[0].rsplit("/", 1)[-1]
        if not name.endswith(ARCHIVE_SUFFIXES):
            raise InvalidArtifact(f"{uri}: an https:// artifact must be a .tar.gz, .tgz or .tar archive "
                                  "of its directory")
        archive = dest.parent / name
        timeout = aiohttp.ClientTimeout(total=self.http_timeout)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(uri) as resp:
                if resp.status != 200:
                    raise FetchError(f"GET {uri} answered HTTP {resp.status}")
                with open(archive, "wb") as fh:
                    async for chunk in resp.content.iter_chunked(1 << 20):
                        fh.write(chunk)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise FetchError(f"GET {uri}: {type(exc).__name__}: {exc}") from exc
        return await asyncio.to_thread(self._unpack, archive, dest)

    def _download_s3(self, uri: str, dest: Path) -> str | None:
        try:
            import boto3
            from botocore.exceptions import BotoCoreError, ClientError
        except ImportError as exc:
            raise InvalidArtifact("s3:// sources need boto3 in the loader image (pip install 'loraplane[s3]')") \
                from exc
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        s3 = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
        try:
            if prefix.endswith(ARCHIVE_SUFFIXES):
                archive = dest.parent / prefix.rsplit("/", 1)[-1]
                s3.download_file(bucket, prefix, str(archive))
                return self._unpack(archive, dest)
            prefix = prefix.rstrip("/") + "/" if prefix else ""
            found = 0
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(prefix):]
                    if not rel or rel.endswith("/"):
                        continue
                    target = dest / rel
                    if dest.resolve() not in target.resolve().parents:
                        raise InvalidArtifact(f"s3 key {obj['Key']!r} escapes the artifact directory")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    s3.download_file(bucket, obj["Key"], str(target))
                    found += 1
        except (BotoCoreError, ClientError) as exc:
            raise FetchError(f"{uri}: {exc}") from exc
        if not found:
            raise FetchError(f"{uri}: no objects under that prefix")
        return None

    def _download_hf(self, uri: str, dest: Path) -> None:
        try:
            from huggingface_hub import snapshot_download
            from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
            from huggingface_hub.utils import HFValidationError
        except ImportError as exc:
            raise InvalidArtifact("hf:// sources need huggingface_hub in the loader image") from exc

        repo, _, revision = uri.removeprefix("hf://").partition("@")
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        try:
            snapshot = snapshot_download(repo.strip("/"), revision=revision or None, local_files_only=offline)
        except LocalEntryNotFoundError as exc:
            raise FetchError(f"{uri} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                             "pre-populate HF_HOME or allow hub access") from exc
        except (HfHubHTTPError, HFValidationError, OSError) as exc:
            raise FetchError(f"{uri}: {type(exc).__name__}: {exc}") from exc
        # The snapshot holds symlinks into the blob store: copy real files so the entry stands alone.
        shutil.copytree(snapshot, dest, symlinks=False, ignore=shutil.ignore_patterns(".cache", ".gitattributes"))


def model_cache(root: Path, pvc_root: str = "/mnt/pvc") -> ArtifactCache:
    """The cache that fetches base models (engine pod init container, trainer): no size bound, since its one
    entry is the model in use; an entry is a directory with config.json."""
    return ArtifactCache(root, max_bytes=1 << 62, pvc_root=pvc_root, root_of=model_root)
