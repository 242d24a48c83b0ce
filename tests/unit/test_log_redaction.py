"""Every loraplane program's log is scrubbed of credentials (issue 12: "redacted in logs"): the trainer, the
loader and fetch-model installed api.redaction's formatter; the operator (kopf's handlers) and the router did
not, so a presigned URI or an Authorization header quoted in a message or a traceback reached their logs."""

from __future__ import annotations

import io
import logging

import pytest

SECRET_URI = "https://b.s3.amazonaws.com/a.tar.gz?X-Amz-Signature=deadbeefcafe"


@pytest.fixture
def root_stream():
    """A handler on the root logger, as kopf's and basicConfig's are; removed afterwards."""
    root = logging.getLogger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root.addHandler(handler)
    yield stream
    root.removeHandler(handler)


def _logged(stream: io.StringIO) -> str:
    logging.getLogger("loraplane.test").warning("fetch of %s failed; Authorization: Bearer tok-123456", SECRET_URI)
    return stream.getvalue()


@pytest.mark.parametrize("program", ["operator", "router"])
def test_the_programs_logging_setup_scrubs_credentials(root_stream, program):
    assert "deadbeefcafe" in _logged(root_stream)   # the handler as installed: unscrubbed
    root_stream.truncate(0)
    if program == "operator":
        from loraplane.controllers.handlers import configure_logging

        configure_logging()
    else:
        from loraplane.router.cli import configure_logging

        configure_logging("info")
    text = _logged(root_stream)
    assert "b.s3.amazonaws.com/a.tar.gz" in text
    assert "deadbeefcafe" not in text and "tok-123456" not in text
