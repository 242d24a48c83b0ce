"""The Hugging Face Hub (`hf://ORG/REPO[@REVISION]`): repo snapshots (huggingface_hub) and datasets (`datasets`).

Offline mode is honoured: with HF_HUB_OFFLINE set only the local cache (HF_HOME) is read, and a miss is
OfflineMiss. HF_TOKEN (gated repos) is read by the libraries themselves, unless the fetch has its own
`credentials` (an Adapter's Secret): then their HF_TOKEN is the token, and without one none is sent.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from loraplane.storage.errors import (
    AccessDenied,
    MissingDependency,
    NotFound,
    OfflineMiss,
    StorageError,
    Unavailable,
)
from loraplane.storage.fetchers.base import Fetcher, FetchPolicy, check_listing
from loraplane.storage.uri import ArtifactUri, Scheme

_TRUE = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set (huggingface_hub's truthy spellings)."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE


class HfFetcher(Fetcher):
    """Hub repositories as directories (model or adapter repos)."""

    schemes = (Scheme.HF,)

    def __init__(self, credentials=None, policy: FetchPolicy | None = None):
        self.credentials = credentials
        self.policy = policy

    @classmethod
    def configured(cls, *, pvc_root: str | Path, http_timeout_s: float | None,
                   send_hub_token: bool = False, policy=None, credentials=None) -> "HfFetcher":
        """Fetcher.configured: `credentials` (None: huggingface_hub reads $HF_TOKEN itself) and the policy's
        size bounds (max_bytes, max_files) apply."""
        return cls(credentials, policy)

    def _token(self) -> str | bool | None:
        """snapshot_download's `token`: None reads $HF_TOKEN; explicit credentials give theirs, or False
        (send none) when they have no HF_TOKEN, so the environment's never stands in for them."""
        if self.credentials is None:
            return None
        return self.credentials.get("HF_TOKEN") or False

    def fetch_tree(self, uri: ArtifactUri, dest: Path) -> Path:
        """A snapshot of the repo at its revision, copied as regular files (the HF cache holds symlinks into
        its blob store: the copy stands alone). The policy's bounds (check_listing) are checked against the
        Hub's file list before the download (online) and against the snapshot before it is copied: TooLarge."""
        try:
            import huggingface_hub
            from huggingface_hub import snapshot_download
            from huggingface_hub.errors import (
                GatedRepoError,
                HfHubHTTPError,
                LocalEntryNotFoundError,
                RepositoryNotFoundError,
                RevisionNotFoundError,
            )
            from huggingface_hub.utils import HFValidationError
        except ImportError as exc:
            raise MissingDependency(uri.text, "huggingface_hub is not installed",
                                    "hf:// sources need huggingface_hub in the image") from exc
        bounded = self.policy is not None and (self.policy.max_bytes, self.policy.max_files) != (None, None)
        try:
            if bounded and not hub_offline():   # the Hub lists every file with its size: nothing downloaded yet
                sizes = self._listed_sizes(huggingface_hub.HfApi(), uri)
                if sizes is not None:
                    check_listing(uri.text, sizes, self.policy, "the repository")
            snapshot = snapshot_download(uri.repo or "", revision=uri.revision, local_files_only=hub_offline(),
                                         token=self._token())
        except LocalEntryNotFoundError as exc:
            if hub_offline():
                raise OfflineMiss(uri.text, "not in the local cache",
                                  f"{uri} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                                  "pre-populate HF_HOME or allow hub access") from exc
            # Online, snapshot_download raises the same error when the Hub cannot be reached (connection refused,
            # timeout, DNS) and the repo is not cached: a failure a retry may fix, not offline mode.
            cause = str(exc.__cause__ or exc).replace("\n", " ")[:300]
            raise Unavailable(uri.text, "the Hugging Face Hub could not be reached and the repo is not in the "
                                        f"local cache ({cause})") from exc
        except (HfHubHTTPError, HFValidationError, OSError) as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            cls: type[StorageError] = (
                AccessDenied if isinstance(exc, GatedRepoError) or status in (401, 403)
                else NotFound if isinstance(exc, (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError))
                else Unavailable)
            raise cls(uri.text, f"{type(exc).__name__}: {exc}") from exc
        if bounded:   # offline (a cache filled by someone else), or a repo that changed since it was listed
            check_listing(uri.text, _file_sizes(Path(snapshot)), self.policy, "the snapshot")
        shutil.copytree(snapshot, dest, symlinks=False, ignore=shutil.ignore_patterns(".cache", ".gitattributes"))
        return dest

    def _listed_sizes(self, api, uri: ArtifactUri) -> list[int] | None:
        """The size of every file of the repo at its revision from the Hub's file metadata, or None when the Hub
        did not answer (connection refused, timeout, 5xx, 429, an auth or not-found answer). snapshot_download
        decides those cases itself, as it did before the listing existed: it serves a cached snapshot when the
        Hub cannot be reached (then `_file_sizes` bounds it) and raises the error that maps to the right
        StorageError otherwise. Failing the fetch here instead turned a Hub outage into a failed fetch of an
        adapter already in the replica's HF cache, with the HTTP client's own exception (no StorageError)."""
        try:
            info = api.model_info(uri.repo or "", revision=uri.revision, files_metadata=True, token=self._token())
        except Exception:  # noqa: BLE001 - any failure of the pre-check is left to snapshot_download (docstring)
            return None
        return [s.size or 0 for s in info.siblings or []]


def _file_sizes(root: Path) -> list[int]:
    """The size of every file under `root`, links followed (a snapshot's files link into the blob store); a
    dangling link counts 0 (the copy reports it)."""
    sizes = []
    for directory, _, files in os.walk(root):
        for name in files:
            try:
                sizes.append(os.stat(Path(directory, name)).st_size)
            except OSError:
                sizes.append(0)
    return sizes


def load_hub_dataset(uri: ArtifactUri, split: str = "train"):
    """The `split` of the Hub dataset `uri` names, as a `datasets.Dataset` (offline mode honoured).

    `datasets` raises many types (FileNotFoundError, DatasetNotFoundError, HTTP errors): with offline mode on
    (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE) any failure is OfflineMiss; otherwise 401/403/gated is
    AccessDenied, "doesn't exist"/"not found" is NotFound, anything else Unavailable."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - the train extra installs it
        raise MissingDependency(uri.text, "datasets is not installed",
                                "hf:// datasets need the datasets library (pip install 'loraplane[train]')") from exc
    offline = hub_offline() or os.environ.get("HF_DATASETS_OFFLINE", "").lower() in _TRUE
    try:
        return datasets.load_dataset(uri.repo, revision=uri.revision, split=split)
    except Exception as exc:  # noqa: BLE001 - classified below
        text = f"{type(exc).__name__}: {exc}"
        if offline:
            raise OfflineMiss(uri.text, text) from exc
        if "401" in text or "403" in text or "gated" in text.lower():
            raise AccessDenied(uri.text, text) from exc
        if isinstance(exc, FileNotFoundError) or "doesn't exist" in text or "not found" in text.lower():
            raise NotFound(uri.text, text) from exc
        raise Unavailable(uri.text, text) from exc
