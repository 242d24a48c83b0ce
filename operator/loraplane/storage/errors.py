"""What can go wrong reading or writing an artifact store, by what it means for the caller.

Every fetcher raises one of these, whatever the store (a path, HTTP, S3, the Hugging Face Hub) said; callers
map them to their own reasons (the trainer to DatasetNotFound / DatasetAccessDenied / DatasetUnavailable /
OutputWriteFailed, the loader to FetchFailed / InvalidArtifact). One table (here) decides which HTTP status
and which S3 error code means "not found", "denied" or "try again".
"""

from __future__ import annotations

import re

from loraplane.api.redaction import redacted

# S3 error codes by what they mean for the user (HEAD answers carry only the HTTP status as the code).
S3_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NoSuchBucket", "NotFound"})
S3_DENIED_CODES = frozenset({"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"})
HTTP_NOT_FOUND = frozenset({404, 410})
HTTP_DENIED = frozenset({401, 403})


class StorageError(Exception):
    """A store could not deliver (or take) an artifact.

    `uri`: the URI as written; `detail`: the store's short answer ("HTTP 404 Not Found", "NoSuchKey", a
    network error), for callers that compose their own message; `code`: the HTTP status or S3 error code when
    there is one; str(exc) is a complete message naming the URI.
    """

    def __init__(self, uri: str, detail: str, message: str | None = None, code: str | None = None):
        super().__init__(message or f"{redacted(uri)}: {detail}")
        self.uri, self.detail, self.code = uri, detail, code


class NotFound(StorageError):
    """Nothing at the URI (missing path, HTTP 404/410, no such S3 key or bucket, no such Hub repo)."""


class OfflineMiss(NotFound):
    """Hugging Face offline mode is on (HF_HUB_OFFLINE) and the artifact is not in the local cache."""


class AccessDenied(StorageError):
    """The store refused the credentials (HTTP 401/403, S3 AccessDenied, a gated Hub repo)."""


class NoCredentials(AccessDenied):
    """No credentials were found at all (boto3 found no AWS keys or role)."""


class Unavailable(StorageError):
    """A failure a retry may fix: the network, a server error, throttling, a full or unwritable disk."""


class InvalidContent(StorageError):
    """The store holds something that cannot be an artifact (e.g. an S3 key escaping its prefix)."""


class UnsafeContent(InvalidContent):
    """The artifact holds what no artifact may: a device file, a FIFO or socket, a link leaving the artifact,
    an absolute or '..' member path (loraplane.storage.archive refuses them before anything is written)."""


class TooLarge(InvalidContent):
    """The artifact exceeds a limit of `archive.ArtifactLimits` (member count, member or total unpacked size,
    download size): refused before it fills the disk or memory."""


class Refused(StorageError):
    """The fetch policy refuses the URI or where it leads (plain http:// without the opt-in, a redirect to a
    loopback, link-local or metadata address, too many redirects): retrying cannot help."""


class MissingDependency(StorageError):
    """The scheme needs a library this image lacks (boto3, huggingface_hub, datasets): retrying cannot help."""


def http_error(uri: str, status: int, reason: str, message: str | None = None) -> StorageError:
    """The StorageError for an HTTP error status (4xx/5xx)."""
    detail = f"HTTP {status} {reason}".rstrip()
    cls = NotFound if status in HTTP_NOT_FOUND else AccessDenied if status in HTTP_DENIED else Unavailable
    return cls(uri, detail, message, code=str(status))


def s3_error(uri: str, exc: Exception, message: str | None = None) -> StorageError:
    """The StorageError for an exception of boto3/botocore (ClientError, NoCredentialsError, BotoCoreError,
    boto3's S3UploadFailedError, which carries the error code only in its text)."""
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return NoCredentials(uri, str(exc), message)
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
    else:
        found = re.search(r"An error occurred \((\w+)\)", str(exc))
        code = found.group(1) if found else ""
    cls = NotFound if code in S3_NOT_FOUND_CODES else AccessDenied if code in S3_DENIED_CODES else Unavailable
    return cls(uri, code or str(exc), message or f"{uri}: {exc}", code=code or None)
