"""Credential-bearing and presigned URIs never reach a sink a user or another tenant reads (issue 12, "Also"):
conditions (status), Events, the loader's report (its /status and the pod annotation), termination messages,
storage error messages and the fetch-model message. Before the fix presigned query secrets went through as is,
and conditions and Events were not redacted at all."""

from __future__ import annotations

import json

import pytest

from loraplane.api.common import set_condition
from loraplane.api.conditions import ConditionState, ConditionType
from loraplane.api.reasons import Reason
from loraplane.api.redaction import redacted, scrubbed
from loraplane.api.wire.serving import DesiredAdapter
from loraplane.kube.events import Event, EventType
from loraplane.loader.reconciler import Slot
from loraplane.storage.cache import ArtifactCache, FetchError
from loraplane.storage.errors import StorageError

SECRETS = ("s3cr3t", "AKIAEXAMPLE", "deadbeefsig", "sastoken", "tok3n", "sessiontok")
URI = ("https://user:s3cr3t@bucket.s3.amazonaws.com/adapters/a.tar.gz?X-Amz-Algorithm=AWS4-HMAC-SHA256"
       "&X-Amz-Credential=AKIAEXAMPLE%2F20260101&X-Amz-Signature=deadbeefsig&X-Amz-Security-Token=sessiontok"
       "&sig=sastoken&token=tok3n")


def assert_clean(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked into {text!r}"


def test_redaction_masks_userinfo_and_presigned_parameters():
    shown = redacted(URI, limit=10_000)
    assert_clean(shown)
    assert "bucket.s3.amazonaws.com/adapters/a.tar.gz" in shown and "X-Amz-Algorithm=AWS4-HMAC-SHA256" in shown
    assert scrubbed("see https://h/x?Sig=abc&keep=1") == "see https://h/x?Sig=***&keep=1"


def test_conditions_and_events_carry_no_credentials():
    conds = set_condition([], ConditionType.Ready,
                          ConditionState(False, Reason.FetchFailed, f"fetching {URI} failed"))
    assert_clean(json.dumps([c.model_dump(mode="json") for c in conds]))
    assert_clean(Event(EventType.Warning, Reason.FetchFailed, f"could not fetch {URI}").message)


def test_loader_report_carries_no_credentials():
    slot = Slot(DesiredAdapter(served_name="a-1", adapter="a", uri=URI, base_model="org/m"))
    slot.move(slot.state, Reason.Fetching, f"fetching {URI}")
    assert_clean(slot.message)


@pytest.fixture
def store():
    """A plain-http loopback store answering /404/..., /503/..., /403/... with that status (reached with the
    insecure-http opt-in, so the NotFound / Unavailable / AccessDenied paths build their messages)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):   # noqa: N802
            self.send_response(int(self.path.split("/")[1]))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _store_uri(host: str, status: int, name: str = "a.tar.gz") -> str:
    """URI with its host replaced by the loopback store and its path by /STATUS/NAME (secrets kept)."""
    return (URI.replace("https://", "http://").replace("bucket.s3.amazonaws.com", host)
            .replace("/adapters/a.tar.gz", f"/{status}/{name}"))


async def test_storage_and_cache_errors_carry_no_credentials(tmp_path, store):
    from loraplane.storage.fetchers import FetchPolicy

    assert_clean(str(StorageError(URI, "HTTP 403")))
    cache = ArtifactCache(tmp_path / "cache", 10**9)
    with pytest.raises(FetchError) as info:   # plain http is refused; the message quotes the URI
        await cache.fetch(URI.replace("https://", "http://"))
    assert_clean(str(info.value))
    local = ArtifactCache(tmp_path / "local", 10**9, policy=FetchPolicy(allow_insecure_http=True))
    reasons = set()
    for status in (404, 503, 403):
        with pytest.raises(FetchError) as info:
            await local.fetch(_store_uri(store, status))
        assert_clean(str(info.value))
        assert str(status) in str(info.value)   # the store's answer is there, the secrets are not
        reasons.add(info.value.reason)
    assert {Reason.AccessDenied, Reason.FetchFailed} <= reasons


def test_trainer_dataset_errors_and_logs_carry_no_credentials(tmp_path, store, monkeypatch, capsys):
    """Review p1/p6: the trainer formatted the raw URI into DatasetNotFound / DatasetUnavailable /
    DatasetAccessDenied and logged it and printed as_dict() to stderr (the pod log) unredacted."""
    import logging

    from loraplane.api.redaction import install_log_redaction
    from loraplane.api.wire.trainer import INSECURE_HTTP_ENV
    from loraplane.storage.uri import parse_uri
    from loraplane.trainer.data import fetch
    from loraplane.trainer.errors import TrainerError

    monkeypatch.setenv(INSECURE_HTTP_ENV, "true")
    handler = logging.StreamHandler()
    logger = logging.getLogger("loraplane.test.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    install_log_redaction(logger)
    seen = []
    for status in (404, 503, 403):
        with pytest.raises(TrainerError) as info:
            fetch(_store_uri(store, status, "train.jsonl"), tmp_path / "data", tmp_path / "pvc")
        err = info.value
        seen.append(err.reason)
        for text in (str(err), err.message, json.dumps(err.as_dict()), repr(err)):
            assert_clean(text)
        logger.error("%s: %s", err.reason, f"raw {_store_uri(store, status)}")
    assert seen == [Reason.DatasetNotFound, Reason.DatasetUnavailable, Reason.DatasetAccessDenied]
    assert_clean(capsys.readouterr().err)
    # an ArtifactUri formats redacted wherever it lands; its text stays the real value
    parsed = parse_uri(URI)
    for text in (str(parsed), repr(parsed), f"{parsed}"):
        assert_clean(text)
    assert parsed.text == URI


def test_fetch_model_message_carries_no_credentials(tmp_path, monkeypatch, capsys):
    from loraplane.cli import main as cli_main

    log = tmp_path / "termination"
    monkeypatch.setenv("LORAPLANE_TERMINATION_LOG", str(log))
    assert cli_main(["fetch-model", URI.replace("https://", "http://"), "--cache-dir", str(tmp_path / "m")]) == 1
    assert_clean(log.read_text())
    assert_clean(capsys.readouterr().err)


@pytest.mark.parametrize("text", [
    "https://user:p@ssw0rdSECRET@host/a.tar.gz",               # '@' in the password: userinfo ends at the last '@'
    "https://user:pa/SECRET@host/a.tar.gz",                    # '/' in the password
    "https://host/a.tar.gz?X-Amz-Algorithm=AWS4&X%2DAmz%2DSignature=SECRET",   # percent-encoded name
    "https://host/a.tar.gz?X%252DAmz%252DSignature=SECRET",    # encoded twice
    "https://host/a.tar.gz?code=SECRET", "https://host/a.tar.gz?hf_token=SECRET",
    "https://host/a.tar.gz?client_secret=SECRET", "https://host/a.tar.gz?private_token=SECRET",
    "https://host/a.tar.gz?Authorization=Bearer%20SECRET", "https://host/a.tar.gz?api-key=SECRET",
    "https://host/a.tar.gz?access-token=SECRET", "https://host/a.tar.gz?api_key=SECRET",
    "https://host/a.tar.gz?password=SECRET", "https://host/a.tar.gz?secret=SECRET",
    "https://host/a.tar.gz?a=1#sig=SECRET", "https://host/a.tar.gz?token=ab#SECRET",
    "fetch failed: Authorization: Bearer SECRETSECRET", 'headers {"Authorization": "Basic U0VDUkVUU0VDUkVU"}',
    "x-api-key: SECRET",
])
def test_scrubbed_masks_every_credential_form(text):
    """Review p7: each of these leaked (a '@' or '/' in a password, encoded or unlisted parameter names, header
    values quoted in a message)."""
    shown = scrubbed(text)
    assert "SECRET" not in shown and "U0VDUkVU" not in shown, shown


def test_scrubbed_keeps_what_is_not_a_credential():
    for text in ("hf://org/repo@main", "https://host:8443/a@b", "http://[::1]:8080/x", "s3://bucket/key",
                 "exit code 1, basic check failed", "pvc://claim/a.tar.gz", "https://h/a.tar.gz?version=3"):
        assert scrubbed(text) == text


def test_scrubbing_takes_time_linear_in_the_text():
    """Every status message goes through `scrubbed`, and loader messages quote adapter_config.json values (up to
    1 MB). Its URL regex (`\\b[a-zA-Z][a-zA-Z0-9+.-]*://`) was tried at every word start of a run of scheme
    characters: `"a-" * 200_000` took about a minute (quadratic), holding the loader's event loop. Now URLs are
    found by their "://" (the regex's matches, compared on random text while writing this, and also a scheme
    glued to a word character, which the regex's \\b left unmasked)."""
    import subprocess
    import sys
    from pathlib import Path

    import loraplane

    code = ("from loraplane.api.redaction import redacted; "
            "print(len(redacted('a-' * 200_000 + ' https://u:s3cr3t@h/x ' + 'b.' * 200_000, 10**7)))")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20,
                              env={"PYTHONPATH": str(Path(loraplane.__file__).resolve().parents[1])})
    except subprocess.TimeoutExpired:
        pytest.fail("scrubbing 800 KB of text took over 20 s")
    assert done.returncode == 0, done.stderr
    # what the regex masked is still masked, and a scheme glued to a word character is masked too
    assert scrubbed("x-https://u:s3cr3t@h/") == "x-https://***@h/"
    assert scrubbed("a.b-c+d://u:s3cr3t@h") == "a.b-c+d://***@h"
    assert scrubbed("_http://u:p@h ://x 1a://u:p@h") == "_http://***@h ://x 1a://***@h"


def test_a_url_within_a_url_or_glued_to_one_has_its_userinfo_masked_too():
    """Attack round 3: a URL's body ran to the next space or quote, so a second URL inside it or glued to it (a
    comma-separated list, a redirect parameter, a Markdown link) kept its credentials in the message."""
    assert scrubbed("mirrors=http://u:p@a,https://u2:p2@b next") == "mirrors=http://***@a,https://***@b next"
    assert scrubbed("https://h/login?next=http://u:s3cr3t@h2/x") == "https://h/login?next=http://***@h2/x"
    assert scrubbed("[https://u:p@a](https://u:p@a)") == "[https://***@a](https://***@a)"
    assert scrubbed("s3://b/k;hf://x s3://u:p@h/1://x") == "s3://b/k;hf://x s3://***@h/1://x"
    import time
    started = time.perf_counter()   # still linear: URLs nested in URLs, and "://" runs without a scheme
    scrubbed("a://" * 100_000 + "http://" + "1://" * 100_000 + "x://" + "1" * 100_000 + "://" + "a://x:y/" * 100_000)
    # a password holding "://" is masked whole, not cut where the glued URL begins
    assert scrubbed("https://user:p://q@host/x") == "https://***@host/x"
    assert time.perf_counter() - started < 5
