"""One file over HTTP(S) (`https://HOST/PATH`), with aiohttp (already a dependency of the loader and router).

aiohttp rather than urllib because it gives what a download from an untrusted URL needs: a budget for the whole
download (`ClientTimeout.total`) as well as for each read, paths percent-encoded, a pluggable resolver and no
proxy taken from the environment (trust_env=False).

A URL is whatever the author of an Adapter or ModelRoute wrote, fetched from inside the cluster, so the fetch
policy (`FetchPolicy`) keeps it from reaching what the author could not (blind SSRF):

- https only; plain http:// only with `allow_insecure_http` (the chart's `allowInsecureHttp`).
- Redirects are followed by this module, at most MAX_REDIRECTS, only to http(s) (https only without the opt-in).
- Every address a connection goes to is checked after DNS resolution, at connect time (a resolver wrapping
  aiohttp's, no DNS cache: no rebinding between check and connect), and literal IP hosts before the request:
  link-local (169.254.0.0/16, fe80::/10, so the cloud metadata service), the other metadata addresses in
  METADATA_ADDRESSES, unspecified and multicast addresses are refused; loopback only with the opt-in.
- Credentials (the URL's userinfo as Basic auth, the Hub token) go only to the URL's own origin: a redirect to
  another scheme, host or port carries none of them.
- A download stops at `max_bytes` (the artifact limit).

The Hugging Face token (HF_TOKEN) is sent only when the caller asks for it (`send_hub_token`, the trainer's
datasets) and only over https to a host that is huggingface.co or one of its subdomains (is_hub_url). Explicit
`credentials` (an Adapter's own Secret, bound to this one URL) replace the environment: their HF_TOKEN is sent as a
Bearer token to the URL's own origin only, and $HF_TOKEN is then never read; and only when that origin is
huggingface.co or listed in the Secret's own ALLOWED_ORIGINS key (storage.credentials.ORIGINS_KEY), else the fetch
is Refused: an Adapter's author may name a Secret they cannot read, and must not be able to send it anywhere.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import socket
from pathlib import Path

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from loraplane.api.redaction import redacted
from loraplane.storage.credentials import ORIGINS_KEY, origin_of
from loraplane.storage.errors import Refused, StorageError, TooLarge, Unavailable, http_error
from loraplane.storage.fetchers.base import Fetcher, FetchPolicy, partial_path
from loraplane.storage.uri import ArtifactUri, Scheme

_CHUNK = 1 << 20
USER_AGENT = "loraplane"
HUB_HOST = "huggingface.co"
MAX_REDIRECTS = 5
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Cloud metadata services outside the link-local range: AWS over IPv6, Alibaba Cloud, Azure's wireserver.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in
                               ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "168.63.129.16"))


def is_hub_url(url: str) -> bool:
    """True for an https URL whose host is huggingface.co or a subdomain of it (not `evilhuggingface.co`)."""
    try:
        parsed = aiohttp.client.URL(url)
    except ValueError:
        return False
    host = (parsed.host or "").lower().rstrip(".")
    return parsed.scheme == "https" and (host == HUB_HOST or host.endswith("." + HUB_HOST))


# NAT64 prefixes (RFC 6052 well-known 64:ff9b::/96, RFC 8215 local-use 64:ff9b:1::/48): an address in them reaches
# the IPv4 address embedded in it through the network's translator.
_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
# Where RFC 6052 section 2.2 puts the IPv4 address for each prefix length a local-use NAT64 prefix may have:
# (bit offsets from the left of the 128-bit address) of its first and last 16 bits; bits 64-71 are skipped.
# The local-use prefix is a /48, so a network's prefix in it is /48, /56, /64 or /96.
_RFC6052_SPLITS = ((48, 72), (56, 72), (64, 72), (96, 96))


def _bits(value: int, start: int, length: int) -> int:
    return (value >> (128 - start - length)) & ((1 << length) - 1)


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address reaches (or may reach) through a translation mechanism: IPv4-mapped
    (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d, deprecated but still routed by some stacks), 6to4
    (2002:AABB:CCDD::/48), Teredo (server and client), NAT64 well-known (64:ff9b::/96) and every RFC 6052
    position of the local-use NAT64 prefix 64:ff9b:1::/48. Empty for an address with none."""
    out: list[ipaddress.IPv4Address] = []
    value = int(ip)
    if ip.ipv4_mapped is not None:
        out.append(ip.ipv4_mapped)
    if ip in _IPV4_COMPATIBLE and value > 1:   # not :: or ::1 (unspecified, loopback: checked as IPv6)
        out.append(ipaddress.IPv4Address(value & 0xFFFFFFFF))
    if ip.sixtofour is not None:
        out.append(ip.sixtofour)
    if ip.teredo is not None:
        out.extend(ip.teredo)
    if ip in _NAT64_WELL_KNOWN:
        out.append(ipaddress.IPv4Address(value & 0xFFFFFFFF))
    if ip in _NAT64_LOCAL:
        for first, second in _RFC6052_SPLITS:
            if first == 96:
                out.append(ipaddress.IPv4Address(value & 0xFFFFFFFF))
                continue
            head = min(32, 64 - first)   # bits of the IPv4 address before the skipped octet
            v4 = (_bits(value, first, head) << (32 - head)) | _bits(value, second, 32 - head)
            out.append(ipaddress.IPv4Address(v4))
    return out


def refused_address(address: str, allow_loopback: bool = False) -> str | None:
    """Why a connection to the IP `address` is refused (None: allowed): a metadata address, link-local,
    unspecified, multicast, or loopback unless `allow_loopback`. An IPv6 address that embeds an IPv4 address
    (embedded_ipv4: mapped, compatible, 6to4, Teredo, NAT64) is also refused when any embedded one is. A text
    that is not an IP address is refused."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return f"{address!r} is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped   # the kernel connects to the IPv4 address itself: every rule applies
    if isinstance(ip, ipaddress.IPv6Address):
        for v4 in embedded_ipv4(ip):
            # Only the rules about where a translated packet lands: zero bits read at a guessed NAT64 position
            # give 0.0.0.0, which no translator forwards, and must not refuse an honest address.
            if why := _refused_ip(v4, allow_loopback, host_rules=False):
                return f"{ip} embeds {v4}: {why}"
    return _refused_ip(ip, allow_loopback)


def _refused_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, allow_loopback: bool,
                host_rules: bool = True) -> str | None:
    if ip in METADATA_ADDRESSES:
        return f"{ip} is a cloud metadata address"
    if ip.is_link_local:
        return f"{ip} is a link-local address"
    if host_rules and (ip.is_unspecified or ip.is_multicast):
        return f"{ip} is not a host address"
    if ip.is_loopback and not allow_loopback:
        return f"{ip} is a loopback address (allowed only with allowInsecureHttp, for local use)"
    return None


def url_refusal(url: URL | str, allow_insecure_http: bool) -> tuple[str, str] | None:
    """Why the fetch policy refuses `url` before any request ((short reason, message); None: not refused here):
    a scheme other than https (or http with `allow_insecure_http`), or an IP-literal host that refused_address
    refuses. A host name is checked when it is resolved (PolicyResolver), not here. The one rule of the fetchers
    and of `loraplane validate`'s warnings."""
    url = URL(url) if isinstance(url, str) else url
    allowed = ("https", "http") if allow_insecure_http else ("https",)
    if url.scheme not in allowed:
        hint = " (plain http:// is allowed only with the chart's allowInsecureHttp)" if url.scheme == "http" else ""
        return f"{url.scheme}:// refused", f"{redacted(str(url))} is not an https:// URL{hint}"
    host = (url.host or "").strip("[]")
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None   # a name: the resolver checks what it resolves to
    if why := refused_address(host, allow_insecure_http):
        return why, why
    return None


class _AddressRefused(Exception):
    """Raised from the resolver (not an OSError, so aiohttp passes it through unwrapped)."""

    def __init__(self, host: str, why: str):
        super().__init__(f"{host} resolves to a refused address: {why}")


class PolicyResolver(AbstractResolver):
    """aiohttp resolver that refuses a host any of whose addresses `refused_address` refuses; the addresses it
    returns are the ones aiohttp connects to (with the connector's DNS cache off, at every connection)."""

    def __init__(self, allow_loopback: bool):
        self.allow_loopback = allow_loopback
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        """The addresses of `host`, or _AddressRefused naming the first refused one."""
        infos = await self._inner.resolve(host, port, family)
        for info in infos:
            if why := refused_address(info["host"], self.allow_loopback):
                raise _AddressRefused(host, why)
        return infos

    async def close(self) -> None:
        """Close the wrapped resolver."""
        await self._inner.close()


def _origin(url: URL) -> tuple[str, str, int | None]:
    return url.scheme, (url.host or "").lower().rstrip("."), url.port


class HttpFetcher(Fetcher):
    """GETs one file. `timeout_s`: the whole download's budget (None: unbounded); `socket_timeout_s`: the
    longest wait for a connection or for the next bytes, so a stalled server fails fast; `send_hub_token`:
    send $HF_TOKEN to huggingface.co (is_hub_url) for gated files; `policy`: plain http and loopback opt-in,
    the largest download (see the module docstring)."""

    schemes = (Scheme.HTTP, Scheme.HTTPS)

    def __init__(self, timeout_s: float | None = None, socket_timeout_s: float = 60, send_hub_token: bool = False,
                 policy: FetchPolicy = FetchPolicy(), credentials=None):
        self.timeout_s = timeout_s
        self.socket_timeout_s = socket_timeout_s if timeout_s is None else min(socket_timeout_s, timeout_s)
        self.send_hub_token = send_hub_token
        self.policy = policy
        self.credentials = credentials

    @classmethod
    def configured(cls, *, pvc_root: str | Path, http_timeout_s: float | None,
                   send_hub_token: bool = False, policy: FetchPolicy = FetchPolicy(),
                   credentials=None) -> "HttpFetcher":
        """Fetcher.configured: the whole-download budget, the Hub-token choice, the policy and explicit
        credentials apply; pvc_root does not."""
        return cls(http_timeout_s, send_hub_token=send_hub_token, policy=policy, credentials=credentials)

    def fetch_file(self, uri: ArtifactUri, dest: Path) -> Path:
        """Download to `dest` (whole or absent). Raises Refused for what the policy refuses (scheme, address,
        redirects), TooLarge past policy.max_bytes, http_error's classes for an HTTP status other than 200,
        Unavailable for a network failure or an exceeded budget, StorageError for a URL that cannot be sent.
        Runs its own event loop: call it from a thread without one (the cache uses asyncio.to_thread)."""
        shown = redacted(uri.text)
        tmp = partial_path(dest)
        try:
            asyncio.run(self._download(uri.text, shown, tmp))
            os.replace(tmp, dest)
        except StorageError:
            raise
        except _AddressRefused as exc:
            raise Refused(uri.text, str(exc), f"GET {shown}: {exc}") from exc
        except aiohttp.InvalidURL as exc:
            raise StorageError(uri.text, "invalid URL", f"GET {shown}: not a URL that can be requested") from exc
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            detail = (f"not complete after {self.timeout_s:g} s" if isinstance(exc, asyncio.TimeoutError)
                      else redacted(str(exc)) or type(exc).__name__)
            raise Unavailable(uri.text, detail, f"GET {shown}: {type(exc).__name__}: {detail}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def _check_url(self, url: URL, text: str, shown: str) -> None:
        """Refused unless the policy admits `url`'s scheme and (for an IP literal) its address (url_refusal)."""
        if refusal := url_refusal(url, self.policy.allow_insecure_http):
            raise Refused(text, refusal[0], f"GET {shown}: {refusal[1]}")

    async def _download(self, text: str, shown: str, tmp: Path) -> None:
        url = URL(text)
        origin = _origin(url)
        headers = {"User-Agent": USER_AGENT}
        credentials: dict[str, str] = {}
        if url.user is not None:   # the URL's own credentials, as Basic auth, to its origin only
            userinfo = f"{url.user or ''}:{url.password or ''}".encode()
            credentials["Authorization"] = "Basic " + base64.b64encode(userinfo).decode()
            url = url.with_user(None)
        if self.credentials is not None:  # this URL's own credentials: never the environment's
            if token := self.credentials.get("HF_TOKEN"):
                if not (is_hub_url(text) or self.credentials.may_send_to(text)):
                    # The Adapter's author may name a Secret they cannot read: its owner says where it may go.
                    raise Refused(text, "credentials not for this host", (
                        f"GET {shown}: {self.credentials.origin} may not be sent to {origin_of(text) or shown}: "
                        f"add that origin to the Secret's {ORIGINS_KEY} key (comma-separated https://host[:port]), "
                        "or use a Secret made for this host"))
                credentials["Authorization"] = f"Bearer {token}"
        elif self.send_hub_token and (token := os.environ.get("HF_TOKEN")) and is_hub_url(text):
            credentials["Authorization"] = f"Bearer {token}"
        timeout = aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=self.socket_timeout_s,
                                        sock_read=self.socket_timeout_s)
        connector = aiohttp.TCPConnector(resolver=PolicyResolver(self.policy.allow_insecure_http),
                                         use_dns_cache=False)
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False, connector=connector) as session:
            for _ in range(MAX_REDIRECTS + 1):
                self._check_url(url, text, shown)
                hop_headers = {**headers, **(credentials if _origin(url) == origin else {})}
                async with session.get(url, headers=hop_headers, allow_redirects=False) as resp:
                    if resp.status in _REDIRECT_STATUSES and "Location" in resp.headers:
                        # Any userinfo the server put in Location is dropped too: credentials are never sent
                        # anywhere but the origin the author named.
                        url = url.join(URL(resp.headers["Location"])).with_user(None)
                        continue
                    if resp.status != 200:
                        raise http_error(text, resp.status, resp.reason or "",
                                         f"GET {shown} answered HTTP {resp.status} {resp.reason or ''}".rstrip())
                    await self._save(resp, text, shown, tmp)
                    return
            raise Refused(text, "too many redirects", f"GET {shown}: more than {MAX_REDIRECTS} redirects")

    async def _save(self, resp: aiohttp.ClientResponse, text: str, shown: str, tmp: Path) -> None:
        limit = self.policy.max_bytes
        too_large = TooLarge(text, "download too large", f"GET {shown}: larger than the artifact limit of "
                             f"{limit} bytes")
        if limit is not None and (resp.content_length or 0) > limit:
            raise too_large
        written = 0
        with open(tmp, "wb") as fh:
            async for chunk in resp.content.iter_chunked(_CHUNK):
                written += len(chunk)
                if limit is not None and written > limit:
                    raise too_large
                fh.write(chunk)
