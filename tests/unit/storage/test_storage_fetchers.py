"""One fetcher per scheme (loraplane.storage.fetchers), each against a real server where one can run here:
local paths and PVC mounts, HTTP on a loopback http.server, S3 on moto's server (MOCK S3: none can exist
here). Errors come out as loraplane.storage.errors types whatever the store said."""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from loraplane.storage.errors import (
    AccessDenied, InvalidContent, NoCredentials, NotFound, StorageError, Unavailable, http_error,
    s3_error,
)
from loraplane.storage.fetchers import REGISTRY, FetchPolicy, fetcher_class, fetcher_for
from loraplane.storage.fetchers.http import HttpFetcher, is_hub_url
from loraplane.storage.fetchers.local import LocalFetcher
from loraplane.storage.fetchers.s3 import S3Fetcher
from loraplane.storage.uri import Scheme, parse_uri

# The test servers are plain http on loopback: allowed only with the explicit opt-in (allowInsecureHttp).
LOCAL = FetchPolicy(allow_insecure_http=True)


def test_fetcher_for_each_scheme():
    kinds = {uri: type(fetcher_for(parse_uri(uri))).__name__ for uri in
             ("/x", "pvc://c/x", "https://h/x", "http://h/x", "s3://b/k", "hf://o/r")}
    assert kinds == {"/x": "LocalFetcher", "pvc://c/x": "LocalFetcher", "https://h/x": "HttpFetcher",
                     "http://h/x": "HttpFetcher", "s3://b/k": "S3Fetcher", "hf://o/r": "HfFetcher"}


def test_every_scheme_has_a_fetcher_that_declares_it():
    assert set(REGISTRY) == set(Scheme)
    for scheme in Scheme:
        assert scheme in fetcher_class(scheme).schemes


def test_an_unregistered_scheme_is_refused(monkeypatch):
    monkeypatch.delitem(REGISTRY, Scheme.HF)
    with pytest.raises(ValueError, match="no fetcher serves hf URIs"):
        fetcher_for(parse_uri("hf://o/r"))


def test_local_and_pvc(tmp_path):
    (tmp_path / "pvc" / "claim" / "dir" / "sub").mkdir(parents=True)
    (tmp_path / "pvc" / "claim" / "dir" / "sub" / "f.txt").write_text("hi")
    fetcher = LocalFetcher(tmp_path / "pvc")
    out = fetcher.fetch_tree(parse_uri("pvc://claim/dir"), tmp_path / "copy")
    assert (out / "sub" / "f.txt").read_text() == "hi"
    one = fetcher.fetch_file(parse_uri(str(tmp_path / "pvc/claim/dir/sub/f.txt")), tmp_path / "one.txt")
    assert one.read_text() == "hi"
    with pytest.raises(NotFound, match="is the PVC mounted"):
        fetcher.fetch_tree(parse_uri("pvc://other/x"), tmp_path / "x")
    with pytest.raises(NotFound, match="not a file"):
        fetcher.fetch_file(parse_uri(str(tmp_path / "missing")), tmp_path / "y")


class _Handler(http.server.SimpleHTTPRequestHandler):
    seen_auth: list = []   # the Authorization header of every request, in order

    def log_message(self, *args):
        pass

    def do_GET(self):
        _Handler.seen_auth.append(self.headers.get("Authorization"))
        if self.path == "/denied":
            self.send_error(403)
        elif self.path == "/broken":
            self.send_error(503)
        elif self.path == "/drip":       # a server that never stops sending, one byte at a time
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                for _ in range(100000):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass
        elif self.path.startswith("/away"):  # a redirect to another origin (the other loopback address)
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.server.server_address[1]}/a.bin")
            self.end_headers()
        else:
            super().do_GET()


@pytest.fixture
def site(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _Handler(*a, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_file_and_status_mapping(site, tmp_path):
    root, base = site
    (root / "a.bin").write_bytes(b"x" * 3_000_000)  # several chunks
    fetcher = HttpFetcher(timeout_s=30, policy=LOCAL)
    assert fetcher.fetch_file(parse_uri(f"{base}/a.bin"), tmp_path / "a.bin").read_bytes() == b"x" * 3_000_000
    for path, cls, needle in (("/nope", NotFound, "HTTP 404"), ("/denied", AccessDenied, "HTTP 403"),
                              ("/broken", Unavailable, "HTTP 503")):
        with pytest.raises(cls, match=needle) as info:
            fetcher.fetch_file(parse_uri(base + path), tmp_path / "out")
        assert info.value.code == needle.split()[-1]
    assert not list(tmp_path.glob("out*"))  # nothing half-written left behind
    with pytest.raises(Unavailable, match="GET http://127.0.0.1:9/x"):  # nothing listens on the discard port
        fetcher.fetch_file(parse_uri("http://127.0.0.1:9/x"), tmp_path / "out")
    with pytest.raises(StorageError, match="does not name a directory"):
        fetcher.fetch_tree(parse_uri(f"{base}/"), tmp_path / "tree")


def test_http_budget_covers_the_whole_download(site, tmp_path):
    # A server that sends a byte every 50 ms never trips a per-read timeout; the whole-download budget ends it.
    _, base = site
    started = time.monotonic()
    with pytest.raises(Unavailable, match="not complete after 1 s"):
        HttpFetcher(timeout_s=1, policy=LOCAL).fetch_file(parse_uri(f"{base}/drip"), tmp_path / "out")
    assert time.monotonic() - started < 4
    assert not list(tmp_path.glob("out*"))


def test_http_credentials_are_never_shown(site, tmp_path):
    _, base = site
    url = base.replace("http://", "http://user:s3cr3t@") + "/nope"
    with pytest.raises(NotFound) as info:
        HttpFetcher(timeout_s=10, policy=LOCAL).fetch_file(parse_uri(url), tmp_path / "out")
    assert "s3cr3t" not in str(info.value) and "***@" in str(info.value)
    assert _Handler.seen_auth[-1].startswith("Basic ")   # userinfo becomes Basic auth, as aiohttp does


def test_hub_token_goes_only_where_it_was_asked_for(site, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert is_hub_url("https://huggingface.co/org/repo/resolve/main/x.tar.gz")
    assert is_hub_url("https://cdn-lfs.huggingface.co/x")
    for url in ("http://huggingface.co/x", "https://evilhuggingface.co/x", "https://huggingface.co.evil.com/x",
                "https://evil.com/huggingface.co/x", "https://huggingface.co@evil.com/x"):
        assert not is_hub_url(url), url
    root, base = site
    (root / "a.bin").write_bytes(b"a")
    HttpFetcher(timeout_s=10, send_hub_token=True, policy=LOCAL).fetch_file(parse_uri(f"{base}/a.bin"),
                                                                            tmp_path / "a")
    assert _Handler.seen_auth[-1] is None    # loopback is not the Hub
    HttpFetcher(timeout_s=10, policy=LOCAL).fetch_file(parse_uri(f"{base}/away"), tmp_path / "b")
    assert _Handler.seen_auth[-2:] == [None, None]


def test_one_table_maps_store_answers():
    assert isinstance(http_error("u", 410, "Gone"), NotFound)
    assert isinstance(http_error("u", 401, "Unauthorized"), AccessDenied)
    assert isinstance(http_error("u", 429, "Too Many Requests"), Unavailable)


def test_s3_tree_file_upload_and_errors(s3_env, tmp_path):
    """MOCK S3 (moto server, real boto3 client through AWS_ENDPOINT_URL)."""
    client = s3_env.client()
    client.create_bucket(Bucket="store")
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    (src / "a.json").write_text("{}")
    (src / "nested" / "b.bin").write_bytes(b"b")
    fetcher = S3Fetcher()
    fetcher.upload_tree(src, parse_uri("s3://store/art/v1/"))
    assert s3_env.keys("store") == ["art/v1/a.json", "art/v1/nested/b.bin"]
    out = fetcher.fetch_tree(parse_uri("s3://store/art/v1"), tmp_path / "tree")
    assert (out / "nested" / "b.bin").read_bytes() == b"b" and (out / "a.json").read_text() == "{}"
    assert fetcher.fetch_file(parse_uri("s3://store/art/v1/a.json"), tmp_path / "a.json").read_text() == "{}"
    assert fetcher.list_objects("store", "art/") == {"art/v1/a.json": 2, "art/v1/nested/b.bin": 1}
    fetcher.delete_keys("store", ["art/v1/a.json"])
    assert s3_env.keys("store") == ["art/v1/nested/b.bin"]
    with pytest.raises(NotFound, match="no objects under that prefix"):
        fetcher.fetch_tree(parse_uri("s3://store/none/"), tmp_path / "empty")
    with pytest.raises(NotFound) as info:
        fetcher.fetch_file(parse_uri("s3://store/none.json"), tmp_path / "none.json")
    assert info.value.code == "404"
    with pytest.raises(NotFound) as info:
        fetcher.list_objects("no-such-bucket", "")
    assert info.value.code == "NoSuchBucket"
    with pytest.raises(NotFound, match="NoSuchBucket"):  # boto3 wraps upload errors; the code still counts
        fetcher.upload_tree(src, parse_uri("s3://gone/x"))


def test_s3_key_escaping_the_artifact_is_refused(s3_env, tmp_path):
    client = s3_env.client()
    client.create_bucket(Bucket="evil")
    client.put_object(Bucket="evil", Key="a/../../escape.txt", Body=b"x")
    with pytest.raises(InvalidContent, match="escapes the artifact directory"):
        S3Fetcher().fetch_tree(parse_uri("s3://evil/a"), tmp_path / "dest")


def test_s3_error_mapping():
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    def client_error(code):
        return ClientError({"Error": {"Code": code, "Message": "m"}}, "GetObject")

    assert isinstance(s3_error("u", NoCredentialsError()), NoCredentials)
    assert isinstance(s3_error("u", client_error("NoSuchKey")), NotFound)
    assert isinstance(s3_error("u", client_error("ExpiredToken")), AccessDenied)
    assert isinstance(s3_error("u", client_error("SlowDown")), Unavailable)
    assert isinstance(s3_error("u", EndpointConnectionError(endpoint_url="http://x")), Unavailable)
    wrapped = S3UploadFailedError("Failed to upload a to b/c: An error occurred (AccessDenied) when calling the "
                                  "PutObject operation: Access Denied")
    assert s3_error("u", wrapped).code == "AccessDenied" and isinstance(s3_error("u", wrapped), AccessDenied)
