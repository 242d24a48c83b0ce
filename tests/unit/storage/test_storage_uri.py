"""The one artifact-URI parser (loraplane.storage.uri): every scheme, and malformed input named clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplane.api.redaction import redacted

from loraplane.api.paths import PVC_ROOT
from loraplane.storage.uri import (
    ArtifactUri,
    Scheme,
    cache_key,
    fetched_model_path,
    parse_uri,
    recorded_path,
    try_parse_uri,
)


@pytest.mark.parametrize("text, expected", [
    ("/data/train.jsonl", ArtifactUri("/data/train.jsonl", Scheme.LOCAL, path="/data/train.jsonl")),
    ("file:///data/x", ArtifactUri("file:///data/x", Scheme.LOCAL, path="/data/x")),
    ("pvc://adapters/run-1/final/", ArtifactUri("pvc://adapters/run-1/final/", Scheme.PVC, claim="adapters",
                                                path="run-1/final")),
    ("pvc://my.claim", ArtifactUri("pvc://my.claim", Scheme.PVC, claim="my.claim", path="")),
    ("s3://bucket/a/b/", ArtifactUri("s3://bucket/a/b/", Scheme.S3, bucket="bucket", key="a/b/")),
    ("s3://bucket", ArtifactUri("s3://bucket", Scheme.S3, bucket="bucket", key="")),
    ("https://example.com/a.tar.gz?sig=1", ArtifactUri("https://example.com/a.tar.gz?sig=1", Scheme.HTTPS)),
    ("http://127.0.0.1:8080/x", ArtifactUri("http://127.0.0.1:8080/x", Scheme.HTTP)),
    ("hf://org/repo@v1.0", ArtifactUri("hf://org/repo@v1.0", Scheme.HF, repo="org/repo", revision="v1.0")),
    ("hf://org/repo", ArtifactUri("hf://org/repo", Scheme.HF, repo="org/repo")),
])
def test_every_scheme_parses_to_its_fields(text, expected):
    assert parse_uri(text) == expected
    assert parse_uri(text).text == text
    assert str(parse_uri(text)) == redacted(text)   # what a message shows (review p6: no credentials)


@pytest.mark.parametrize("text, needle", [
    ("", "empty URI"),
    ("   ", "empty URI"),
    (" /x", "whitespace"),
    ("relative/path", "neither an absolute path nor a URI"),
    ("org/model", "neither an absolute path nor a URI"),
    ("file://relative/x", "absolute path"),
    ("pvc://", "no claim name"),
    ("pvc:///path", "no claim name"),
    ("pvc://Bad_Claim/x", "not a valid PersistentVolumeClaim name"),
    ("pvc://-claim/x", "not a valid PersistentVolumeClaim name"),
    ("pvc://" + "c" * 254 + "/x", "not a valid PersistentVolumeClaim name"),  # issue 13: longer than 253
    ("pvc://claim/../other/x", "inside the claim"),
    ("s3://", "no bucket"),
    ("s3:///key", "no bucket"),
    ("s3://bad bucket/k", "not a valid S3 bucket name"),
    ("https://", "no host"),
    ("http:///path", "no host"),
    ("hf://", "no repository"),
    ("hf://@main", "no repository"),
    ("hf://a/b/c", "not a Hugging Face repo id"),
    ("ftp://host/x", "unsupported URI scheme 'ftp://'"),
])
def test_malformed_uris_are_named(text, needle):
    with pytest.raises(ValueError, match=needle):
        parse_uri(text)
    assert try_parse_uri(text) is None


def test_local_paths_and_mount_paths(tmp_path):
    assert parse_uri("pvc://c/a/b").local_path(tmp_path) == tmp_path / "c" / "a" / "b"
    assert parse_uri("pvc://c").local_path() == Path(PVC_ROOT) / "c"
    assert parse_uri("pvc://c//a//").mount_path() == f"{PVC_ROOT}/c/a"  # what builders write into pod specs
    assert parse_uri("pvc://c").mount_path() == f"{PVC_ROOT}/c"
    assert parse_uri("file:///x/y").local_path() == Path("/x/y") == parse_uri("/x/y").local_path()
    for remote in ("s3://b/k", "https://h/x", "hf://o/r"):
        assert parse_uri(remote).local_path() is None and parse_uri(remote).mount_path() is None
        assert not parse_uri(remote).is_local
    assert parse_uri("pvc://c/x").pvc_claim == "c" and parse_uri("/c/x").pvc_claim is None


def test_archive_detection_looks_at_the_last_component():
    assert parse_uri("https://h/a/model.tar.gz?token=x").is_archive
    assert parse_uri("s3://b/models/m.tgz").is_archive and not parse_uri("s3://b/models/m/").is_archive
    assert parse_uri("/x/a.tar").is_archive and not parse_uri("https://h/a.tar.gz/dir/").is_archive
    assert parse_uri("s3://b/models/llama/").name == "llama"


def test_recorded_paths_as_peft_writes_them():
    assert recorded_path("./m") == Path("./m") and recorded_path("~/m") == Path("~/m")
    assert recorded_path("file:///m") == Path("/m") and recorded_path("/m") == Path("/m")
    assert recorded_path("pvc://c/m") == Path(PVC_ROOT) / "c" / "m"
    assert recorded_path("org/model") is None and recorded_path("s3://b/m") is None


def test_cache_key_hashes_the_text_as_written():
    assert cache_key("s3://b/m/") != cache_key("s3://b/m")  # pod specs and fetch-model agree on the text
    assert cache_key(parse_uri("s3://b/m")) == cache_key("s3://b/m")
    assert fetched_model_path("/models/fetched", "s3://b/m") == Path("/models/fetched") / cache_key("s3://b/m")
    assert len(cache_key("x")) == 32


def test_hf_revision_may_be_empty():
    # `hf://org/repo@` means the default branch, as the loader always read it.
    assert parse_uri("hf://org/repo@").revision is None


# URIs the API's patterns admit, or nearly: admission (pattern + CEL rules) and the parser must agree on each, so
# every accepted spec renders and fetches (the builders never meet a URI they cannot parse).
AGREEMENT = [
    "/models/x", "file:///models/x", "pvc://models", "pvc://models/a/b", "pvc://m.odels/a", "pvc://models/..x/y",
    "s3://bucket", "s3://bucket/key", "s3://b/dir.tar.gz/", "https://h/x.tar.gz", "http://h:8080/x?y=1",
    "hf://org/repo", "hf://org/repo@v1", "hf://org/repo@", "hf://repo",
    "pvc://models/a/../b", "pvc://models/..", "pvc://Bad_Claim/x", "pvc://-x/y", "pvc:///x", "s3:///x", "s3://",
    "https:///x.tar.gz", "https://", "https://?x", " /models/x", "/models/x ", "hf://a/b/c", "hf://", "ftp://h/x",
    "file://relative/x", "relative/x", "pvc://" + "c" * 253 + "/x", "pvc://" + "c" * 254 + "/x",
]


@pytest.mark.parametrize("field", ["adapter.source", "dataset", "dataset.validation", "output", "baseModel"])
def test_admission_and_parser_agree(field):
    from pydantic import ValidationError

    from loraplane.api.adapter import AdapterSource
    from loraplane.api.common import ModelRef
    from loraplane.api.finetunejob import DatasetSpec, OutputSpec

    build = {
        "adapter.source": lambda u: AdapterSource.model_validate({"uri": u}),
        "dataset": lambda u: DatasetSpec.model_validate({"uri": u}),
        "dataset.validation": lambda u: DatasetSpec.model_validate({"uri": "/d", "validationUri": u}),
        "output": lambda u: OutputSpec.model_validate({"adapterName": "a", "uri": u}),
        "baseModel": lambda u: ModelRef.model_validate({"uri": u}),
    }[field]
    for uri in AGREEMENT:
        try:
            build(uri)
        except ValidationError:
            continue          # refused at admission: never reaches a builder
        parse_uri(uri)        # admitted: must parse (raises ValueError otherwise)


def test_uri_rules_in_python_and_in_cel_agree():
    # The parser path evaluates each rule's Python `check`; the API server evaluates its CEL: same verdicts.
    from loraplane.api import cel
    from loraplane.api.common import uri_rules

    for rule in uri_rules("uri", "x"):
        for value in [{}, *({"uri": u} for u in AGREEMENT)]:
            assert rule.check(value) == cel.evaluate(rule.rule, value), (rule.rule, value)
