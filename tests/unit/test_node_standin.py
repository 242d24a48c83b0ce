"""Pure parts of the e2e node stand-in (tests/harness/node.py): the kubelet's $(VAR) expansion, the image
table's reference matching, the volume file writer and the in-place hosts file rewrite. The stand-in itself is
tested in tests/e2e."""

from __future__ import annotations

from harness.node import expand, image_repository, image_table, rewrite_in_place, write_tree


def test_expand_follows_the_kubelet_rules():
    env = {"A": "1", "B.C": "2"}
    assert expand("x-$(A)-$(B.C)-$(MISSING)-$$(A)-$$$(A)-$", env) == "x-1-2-$(MISSING)-$(A)-$1-$"


def test_image_references_map_to_the_table_or_to_nothing():
    table = image_table()
    for ref, repo in [("ghcr.io/loraplane/loraplane:0.1.0", "ghcr.io/loraplane/loraplane"),
                      ("ghcr.io/loraplane/loraplane-trainer@sha256:" + "a" * 64, "ghcr.io/loraplane/loraplane-trainer"),
                      ("docker.io/vllm/vllm-openai:v0.11.0", "vllm/vllm-openai"),
                      ("docker.io/library/busybox:1.36", "busybox"), ("python:3.11-slim", "python"),
                      ("localhost:5000/x/y:1", "localhost:5000/x/y")]:
        assert image_repository(ref) == repo
    assert {"ghcr.io/loraplane/loraplane", "ghcr.io/loraplane/loraplane-trainer", "vllm/vllm-openai"} <= set(table)
    assert "localhost:5000/x/y" not in table
    vllm = table["vllm/vllm-openai"]
    assert "--host" not in vllm.extra_args and "--kv-cache-memory-bytes" in vllm.extra_args
    assert dict(vllm.env)["VLLM_TARGET_DEVICE"] == "cpu"


def test_write_tree_replaces_changed_files_and_drops_removed_keys(tmp_path):
    write_tree(tmp_path, {"a": (b"1", 0o644), "d/b": (b"2", 0o600)})
    assert (tmp_path / "a").read_bytes() == b"1" and (tmp_path / "d" / "b").stat().st_mode & 0o777 == 0o600
    write_tree(tmp_path, {"a": (b"changed", 0o644)})
    assert (tmp_path / "a").read_bytes() == b"changed" and not (tmp_path / "d" / "b").exists()


def test_hosts_rewrite_keeps_the_inode_and_never_shows_a_reader_a_file_without_the_names_it_keeps(tmp_path):
    """A pod's /etc/hosts is a bind mount of this very file: the rewrite keeps its inode, ends with exactly the
    new content (longer or shorter), and a reader reading all along never sees the names both versions hold go
    missing (truncating first, then writing, showed readers an empty file: lookups failed during rewrites)."""
    import os
    import threading

    hosts = tmp_path / "hosts"
    kept = "127.0.0.1\tlocalhost\n10.1.0.7\tfront-router.quickstart.svc front-router.quickstart\n"
    texts = [kept + "10.1.0.9\tgateway.quickstart.svc\n" * 40, kept]
    hosts.write_text(texts[0])
    inode = hosts.stat().st_ino
    stop, bad = threading.Event(), []

    def read() -> None:
        while not stop.is_set():
            with open(hosts, "rb") as f:
                data = f.read()
            if not data.startswith(kept.encode()):
                bad.append(data)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(3000):
            rewrite_in_place(hosts, texts[(i + 1) % 2].encode())
    finally:
        stop.set()
        reader.join()
    assert bad == []
    assert hosts.read_text() == texts[0] and hosts.stat().st_ino == inode
    rewrite_in_place(hosts, texts[1].encode())
    assert hosts.read_text() == texts[1] and os.stat(hosts).st_ino == inode
