"""MOCK: S3 cannot exist on these machines (no network, no cloud account). moto's S3 server stands in for it,
speaking S3's HTTP API on a local port, so the code under test uses its real boto3 client unchanged: only
AWS_ENDPOINT_URL and dummy credentials differ from a real deployment."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from loraplane.api.wire.trainer import INSECURE_HTTP_ENV
from loraplane.local.processes import free_port


@dataclass
class S3Server:
    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        """What a pod's environment would carry (from a Secret), pointed at the stand-in; the stand-in is plain
        http on loopback, which the fetch policy admits only with the insecure-http opt-in (allowInsecureHttp)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                INSECURE_HTTP_ENV: "true"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="session")
def s3_server():
    """MOCK S3 (moto), once per session; tests create their own buckets."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per S3 call otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield S3Server(f"http://127.0.0.1:{port}")
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> S3Server:
    """The stand-in S3 for code in this process (boto3 reads the same env a pod has)."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    return s3_server
