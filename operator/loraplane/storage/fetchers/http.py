"""One file over HTTP(S) (`https://HOST/PATH`), with the standard library's client: no extra dependency.

A `huggingface.co` URL gets `Authorization: Bearer $HF_TOKEN` when HF_TOKEN is set (gated files).
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from loraplane.storage.errors import Unavailable, http_error
from loraplane.storage.fetchers.base import Fetcher, partial_path
from loraplane.storage.uri import ArtifactUri, Scheme

_CHUNK = 1 << 20
USER_AGENT = "loraplane"


class HttpFetcher(Fetcher):
    """GETs one file. `timeout_s`: the whole download's budget (None: unbounded); `socket_timeout_s`: the
    longest wait for a connection or for the next bytes (urllib's timeout), so a stalled server fails fast."""

    schemes = (Scheme.HTTP, Scheme.HTTPS)

    def __init__(self, timeout_s: float | None = None, socket_timeout_s: float = 60):
        self.timeout_s = timeout_s
        self.socket_timeout_s = socket_timeout_s if timeout_s is None else min(socket_timeout_s, timeout_s)

    def fetch_file(self, uri: ArtifactUri, dest: Path) -> Path:
        """GET the URL into `dest` (complete or absent). Raises the storage error http_error maps the status
        to, or Unavailable for connection errors and a download past `timeout_s`."""
        url = uri.text
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        token = os.environ.get("HF_TOKEN")
        if token and (urllib.parse.urlsplit(url).hostname or "").endswith("huggingface.co"):
            request.add_header("Authorization", f"Bearer {token}")
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        tmp = partial_path(dest)
        try:
            with urllib.request.urlopen(request, timeout=self.socket_timeout_s) as resp, open(tmp, "wb") as fh:
                while chunk := resp.read(_CHUNK):
                    fh.write(chunk)
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"not complete after {self.timeout_s:g} s")
            os.replace(tmp, dest)
        except urllib.error.HTTPError as exc:
            raise http_error(url, exc.code, str(exc.reason),
                             f"GET {url} answered HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, OSError) as exc:  # TimeoutError is an OSError
            detail = str(getattr(exc, "reason", None) or exc)
            raise Unavailable(url, detail, f"GET {url}: {type(exc).__name__}: {detail}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return dest
