"""Issue 13 items 4a and 5 in the loader: each adapter version has its own cache entry (a version published at the
same URI never swaps the files another is loaded from), each adapter is fetched with its own credentials Secret,
and a refusal of those credentials is AccessDenied on the first attempt (not five FetchFailed retries)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestServer

from support.adapters import write_adapter
from test_loader_states import BASE, FakeEngine, _state, _table
from loraplane.api.reasons import Reason
from loraplane.api.wire.serving import AdapterState, DesiredAdapter
from loraplane.loader.reconciler import Loader
from loraplane.storage.cache import ArtifactCache
from loraplane.storage.fetchers import FetchPolicy
from loraplane.storage.digest import sha256_dir


def _loader(tmp_path: Path, engine: FakeEngine, **kw) -> Loader:
    # The stores stand in on loopback over plain http: the explicit opt-in the tests (and only they) take.
    cache = ArtifactCache(tmp_path / "cache", 1 << 30, policy=FetchPolicy(allow_insecure_http=True))
    return Loader(engine, cache, "replica-0", max_attempts=5,
                  backoff_base=0.0, **kw)


def _tarball(src: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src, arcname="adapter")
    return buf.getvalue()


async def test_two_adapters_on_one_route_each_fetched_with_its_own_secret(tmp_path):
    """Two stores (paths standing in for two buckets), each accepting only its own token; two Secrets mounted
    as the engine pod mounts them. The environment's token is neither."""
    tokens = {"/team-a/lora.tar.gz": "tok-a", "/team-b/lora.tar.gz": "tok-b", "/team-c/lora.tar.gz": "tok-c",
              "/exfil/lora.tar.gz": "never"}
    blobs = {p: _tarball(write_adapter(tmp_path / p.split("/")[1], seed=i)) for i, p in enumerate(tokens)}
    seen: dict[str, list] = {p: [] for p in tokens}

    async def serve(request):
        seen[request.path].append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != f"Bearer {tokens[request.path]}":
            return web.Response(status=403)
        return web.Response(body=blobs[request.path])

    app = web.Application()
    for p in tokens:
        app.router.add_get(p, serve)
    server = TestServer(app)
    await server.start_server()
    root = tmp_path / "secrets"
    origin = str(server.make_url("/")).rstrip("/")
    for secret, token in (("secret-a", "tok-a"), ("secret-b", "tok-b"), ("secret-c", "wrong"), ("other", "tok-o")):
        (root / secret).mkdir(parents=True)
        (root / secret / "HF_TOKEN").write_text(token)
        if secret != "other":   # the store's owner bound these tokens to the store (storage.credentials)
            (root / secret / "ALLOWED_ORIGINS").write_text(f"https://elsewhere.example, {origin}\n")
    try:
        def want(name, path, secret):
            return DesiredAdapter(served_name=name, adapter=name, uri=str(server.make_url(path)), base_model=BASE,
                                  credentials_secret=secret)

        loader = _loader(tmp_path, FakeEngine(), credentials_root=root)
        loader.set_table(_table(want("a", "/team-a/lora.tar.gz", "secret-a"),
                                want("b", "/team-b/lora.tar.gz", "secret-b"),
                                want("c", "/team-c/lora.tar.gz", "secret-c"),
                                # another team's Secret, named by an Adapter author who cannot read it
                                want("d", "/exfil/lora.tar.gz", "other")))
        await loader.reconcile_once()
        assert _state(loader, "a") == (AdapterState.Ready, Reason.Loaded)
        assert _state(loader, "b") == (AdapterState.Ready, Reason.Loaded)
        assert seen["/team-a/lora.tar.gz"] == ["Bearer tok-a"] and seen["/team-b/lora.tar.gz"] == ["Bearer tok-b"]
        # refused credentials: terminal on the first attempt, the Secret named, no retry scheduled
        report = loader.report().adapters["c"]
        assert (report.state, report.reason, report.attempts) == (AdapterState.Failed, Reason.AccessDenied, 1)
        assert "Secret secret-c" in report.message and "HTTP 403" in report.message
        await loader.reconcile_once()
        assert len(seen["/team-c/lora.tar.gz"]) == 1
        # a Secret that does not list the host: its token is never sent there (no request at all), and says why
        report = loader.report().adapters["d"]
        assert report.state == AdapterState.Failed and seen["/exfil/lora.tar.gz"] == []
        assert "Secret other" in report.message and "ALLOWED_ORIGINS" in report.message
    finally:
        await server.close()


async def test_a_secret_not_mounted_yet_is_retried_and_says_so(tmp_path):
    src = write_adapter(tmp_path / "src")
    loader = _loader(tmp_path, FakeEngine(), credentials_root=tmp_path / "secrets")
    loader.set_table(_table(DesiredAdapter(served_name="a", adapter="a", uri=str(src), base_model=BASE,
                                           credentials_secret="later")))
    await loader.reconcile_once()
    report = loader.report().adapters["a"]
    assert (report.state, report.reason) == (AdapterState.Pending, Reason.FetchFailed)
    assert "Secret later" in report.message and "not mounted" in report.message


async def test_a_new_version_at_the_same_uri_never_changes_the_loaded_files_of_the_old(tmp_path):
    """v1 is loaded; the store is overwritten in place with v2's weights and v2 joins the table. v1 keeps its
    verified files (before: one cache entry per URI, so fetching v2 replaced the directory v1 is loaded from)."""
    src = write_adapter(tmp_path / "src", seed=1)
    engine = FakeEngine()
    loader = _loader(tmp_path, engine)

    def want(version):
        return DesiredAdapter(served_name=f"x--{version}", adapter="x", version=version, uri=str(src),
                              base_model=BASE)

    loader.set_table(_table(want("1")))
    await loader.reconcile_once()
    v1_path, v1_digest = engine.loaded["x--1"], sha256_dir(src)
    write_adapter(src, seed=2)
    loader.set_table(_table(want("1"), want("2")))
    await loader.reconcile_once()
    assert _state(loader, "x--2") == (AdapterState.Ready, Reason.Loaded)
    assert engine.loaded["x--2"] != v1_path
    assert sha256_dir(Path(v1_path)) == v1_digest      # v1 is still served from v1's weights
    assert loader.report().adapters["x--1"].sha256 == v1_digest


async def test_the_recorded_digest_arriving_in_the_table_does_not_reload(tmp_path):
    """The Adapter records what the replica reported; the table then pins it: same artifact, no unload/reload."""
    src = write_adapter(tmp_path / "src")
    engine = FakeEngine()
    loader = _loader(tmp_path, engine)
    want = DesiredAdapter(served_name="x--1", adapter="x", version="1", uri=str(src), base_model=BASE)
    loader.set_table(_table(want))
    await loader.reconcile_once()
    digest = loader.report().adapters["x--1"].sha256
    assert digest == sha256_dir(src)
    engine.unload = None   # any unload now fails the test
    loader.set_table(_table(want.model_copy(update={"sha256": digest})))
    await loader.reconcile_once()
    assert _state(loader, "x--1") == (AdapterState.Ready, Reason.Loaded)
    # a different pinned digest is another artifact: it is fetched and verified again (and refused here)
    engine.unload = FakeEngine.unload.__get__(engine)
    loader.set_table(_table(want.model_copy(update={"sha256": "0" * 64})))
    await loader.reconcile_once()
    assert _state(loader, "x--1") == (AdapterState.Pending, Reason.ChecksumMismatch)
