"""The HTTP fetch policy (issue 12, item 7): no blind SSRF through `source.uri` / `baseModel.uri`.

Two aiohttp servers on loopback stand in for "the author's server" and "another host" (127.0.0.1 vs localhost,
different ports). Before the fix: plain http and loopback were fetched, redirects were followed anywhere
(credentials included for the same host name), and link-local addresses were reachable.
"""

from __future__ import annotations

import socket

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from loraplane.storage.cache import ArtifactCache, FetchError
from loraplane.api.reasons import Reason
from loraplane.storage.errors import Refused, TooLarge
from loraplane.storage.fetchers import FetchPolicy
from loraplane.storage.fetchers.http import HttpFetcher, refused_address
from loraplane.storage.uri import parse_uri

LOCAL = FetchPolicy(allow_insecure_http=True)


class Site:
    """One loopback server recording the Authorization header of every request it gets."""

    def __init__(self, host: str):
        self.host, self.seen = host, []
        self.app = web.Application()
        self.app.router.add_get("/{name:.*}", self.handle)
        self.redirects: dict[str, str] = {}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.path, request.headers.get("Authorization")))
        if target := self.redirects.get(request.path):
            raise web.HTTPFound(target)
        if request.path == "/forever":
            resp = web.StreamResponse()
            await resp.prepare(request)
            for _ in range(64):
                await resp.write(b"x" * 65536)
            return resp
        return web.Response(body=b"data")

    async def __aenter__(self) -> "Site":
        self.server = TestServer(self.app, host=self.host)
        await self.server.start_server()
        self.base = f"http://{self.host}:{self.server.port}"
        return self

    async def __aexit__(self, *exc) -> None:
        await self.server.close()


def fetch(url: str, tmp_path, policy=LOCAL, **kw) -> bytes:
    out = tmp_path / "out"
    HttpFetcher(timeout_s=10, policy=policy, **kw).fetch_file(parse_uri(url), out)
    return out.read_bytes()


async def _in_thread(fn, *args, **kw):
    import asyncio

    return await asyncio.to_thread(fn, *args, **kw)


async def test_plain_http_and_loopback_need_the_opt_in(tmp_path):
    async with Site("127.0.0.1") as site:
        with pytest.raises(Refused, match="not an https:// URL.*allowInsecureHttp"):
            await _in_thread(fetch, f"{site.base}/a", tmp_path, FetchPolicy())
        assert site.seen == []   # nothing was sent
        assert await _in_thread(fetch, f"{site.base}/a", tmp_path) == b"data"
        # https to a loopback address is refused without the opt-in, checked before connecting
        with pytest.raises(Refused, match="loopback"):
            await _in_thread(fetch, f"https://127.0.0.1:{site.server.port}/a", tmp_path, FetchPolicy())


async def test_names_are_checked_after_resolution(tmp_path):
    # "localhost" is a name: only the resolved address shows it is loopback.
    async with Site("127.0.0.1") as site:
        with pytest.raises(Refused, match="localhost resolves to a refused address.*loopback"):
            await _in_thread(fetch, f"https://localhost:{site.server.port}/a", tmp_path, FetchPolicy())
        assert site.seen == []


def test_link_local_and_metadata_addresses_are_always_refused(tmp_path):
    for url in ("http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/x", "http://[::ffff:169.254.169.254]/x",
                "http://100.100.100.200/x", "http://0.0.0.0/x"):
        with pytest.raises(Refused):
            fetch(url, tmp_path)   # even with the opt-in
    assert refused_address("169.254.1.1") and refused_address("fd00:ec2::254") and refused_address("::1")
    assert refused_address("::1", allow_loopback=True) is None
    assert refused_address("10.0.0.5") is None and refused_address("93.184.216.34") is None


def test_resolver_refuses_names_resolving_to_link_local(tmp_path, monkeypatch):
    real = socket.getaddrinfo

    def fake(host, *a, **kw):   # a public-looking name that resolves to the metadata service (DNS rebinding)
        if host == "metadata.example.com":
            return real("169.254.169.254", *a, **kw)
        return real(host, *a, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    with pytest.raises(Refused, match="metadata.example.com resolves to a refused address.*metadata"):
        fetch("https://metadata.example.com/latest/meta-data/", tmp_path)


async def test_redirects_are_limited_and_never_carry_credentials_to_another_host(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    async with Site("127.0.0.1") as origin, Site("localhost") as other:
        # Same origin: the URL's credentials go along; another host (localhost, another port) gets none.
        origin.redirects["/a"] = "/b"
        origin.redirects["/b"] = f"{other.base}/c"
        url = origin.base.replace("http://", "http://user:s3cr3t@") + "/a"
        assert await _in_thread(fetch, url, tmp_path) == b"data"
        assert [p for p, _ in origin.seen] == ["/a", "/b"]
        assert origin.seen[0][1].startswith("Basic ") and origin.seen[1][1].startswith("Basic ")
        assert other.seen == [("/c", None)]
        # A loop is cut after MAX_REDIRECTS.
        origin.redirects["/loop"] = "/loop"
        with pytest.raises(Refused, match="more than 5 redirects"):
            await _in_thread(fetch, f"{origin.base}/loop", tmp_path)
        # A redirect to a refused address is refused (the opt-in covers loopback, never link-local).
        origin.redirects["/meta"] = "http://169.254.169.254/latest/meta-data/"
        with pytest.raises(Refused, match="metadata address"):
            await _in_thread(fetch, f"{origin.base}/meta", tmp_path)
        # Without the opt-in an https URL cannot be redirected to plain http.
        with pytest.raises(Refused):
            await _in_thread(fetch, "https://127.0.0.1:1/x", tmp_path, FetchPolicy())


async def test_download_size_is_bounded(tmp_path):
    async with Site("127.0.0.1") as site:
        with pytest.raises(TooLarge, match="artifact limit"):
            await _in_thread(fetch, f"{site.base}/forever", tmp_path, FetchPolicy(True, max_bytes=1 << 20))
        assert not list(tmp_path.glob("out*"))


async def test_cache_reports_refusals_as_insecure_source_not_retried(tmp_path):
    cache = ArtifactCache(tmp_path / "cache", 10**9)
    with pytest.raises(FetchError) as info:
        await cache.fetch("http://127.0.0.1:9/adapter.tar.gz")
    assert info.value.reason == Reason.InsecureSource and not info.value.retryable
    # The archive check reads the URL's path: a fragment or query naming ".tar.gz" does not make it an archive.
    for uri in ("https://example.com/x#.tar.gz", "https://example.com/x?a=.tar.gz"):
        assert not parse_uri(uri).is_archive
        with pytest.raises(FetchError, match="must be a .tar.gz"):
            await cache.fetch(uri)


async def test_hub_token_goes_to_the_hub_origin_only_never_along_a_redirect(tmp_path, monkeypatch):
    from loraplane.storage.fetchers import http as http_fetcher

    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    async with Site("127.0.0.1") as hub, Site("localhost") as cdn:
        # Pretend the loopback origin is huggingface.co (is_hub_url is an exact host match, tested elsewhere).
        monkeypatch.setattr(http_fetcher, "is_hub_url", lambda url: url.startswith(hub.base))
        hub.redirects["/resolve"] = f"{cdn.base}/blob"
        assert await _in_thread(fetch, f"{hub.base}/resolve", tmp_path, send_hub_token=True) == b"data"
        assert hub.seen == [("/resolve", "Bearer hf_secret")]
        assert cdn.seen == [("/blob", None)]


@pytest.mark.parametrize("address", [
    "::ffff:169.254.169.254",        # IPv4-mapped
    "::a9fe:a9fe",                   # IPv4-compatible
    "64:ff9b::a9fe:a9fe",            # NAT64 well-known prefix (RFC 6052)
    "64:ff9b:1::a9fe:a9fe",          # NAT64 local-use prefix (RFC 8215), /96
    "64:ff9b:1:a9fe:a9:fe00::",      # the same, /48 layout
    "2002:a9fe:a9fe::1",             # 6to4
    "2001:0:4136:e378:8000:63bf:5601:5601",   # Teredo, client 169.254.169.254 (obfuscated)
    "64:ff9b::7f00:1", "::ffff:0.0.0.0",
])
def test_ipv6_forms_of_refused_ipv4_addresses_are_refused(address):
    """Review p16: every IPv6 form that reaches 169.254.169.254 (or loopback) through a translator is refused."""
    assert refused_address(address)


def test_ipv6_forms_of_public_ipv4_addresses_are_allowed():
    for address in ("64:ff9b::808:808", "64:ff9b:1::808:808", "2002:808:808::1", "2606:4700::1111"):
        assert refused_address(address) is None, address


def _s3_endpoint_hits(endpoint_env: dict[str, str], policy: FetchPolicy, tmp_path, monkeypatch) -> tuple[list, str]:
    """Fetch s3://latest/meta-data with an Adapter's credentials Secret carrying `endpoint_env`; a plain-http
    loopback server stands in for the metadata service. Returns (requests it got, the error's text or "")."""
    import http.server
    import threading

    from loraplane.storage.credentials import Credentials
    from loraplane.storage.errors import StorageError
    from loraplane.storage.fetchers import fetcher_for

    hits: list = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):   # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    values = {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b",
              **{k: v.format(port=port) for k, v in endpoint_env.items()}}
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    uri = parse_uri("s3://latest/meta-data/iam/security-credentials/role")
    try:
        fetcher_for(uri, policy=policy, credentials=Credentials("Secret evil", values)).fetch_file(uri, tmp_path / "f")
        return hits, ""
    except StorageError as exc:
        return hits, str(exc) if isinstance(exc, Refused) else f"not refused: {exc!r}"
    finally:
        server.shutdown()


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:{port}", "https://127.0.0.1:{port}",
                                      "http://[::ffff:127.0.0.1]:{port}", "ftp://127.0.0.1:{port}"])
def test_s3_endpoint_from_a_secret_obeys_the_fetch_policy(endpoint, tmp_path, monkeypatch):
    """Review p3: AWS_ENDPOINT_URL from an Adapter's credentials Secret went straight to boto3 (plain http, loopback,
    the metadata service). Under the default policy it is refused before any request, naming the Secret."""
    hits, error = _s3_endpoint_hits({"AWS_ENDPOINT_URL": endpoint}, FetchPolicy(), tmp_path, monkeypatch)
    assert hits == [] and "Secret evil" in error and "AWS_ENDPOINT_URL" in error


def test_s3_endpoint_link_local_is_refused_even_with_the_opt_in(tmp_path, monkeypatch):
    from loraplane.storage.fetchers.s3 import check_endpoint

    for endpoint in ("http://169.254.169.254", "https://169.254.169.254:443", "http://[fd00:ec2::254]",
                     "http://[64:ff9b::a9fe:a9fe]"):
        with pytest.raises(Refused, match="refused address"):
            check_endpoint(endpoint, LOCAL, "s3://b/k", "Secret evil")
    # the environment's endpoint (the trainer's dataset Secret is mapped onto it) is checked the same way
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://169.254.169.254")
    from loraplane.storage.fetchers.s3 import S3Fetcher
    with pytest.raises(Refused):
        S3Fetcher(policy=LOCAL).client   # noqa: B018
    # with the opt-in a loopback stand-in (MinIO, moto) is reached
    hits, error = _s3_endpoint_hits({"AWS_ENDPOINT_URL": "http://127.0.0.1:{port}"}, LOCAL, tmp_path, monkeypatch)
    assert hits, error
