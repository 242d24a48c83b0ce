"""Local adapter sources in a cluster (review p14): `/PATH` and `file://` are for local runs.

Before the fix any Adapter could set `source.uri: file:///var/cache/loraplane/adapters/<cache_key of A>` (the key
is public: storage.uri.cache_key of A's spec) and the loader served tenant A's credential-gated weights under B's
name. Now the loader refuses local paths unless it runs with a local table (--table, `loraplane run`), never reads
its own cache or credentials folders, and the operator marks such an Adapter incompatible, naming the field.
"""

from __future__ import annotations

import argparse

import pytest

from loraplane.api import parse
from loraplane.api.reasons import Reason
from loraplane.builders.resolution import check_compatibility, resolve
from loraplane.loader.cli import add_loader_arguments, loader_fetch_policy
from loraplane.storage.cache import ArtifactCache, FetchError
from loraplane.storage.fetchers import Credentials, FetchPolicy
from loraplane.storage.uri import cache_key
from support.adapters import write_adapter


def _loader_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_loader_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_loader_reads_local_paths_only_with_a_local_table(tmp_path):
    cluster = loader_fetch_policy(_loader_args("--configmap", "t"))
    local = loader_fetch_policy(_loader_args("--table", str(tmp_path / "t.json"), "--credentials-root", "none"))
    assert not cluster.allow_local_paths and local.allow_local_paths
    assert cluster.private_roots   # the mounted credentials are never a source


async def test_a_tenant_cannot_serve_another_tenants_cached_adapter(tmp_path):
    cluster = FetchPolicy(allow_local_paths=False, private_roots=(str(tmp_path / "creds"),))
    owner = ArtifactCache(tmp_path / "adapters", 10**9, pvc_root=str(tmp_path / "pvc"))   # A fetched it
    private = write_adapter(tmp_path / "pvc" / "claim" / "private-a")
    await owner.fetch("pvc://claim/private-a", version="v1", credentials=Credentials("Secret a", {}))
    cache = ArtifactCache(tmp_path / "adapters", 10**9, pvc_root=str(tmp_path / "pvc"), policy=cluster)
    entry = cache.root / cache_key("pvc://claim/private-a", "v1", None)
    assert entry.is_dir() and private.is_dir()
    for uri in (f"file://{entry}", str(entry), str(private), f"file://{tmp_path / 'creds'}"):
        with pytest.raises(FetchError) as info:
            await cache.fetch(uri, version="v1")
        assert info.value.reason == Reason.LocalSourceRefused and not info.value.retryable
        assert "spec.source.uri" in str(info.value)
    # Even where local paths are allowed (a local run), the cache's own folders are not a source, and an entry
    # cached from such a URI before is not served.
    local = ArtifactCache(tmp_path / "adapters", 10**9, pvc_root=str(tmp_path / "pvc"))
    for uri in (f"file://{entry}", str(local.root), str(tmp_path)):
        with pytest.raises(FetchError) as info:
            await local.fetch(uri, version="v1")
        assert info.value.reason == Reason.LocalSourceRefused
    assert (await local.fetch(str(private))).path.is_dir()   # a local run still reads local paths


def _objects(uri: str):
    route = parse({"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute", "metadata": {"name": "r",
                   "namespace": "ns"}, "spec": {"baseModel": {"name": "org/base"},
                                                "routes": [{"name": "b", "backends": [{"adapter": "b"}]}]}})
    adapter = parse({"apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter", "metadata": {"name": "b",
                     "namespace": "ns"}, "spec": {"baseModel": {"name": "org/base"}, "version": "v1",
                                                  "source": {"uri": uri}}})
    return route, adapter


@pytest.mark.parametrize("uri", ["file:///var/cache/loraplane/adapters/k", "/var/run/secrets/x"])
def test_the_operator_marks_a_local_source_incompatible_in_a_cluster(uri):
    route, adapter = _objects(uri)
    verdict = check_compatibility(adapter, route)
    assert not verdict.compatible and verdict.reason == Reason.LocalSourceRefused
    assert "spec.source.uri" in verdict.message
    assert not resolve(route, [adapter]).table.adapters
    assert check_compatibility(adapter, route, local_paths=True).compatible   # loraplane run
    assert resolve(route, [adapter], local_paths=True).table.adapters
    assert check_compatibility(_objects("s3://b/a")[1], route).compatible
