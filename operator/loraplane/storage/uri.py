"""The one parser of artifact URIs: every component that reads `spec.*.uri` asks this module what it names.

Schemes (the same set the API's URI fields admit):

  URI                           scheme   fields                     read from
  /abs/path, file:///abs/path   local    path                       the path itself
  pvc://CLAIM[/PATH]            pvc      claim, path                PVC_ROOT/CLAIM/PATH (each claim is mounted there)
  s3://BUCKET[/KEY]             s3       bucket, key                S3 (or AWS_ENDPOINT_URL), through boto3
  http(s)://HOST/...            http(s)  url (the text)             one file over HTTP(S)
  hf://ORG/REPO[@REVISION]      hf       repo, revision             the Hugging Face Hub (or its local cache)

`parse_uri` raises ValueError naming the problem for anything else; nothing else in the project looks at the
prefix of a URI string. Like KubeAI's `parseModelURL`, it returns a typed value the callers branch on.

`cache_key` (of the URI text, plus version and digest when given) and `fetched_model_path` are pure: builders write the path into pod specs
(vLLM's `--model`) and `loraplane fetch-model` leaves the model there, so both must agree on them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit

from loraplane.api.paths import PVC_ROOT
from loraplane.api.redaction import redacted

# A PVC name is a DNS-1123 subdomain (what the API's pvc:// pattern and Kubernetes accept).
_CLAIM = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
# S3 bucket names: letters, digits, dots, hyphens (and underscores in legacy us-east-1 buckets).
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# A Hub repo id: NAME or ORG/NAME (huggingface_hub's validate_repo_id allows these characters).
_REPO = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
# The environment variables the fetchers read credentials from (boto3's standard AWS_* names; the Hub token for
# hf:// and huggingface.co URLs). Builders map a credentials Secret onto them: a whole Secret onto every name
# (each key optional), a single key onto its scheme's TOKEN_ENV.
CREDENTIAL_ENV = ("HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL")


class Scheme(StrEnum):
    """Where an artifact lives; the value is what a URI starts with (`local` for plain paths)."""

    LOCAL = "local"
    PVC = "pvc"
    S3 = "s3"
    HTTP = "http"
    HTTPS = "https"
    HF = "hf"


# A one-key credentials Secret is the token of its URI's scheme (default HF_TOKEN).
TOKEN_ENV: dict[Scheme, str] = {Scheme.S3: "AWS_SECRET_ACCESS_KEY"}


@dataclass(frozen=True)
class ArtifactUri:
    """A parsed artifact URI. `text` is the URI as written (cache keys and fetches use it unchanged); str() and
    repr() are what a message may show: redacted (api.redaction: no userinfo, no presigned-URL secrets, cut),
    so formatting an ArtifactUri into a message or a log line never leaks a credential it carries.

    Fields by scheme: local `path` (absolute); pvc `claim` and `path` (inside the claim, no leading or
    trailing slash, may be empty); s3 `bucket` and `key` (as written: may be empty or end in "/"); http(s) the
    URL is `text`; hf `repo` and `revision` (None: the default branch).
    """

    text: str
    scheme: Scheme
    path: str = ""
    claim: str | None = None
    bucket: str | None = None
    key: str = ""
    repo: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        return redacted(self.text)

    def __repr__(self) -> str:
        return f"ArtifactUri({redacted(self.text)!r}, scheme={self.scheme.value!r})"

    @property
    def is_local(self) -> bool:
        """True for a path on this machine (local) or on a mounted claim (pvc): read, never downloaded."""
        return self.scheme in (Scheme.LOCAL, Scheme.PVC)

    @property
    def is_remote(self) -> bool:
        """True when the artifact is copied from a store over the network (every scheme but local and pvc)."""
        return not self.is_local

    @property
    def token_env(self) -> str:
        """The environment variable a one-key credentials Secret fills for this scheme (CREDENTIAL_ENV)."""
        return TOKEN_ENV.get(self.scheme, "HF_TOKEN")

    @property
    def is_http(self) -> bool:
        """True for http:// and https:// URLs (one file, fetched with a GET)."""
        return self.scheme in (Scheme.HTTP, Scheme.HTTPS)

    @property
    def pvc_claim(self) -> str | None:
        """The PersistentVolumeClaim a pvc:// URI names, else None."""
        return self.claim if self.scheme == Scheme.PVC else None

    def local_path(self, pvc_root: str | Path = PVC_ROOT) -> Path | None:
        """Where a local or pvc URI is read on this machine (pvc: `pvc_root/CLAIM/PATH`); None for remote ones."""
        if self.scheme == Scheme.LOCAL:
            return Path(self.path)
        if self.scheme == Scheme.PVC:
            return Path(pvc_root, self.claim or "", self.path) if self.path else Path(pvc_root, self.claim or "")
        return None

    def mount_path(self, pvc_root: str = PVC_ROOT) -> str | None:
        """local_path as the string written into a pod spec (no normalisation beyond the parser's)."""
        if self.scheme == Scheme.LOCAL:
            return self.path
        if self.scheme == Scheme.PVC:
            return pvc_mount_path(self.claim or "", pvc_root) + (f"/{self.path}" if self.path else "")
        return None

    @property
    def name(self) -> str:
        """The last component of the path, key or URL (query left out): what archive detection looks at."""
        if self.is_http:
            return urlsplit(self.text).path.rstrip("/").rsplit("/", 1)[-1]
        if self.scheme == Scheme.S3:
            return self.key.rstrip("/").rsplit("/", 1)[-1]
        if self.scheme == Scheme.HF:
            return (self.repo or "").rsplit("/", 1)[-1]
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def is_archive(self) -> bool:
        """The URI names one .tar.gz/.tgz/.tar file (to be unpacked) rather than a directory (a trailing "/"
        makes it a directory, whatever its name)."""
        return not self.text.split("?", 1)[0].endswith("/") and self.name.endswith(ARCHIVE_SUFFIXES)


def pvc_mount_path(claim: str, pvc_root: str = PVC_ROOT) -> str:
    """Where a pod mounts PersistentVolumeClaim `claim` (each claim at its own folder under PVC_ROOT)."""
    return f"{pvc_root}/{claim}"


def parse_uri(text: str) -> ArtifactUri:
    """Parse an artifact URI (see the module docstring). Raises ValueError saying what is wrong with `text`."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty URI: expected a path, file://, pvc://, s3://, http(s):// or hf:// URI")
    shown = redacted(text)
    if text != text.strip():
        raise ValueError(f"URI {shown!r} has leading or trailing whitespace")
    if text.startswith("/"):
        return ArtifactUri(text, Scheme.LOCAL, path=text)
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise ValueError(f"{shown!r} is neither an absolute path nor a URI: use /PATH, file:///PATH, "
                         "pvc://CLAIM/PATH, s3://BUCKET/KEY, https://… or hf://ORG/REPO")
    if scheme == "file":
        if not rest.startswith("/"):
            raise ValueError(f"{shown!r}: a file:// URI names an absolute path (file:///PATH)")
        return ArtifactUri(text, Scheme.LOCAL, path=rest)
    if scheme == "pvc":
        claim, _, path = rest.partition("/")
        if not claim:
            raise ValueError(f"{shown!r}: no claim name (expected pvc://CLAIM/PATH)")
        if len(claim) > 253 or not _CLAIM.match(claim):
            raise ValueError(f"{shown!r}: {claim!r} is not a valid PersistentVolumeClaim name (lowercase letters, "
                             "digits, '-' and '.', starting and ending with a letter or digit; at most 253)")
        path = path.strip("/")
        if ".." in path.split("/"):
            raise ValueError(f"{shown!r}: the path must stay inside the claim (no '..')")
        return ArtifactUri(text, Scheme.PVC, claim=claim, path=path)
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise ValueError(f"{shown!r}: no bucket (expected s3://BUCKET/KEY)")
        if not _BUCKET.match(bucket):
            raise ValueError(f"{shown!r}: {bucket!r} is not a valid S3 bucket name")
        return ArtifactUri(text, Scheme.S3, bucket=bucket, key=key)
    if scheme in ("http", "https"):
        if not urlsplit(text).hostname:
            raise ValueError(f"{shown!r}: no host (expected {scheme}://HOST/PATH)")
        return ArtifactUri(text, Scheme(scheme))
    if scheme == "hf":
        repo, at, revision = rest.partition("@")
        repo = repo.strip("/")
        if not repo:
            raise ValueError(f"{shown!r}: no repository (expected hf://ORG/REPO[@REVISION])")
        if not _REPO.match(repo):
            raise ValueError(f"{shown!r}: {repo!r} is not a Hugging Face repo id (ORG/NAME)")
        return ArtifactUri(text, Scheme.HF, repo=repo, revision=revision or None)
    raise ValueError(f"unsupported URI scheme {scheme + '://'!r} in {shown!r}: use a path, file://, pvc://, s3://, "
                     "http(s):// or hf://")


def try_parse_uri(text: str | None) -> ArtifactUri | None:
    """parse_uri, or None for an empty or malformed URI (for pure code that must not raise, e.g. builders; the
    component that fetches the URI reports the problem)."""
    try:
        return parse_uri(text) if text else None
    except ValueError:
        return None


def recorded_path(text: str, pvc_root: str | Path = PVC_ROOT) -> Path | None:
    """The local path a *recorded* model reference names (peft's `base_model_name_or_path`): an artifact URI
    with a local path, or a relative/home path as peft writes it (./x, ../x, ~/x, not expanded). None for a hub
    id or a remote URI."""
    if text.startswith(("./", "../", "~")):
        return Path(text)
    uri = try_parse_uri(text)
    return uri.local_path(pvc_root) if uri else None


def cache_key(uri: str | ArtifactUri, version: str | None = None, sha256: str | None = None) -> str:
    """The cache entry name of an artifact: a hash of its URI exactly as written (so a pod spec and the program
    that fills the cache agree without sharing state) and, when known, of the version and the expected digest.

    Two versions published at one URI (a source overwritten in place) are two entries: fetching the second never
    replaces the files the first is loaded from. With neither version nor digest the key is the URI's alone
    (base models, `fetched_model_path`)."""
    text = uri.text if isinstance(uri, ArtifactUri) else uri   # str(ArtifactUri) is redacted
    if version is None and sha256 is None:
        return hashlib.sha256(text.encode()).hexdigest()[:32]
    identity = "\n".join((text, f"version={version or ''}", f"sha256={(sha256 or '').lower()}"))
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def fetched_model_path(cache_dir: str | Path, uri: str | ArtifactUri) -> Path:
    """Where `loraplane fetch-model` leaves the base model at `uri` (what vLLM's --model then names)."""
    return Path(cache_dir) / cache_key(uri)
