"""S3 and S3-compatible stores (`s3://BUCKET/KEY`), through boto3.

`s3_client()` is the one construction of the client: credentials from the environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, an IAM role...) and AWS_ENDPOINT_URL for S3-compatible stores
(MinIO, moto in the tests). Besides fetching, `S3Fetcher` offers the few writes the trainer needs (adapter
upload, checkpoint mirror), with the same error mapping (loraplane.storage.errors.s3_error). With explicit
`credentials` (an Adapter's own Secret) the client uses only their keys (and their AWS_ENDPOINT_URL, else the
environment's endpoint): never the environment's keys or the node's role.

The endpoint is untrusted input (an Adapter's credentials Secret, or a FineTuneJob's dataset Secret mapped onto the
trainer's environment), so it passes the same fetch policy as an https:// URL (`check_endpoint`): https only
(plain http with `FetchPolicy.allow_insecure_http`), and none of the host's resolved addresses may be one that
`http.refused_address` refuses (link-local and cloud metadata always; loopback without the opt-in). The check runs
when the client is made; botocore resolves the host again when it connects, so a DNS name that changes its
answer in between (rebinding) is not covered: use an address, or a name you control.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from loraplane.api.redaction import redacted
from loraplane.storage.errors import (InvalidContent, MissingDependency, NoCredentials, NotFound, Refused,
                                      Unavailable, s3_error)
from loraplane.storage.fetchers.base import Fetcher, FetchPolicy, check_listing, partial_path
from loraplane.storage.fetchers.http import refused_address
from loraplane.storage.uri import ArtifactUri, Scheme

# DeleteObjects takes at most 1000 keys per request (S3 API limit).
_DELETE_BATCH = 1000


def _boto_errors() -> tuple[type[Exception], ...]:
    """The exception types boto3 raises for a failed call (none without boto3: s3_client raised already)."""
    try:
        from boto3.exceptions import Boto3Error  # upload_file wraps S3 errors in S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover
        return ()
    return Boto3Error, BotoCoreError, ClientError


def check_endpoint(endpoint: str, policy: FetchPolicy, uri: str = "s3://", origin: str = "the environment") -> None:
    """Refuse an S3 endpoint URL the fetch policy does not allow (module docstring): Refused for a scheme other
    than https (http only with `policy.allow_insecure_http`), no host, or a host any of whose addresses
    `refused_address` refuses; Unavailable when the host does not resolve (retryable). `origin` says where the
    endpoint came from ("Secret x", "the environment") and `uri` names the artifact, in messages."""
    shown = redacted(endpoint)
    try:
        parts = urlsplit(endpoint)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise Refused(uri, "bad endpoint", f"{uri}: AWS_ENDPOINT_URL {shown!r} from {origin} is not a URL ({exc})") \
            from exc
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http") or not host:
        raise Refused(uri, "bad endpoint", f"{uri}: AWS_ENDPOINT_URL {shown!r} from {origin} must be an "
                      "https://HOST[:PORT] URL")
    if scheme == "http" and not policy.allow_insecure_http:
        raise Refused(uri, "insecure endpoint", f"{uri}: AWS_ENDPOINT_URL {shown!r} from {origin} is plain http; "
                      "use https (plain http only with the chart's allowInsecureHttp, for local use)")
    try:
        infos = socket.getaddrinfo(host, port or (443 if scheme == "https" else 80), type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise Unavailable(uri, f"cannot resolve {host}", f"{uri}: the S3 endpoint host {host!r} (AWS_ENDPOINT_URL "
                          f"from {origin}) does not resolve: {exc}") from exc
    for info in infos:
        if why := refused_address(str(info[4][0]), allow_loopback=policy.allow_insecure_http):
            raise Refused(uri, "refused endpoint", f"{uri}: the S3 endpoint {shown!r} (AWS_ENDPOINT_URL from "
                          f"{origin}) resolves to a refused address: {why}")


def s3_client(credentials=None, uri: str = "s3://", policy: FetchPolicy | None = None):
    """A boto3 S3 client configured from the environment (see the module docstring), or from `credentials`
    alone (storage.credentials.Credentials), its endpoint checked against `policy` (None: FetchPolicy.from_env(),
    the trainer's) by check_endpoint. Raises MissingDependency without boto3, NoCredentials when `credentials`
    lack AWS_ACCESS_KEY_ID or AWS_SECRET_ACCESS_KEY (`uri` names the artifact in the message), check_endpoint's
    Refused / Unavailable."""
    try:
        import boto3
    except ImportError as exc:  # pragma: no cover - the images install the s3 extra
        raise MissingDependency("s3://", "boto3 is not installed",
                                "s3:// needs boto3 (pip install 'loraplane[s3]')") from exc
    policy = FetchPolicy.from_env() if policy is None else policy
    if credentials is None:
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
        if endpoint:
            check_endpoint(endpoint, policy, uri)
        return boto3.client("s3", endpoint_url=endpoint)
    key_id, secret = credentials.get("AWS_ACCESS_KEY_ID"), credentials.get("AWS_SECRET_ACCESS_KEY")
    if not (key_id and secret):
        raise NoCredentials(uri, "no AWS keys", f"{uri}: {credentials.origin} has no AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY (does the Secret exist, with those keys?)")
    own = credentials.get("AWS_ENDPOINT_URL")
    endpoint = own or os.environ.get("AWS_ENDPOINT_URL") or None
    if endpoint:
        check_endpoint(endpoint, policy, uri, credentials.origin if own else "the environment")
    # A Session of its own: the default session would fill what is missing from the environment.
    return boto3.session.Session(aws_access_key_id=key_id, aws_secret_access_key=secret,
                                 aws_session_token=credentials.get("AWS_SESSION_TOKEN")).client(
        "s3", endpoint_url=endpoint)


class S3Fetcher(Fetcher):
    """Objects of one S3 endpoint. `client`: a boto3 S3 client (default: s3_client(credentials), made on first
    use); `credentials`: this fetch's own (storage.credentials), else the environment's."""

    schemes = (Scheme.S3,)

    def __init__(self, client=None, credentials=None, policy: FetchPolicy | None = None):
        self._client = client
        self.credentials = credentials
        self.policy = policy

    @classmethod
    def configured(cls, *, pvc_root: str | Path, http_timeout_s: float | None,
                   send_hub_token: bool = False, policy=None, credentials=None) -> "S3Fetcher":
        """Fetcher.configured: `credentials` and `policy` apply (the endpoint, from the credentials or the
        environment, is checked against the policy: s3_client)."""
        return cls(credentials=credentials, policy=policy)

    @property
    def client(self):
        """The boto3 S3 client, made with s3_client(credentials, policy=policy) on first use when none was given
        (its errors: s3_client's)."""
        if self._client is None:
            self._client = s3_client(self.credentials, policy=self.policy)
        return self._client

    # ---- reads -------------------------------------------------------------------------------------------
    def fetch_file(self, uri: ArtifactUri, dest: Path) -> Path:
        """The object s3://BUCKET/KEY to `dest`."""
        if not uri.key or uri.key.endswith("/"):
            raise NotFound(uri.text, "no key", f"{uri}: names no object (expected s3://BUCKET/KEY)")
        tmp = partial_path(dest)
        try:
            if self.policy is not None and self.policy.max_bytes is not None:   # refused before it fills the disk
                size = self.client.head_object(Bucket=uri.bucket, Key=uri.key).get("ContentLength") or 0
                check_listing(uri.text, [size], self.policy, "the object")
            self.client.download_file(uri.bucket, uri.key, str(tmp))
            check_listing(uri.text, [tmp.stat().st_size], self.policy, "the object downloaded")
            os.replace(tmp, dest)
        except _boto_errors() as exc:
            raise s3_error(uri.text, exc) from exc
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def fetch_tree(self, uri: ArtifactUri, dest: Path) -> Path:
        """Every object under the prefix KEY/ to `dest`, keeping the relative layout. NotFound when the prefix
        holds no object; InvalidContent for a key that would land outside `dest`."""
        prefix = uri.key.rstrip("/") + "/" if uri.key else ""
        objects = self.list_objects(uri.bucket or "", prefix, uri=uri.text,
                                    max_files=self.policy.max_files if self.policy is not None else None)
        files = {k: size for k, size in objects.items() if k[len(prefix):] and not k.endswith("/")}
        check_listing(uri.text, list(files.values()), self.policy, "the prefix")   # before any download
        dest.mkdir(parents=True, exist_ok=True)
        written: list[int] = []   # sizes so far; checked as a running count and total (linear in the files)
        total = 0
        try:
            for key in sorted(files):
                rel = key[len(prefix):]
                target = dest / rel
                if dest.resolve() not in target.resolve().parents:
                    raise InvalidContent(uri.text, f"key {key!r}", f"s3 key {key!r} escapes the artifact directory")
                target.parent.mkdir(parents=True, exist_ok=True)
                self.client.download_file(uri.bucket, key, str(target))
                size = target.stat().st_size
                written.append(size)
                total += size
                check_listing(uri.text, written, self.policy, "what was downloaded", total)   # grown since listed
        except _boto_errors() as exc:
            raise s3_error(uri.text, exc) from exc
        if not written:
            raise NotFound(uri.text, "empty prefix", f"{uri}: no objects under that prefix")
        return dest

    def list_objects(self, bucket: str, prefix: str, uri: str | None = None,
                     max_files: int | None = None) -> dict[str, int]:
        """{key: size in bytes} of every object under `prefix` (paginated, 1,000 keys a page). With `max_files`,
        the listing stops at the page where more than that many files (keys other than `prefix` and "folder"
        placeholders ending in '/') were seen: a caller that refuses so many needs no more, and a prefix of
        millions of objects would otherwise cost thousands of requests and their keys' memory first."""
        out: dict[str, int] = {}
        files = 0
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    out[key] = obj["Size"]
                    files += key != prefix and not key.endswith("/")
                if max_files is not None and files > max_files:
                    break
        except _boto_errors() as exc:
            raise s3_error(uri or f"s3://{bucket}/{prefix}", exc) from exc
        return out

    def download_key(self, bucket: str, key: str, dest: Path) -> None:
        """One object by bucket and key (callers that walk a listing)."""
        try:
            self.client.download_file(bucket, key, str(dest))
        except _boto_errors() as exc:
            raise s3_error(f"s3://{bucket}/{key}", exc) from exc

    # ---- writes ------------------------------------------------------------------------------------------
    def upload_file(self, path: Path, bucket: str, key: str) -> None:
        """Upload one file to s3://BUCKET/KEY. Raises the storage error s3_error maps boto's to."""
        try:
            self.client.upload_file(str(path), bucket, key)
        except _boto_errors() as exc:
            raise s3_error(f"s3://{bucket}/{key}", exc) from exc

    def upload_tree(self, local_dir: Path, uri: ArtifactUri) -> None:
        """Upload the regular files of `local_dir` under s3://BUCKET/KEY/ (the object layout mirrors the
        directory), in sorted order."""
        local_dir = Path(local_dir)
        try:
            for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
                key = "/".join(x for x in (uri.key.rstrip("/"), path.relative_to(local_dir).as_posix()) if x)
                self.client.upload_file(str(path), uri.bucket, key)
        except _boto_errors() as exc:
            raise s3_error(uri.text, exc) from exc

    def delete_keys(self, bucket: str, keys: list[str]) -> None:
        """Delete `keys` from `bucket`, 1000 per DeleteObjects request (the S3 API limit). Raises the storage
        error s3_error maps boto's to."""
        try:
            for i in range(0, len(keys), _DELETE_BATCH):
                batch = [{"Key": k} for k in keys[i:i + _DELETE_BATCH]]
                self.client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        except _boto_errors() as exc:
            raise s3_error(f"s3://{bucket}", exc) from exc
