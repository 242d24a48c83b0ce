"""Pure parts of the e2e node stand-in (tests/harness/node.py): the kubelet's $(VAR) expansion, the image
table's reference matching, and the volume file writer. The stand-in itself is tested in tests/e2e."""

from __future__ import annotations

from harness.node import expand, image_repository, image_table, write_tree


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
