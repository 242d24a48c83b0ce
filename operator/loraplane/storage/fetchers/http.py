"""One file over HTTP(S) (`https://HOST/PATH`), with aiohttp (already a dependency of the loader and router).

aiohttp rather than urllib because it gives what a download from an untrusted URL needs without code of ours:
a budget for the whole download (`ClientTimeout.total`) as well as for each read, credentials in the URL turned
into Basic auth (and never printed: messages show the URL without them), paths percent-encoded, redirects
followed only to http(s) and with the Authorization header dropped when they leave the origin, and no proxy
taken from the environment (trust_env=False).

The Hugging Face token (HF_TOKEN) is sent only when the caller asks for it (`send_hub_token`, the trainer's
datasets) and only over https to huggingface.co or one of its subdomains. Explicit `credentials` (an Adapter's
own Secret, bound to this one URL) replace the environment: their HF_TOKEN is sent as a Bearer token to the URL's
own origin (aiohttp drops it on a redirect to another origin), and $HF_TOKEN is then never read.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp

from loraplane.storage.errors import StorageError, Unavailable, http_error
from loraplane.storage.fetchers.base import Fetcher, partial_path
from loraplane.api.redaction import redacted
from loraplane.storage.uri import ArtifactUri, Scheme

_CHUNK = 1 << 20
USER_AGENT = "loraplane"
HUB_HOST = "huggingface.co"


def is_hub_url(url: str) -> bool:
    """True for an https URL whose host is huggingface.co or a subdomain of it (not `evilhuggingface.co`)."""
    try:
        parsed = aiohttp.client.URL(url)
    except ValueError:
        return False
    host = (parsed.host or "").lower().rstrip(".")
    return parsed.scheme == "https" and (host == HUB_HOST or host.endswith("." + HUB_HOST))


class HttpFetcher(Fetcher):
    """GETs one file. `timeout_s`: the whole download's budget (None: unbounded); `socket_timeout_s`: the
    longest wait for a connection or for the next bytes, so a stalled server fails fast; `send_hub_token`:
    send $HF_TOKEN to huggingface.co (is_hub_url) for gated files."""

    schemes = (Scheme.HTTP, Scheme.HTTPS)

    def __init__(self, timeout_s: float | None = None, socket_timeout_s: float = 60, send_hub_token: bool = False,
                 credentials=None):
        self.timeout_s = timeout_s
        self.socket_timeout_s = socket_timeout_s if timeout_s is None else min(socket_timeout_s, timeout_s)
        self.send_hub_token = send_hub_token
        self.credentials = credentials

    @classmethod
    def configured(cls, *, pvc_root: str | Path, http_timeout_s: float | None,
                   send_hub_token: bool = False, credentials=None) -> "HttpFetcher":
        """Fetcher.configured: the whole-download budget, the Hub-token choice and explicit credentials apply;
        pvc_root does not."""
        return cls(http_timeout_s, send_hub_token=send_hub_token, credentials=credentials)

    def fetch_file(self, uri: ArtifactUri, dest: Path) -> Path:
        """Download to `dest` (whole or absent). Raises http_error's classes for an HTTP status other than 200,
        Unavailable for a network failure or an exceeded budget, StorageError for a URL that cannot be sent.
        Runs its own event loop: call it from a thread without one (the cache uses asyncio.to_thread)."""
        shown = redacted(uri.text)
        tmp = partial_path(dest)
        try:
            asyncio.run(self._download(uri.text, shown, tmp))
            os.replace(tmp, dest)
        except StorageError:
            raise
        except aiohttp.InvalidURL as exc:
            raise StorageError(uri.text, "invalid URL", f"GET {shown}: not a URL that can be requested") from exc
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            detail = (f"not complete after {self.timeout_s:g} s" if isinstance(exc, asyncio.TimeoutError)
                      else redacted(str(exc)) or type(exc).__name__)
            raise Unavailable(uri.text, detail, f"GET {shown}: {type(exc).__name__}: {detail}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    async def _download(self, url: str, shown: str, tmp: Path) -> None:
        headers = {"User-Agent": USER_AGENT}
        if self.credentials is not None:  # this URL's own credentials: never the environment's
            if token := self.credentials.get("HF_TOKEN"):
                headers["Authorization"] = f"Bearer {token}"
        elif self.send_hub_token and (token := os.environ.get("HF_TOKEN")) and is_hub_url(url):
            headers["Authorization"] = f"Bearer {token}"
        timeout = aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=self.socket_timeout_s,
                                        sock_read=self.socket_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session, \
                session.get(url, headers=headers) as resp:
            if resp.status != 200:
                raise http_error(url, resp.status, resp.reason or "",
                                 f"GET {shown} answered HTTP {resp.status} {resp.reason or ''}".rstrip())
            with open(tmp, "wb") as fh:
                async for chunk in resp.content.iter_chunked(_CHUNK):
                    fh.write(chunk)
