"""Small pieces of the router: metrics buckets, vLLM metrics and usage parsing, replica arguments, API keys."""

from __future__ import annotations

import json

import pytest
from prometheus_client import generate_latest

from loraplane.router.metrics import RouterMetrics
from loraplane.router.replicas import parse_engine_load, parse_replica_arg
from loraplane.router.auth import ApiKeys
from loraplane.router.exchange import ask_for_usage, parse_stream_usage, parse_usage


def test_histogram_exposition_is_cumulative_with_le_inclusive():
    m = RouterMetrics()
    s = m.stats("chat", "v1")
    for v in (0.005, 0.006, 0.3, 1000.0):
        s.duration.observe(v)
    s.count(200)
    s.count(200)
    s.count(502)
    text = generate_latest(m.registry).decode()
    assert 'loraplane_router_request_duration_seconds_bucket{backend="v1",le="0.005",model="chat"} 1.0' in text
    assert 'loraplane_router_request_duration_seconds_bucket{backend="v1",le="0.01",model="chat"} 2.0' in text
    assert 'loraplane_router_request_duration_seconds_bucket{backend="v1",le="0.5",model="chat"} 3.0' in text
    assert 'loraplane_router_request_duration_seconds_bucket{backend="v1",le="+Inf",model="chat"} 4.0' in text
    assert 'loraplane_router_request_duration_seconds_count{backend="v1",model="chat"} 4.0' in text
    assert 'loraplane_router_requests_total{backend="v1",code="502",model="chat"} 1.0' in text
    assert 'loraplane_router_requests_total{backend="v1",code="200",model="chat"} 2.0' in text


def test_engine_load_from_vllm_metrics():
    text = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
vllm:num_requests_running{engine="1",model_name="tiny"} 1.0
vllm:num_requests_waiting{engine="0",model_name="tiny"} 2.0
vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 50.0
vllm:num_requests_swapped{engine="0"} 7.0
vllm:time_to_first_token_seconds_count{engine="0"} 9.0
"""
    assert parse_engine_load(text) == 6
    assert parse_engine_load(b"") == 0


@pytest.mark.parametrize("arg, expected", [
    ("http://10.0.0.7:8000", ("http://10.0.0.7:8000", "http://10.0.0.7:8081/status")),
    ("http://[fd00::7]:8000", ("http://[fd00::7]:8000", "http://[fd00::7]:8081/status")),
    ("http://127.0.0.1:9001", ("http://127.0.0.1:9001", None)),
    ("http://a:8000,none", ("http://a:8000", None)),
    ("http://a:9000,http://a:9001/status", ("http://a:9000", "http://a:9001/status")),
])
def test_replica_argument(arg, expected):
    assert parse_replica_arg(arg) == expected


@pytest.mark.parametrize("arg", ["10.0.0.7:8000", "https://a:8000", "http://a:8000,ftp://x"])
def test_bad_replica_argument_is_explained(arg):
    with pytest.raises(ValueError, match="--replica"):
        parse_replica_arg(arg)


def test_usage_parsing():
    assert parse_usage(b'{"choices":[{"text":"say \\"usage\\": 5"}],"usage":{"prompt_tokens":7,'
                       b'"total_tokens":10,"completion_tokens":3,"prompt_tokens_details":null}}') == (7, 3)
    sse = (b'data: {"choices":[{"text":"a"}],"usage":null}\n\n'
           b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":9,"total_tokens":13}}\n\n'
           b"data: [DONE]\n\n")
    assert parse_stream_usage(sse) == (4, 9)
    assert parse_usage(b'{"choices":[]}') is None and parse_stream_usage(b"data: [DONE]\n\n") is None
    assert parse_usage(b'{"usage": {"prompt_tokens": 2, "completion_tokens": 1}}') == (2, 1)


def test_usage_is_the_top_level_object_not_a_token_named_usage():
    # vLLM's chat answer has prompt_logprobs after usage; a prompt token that decodes to "usage" made the old
    # parser (last `"usage"` in the body) find no counts: the request went uncounted.
    usage = {"prompt_tokens": 7, "total_tokens": 10, "completion_tokens": 3}
    top = [{"usage": -0.5, "use": -1.2}]   # completions' top_logprobs: token text -> logprob
    body = json.dumps({"choices": [{"index": 0, "text": "usage", "logprobs": {"tokens": ["usage"],
                                                                             "top_logprobs": top}}],
                       "usage": usage,
                       "prompt_logprobs": [None, *[{"42": {"logprob": -1.0, "rank": 1, "decoded_token": "usage"}}] * 50]},
                      separators=(",", ":")).encode()
    assert parse_usage(body) == (7, 3)
    # Several `"usage": {` (not vLLM's shape): the body is parsed and the top-level one read.
    nested = json.dumps({"x": {"usage": {"prompt_tokens": 1, "completion_tokens": 1}}, "usage": usage}).encode()
    assert parse_usage(nested) == (7, 3)
    assert parse_usage(json.dumps({"usage": {"prompt_tokens": "7"}}).encode()) == (0, 0)   # not an int: 0
    assert parse_usage(b'{"usage": null}') is None and parse_usage(b"not json") is None


def test_ask_for_usage_only_for_streams_that_do_not():
    assert ask_for_usage(b'{"model":"m","prompt":"p"}') is None
    assert ask_for_usage(b'{"model":"m","stream":false,"prompt":"stream"}') is None
    assert ask_for_usage(b'{"model":"m","metadata":{"stream":true}}') is None   # not the top-level key
    assert ask_for_usage(b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}') is None
    assert ask_for_usage(b'{"model":"m","stream":true,"stream_options":"x"}') is None   # vLLM's 400, unchanged
    body = b'{"model": "m", "messages": [{"role": "user", "content": "\xe2\x80\xa8 hi"}], "stream": true}'
    out = ask_for_usage(body)
    assert out == body.replace(b"{", b'{"stream_options":{"include_usage":true},', 1)   # spliced, not re-encoded
    assert json.loads(out) == {**json.loads(body), "stream_options": {"include_usage": True}}
    for options in (None, {"include_usage": False, "continuous_usage_stats": True}, {}):
        out = json.loads(ask_for_usage(json.dumps({"model": "m", "stream": True, "stream_options": options}).encode()))
        assert out["stream_options"] == {**(options or {}), "include_usage": True, "continuous_usage_stats": False}


@pytest.mark.parametrize("text", [b'"\\ud800"', b'"a\xed\xb0\x80b"'])   # escaped, and raw (ED B0 80) bytes
def test_ask_for_usage_keeps_lone_surrogates_vllm_reads(text):
    """A lone surrogate is a string json.loads (vLLM's parser) accepts, escaped or as raw bytes; re-encoding a
    body that has stream_options raised UnicodeEncodeError, and the client's connection was dropped unanswered."""
    body = b'{"model":"m","prompt":%s,"stream":true,"stream_options":{"include_usage":false}}' % text
    out = ask_for_usage(body)
    assert json.loads(out) == {**json.loads(body), "stream_options": {"include_usage": True,
                                                                      "continuous_usage_stats": False}}


def test_api_keys_file_and_errors(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# comment\n\n  k1  \nk2\n")
    keys = ApiKeys(f)
    assert keys.check(b"Bearer k1") and keys.check(b"Bearer k2") and keys.check(b"Bearer k1")
    assert not keys.check(b"Bearer k3") and not keys.check(b"k1") and not keys.check(None)
    f.write_text("k3\n")
    assert keys.reload() and keys.check(b"Bearer k3") and not keys.check(b"Bearer k1")  # no stale acceptance
    # A key ends at "\n" only: splitlines() cut it at U+2028 / U+0085 / \x1c and made its pieces valid keys.
    f.write_text("abc\u2028def\nghi\x85jkl\x1cmno\n", encoding="utf-8")
    assert keys.reload()
    for piece in (b"abc", b"def", b"ghi", b"jkl", b"mno"):
        assert not keys.check(b"Bearer " + piece), piece
    assert keys.check(b"Bearer " + "abc\u2028def".encode())
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no keys found"):
        ApiKeys(tmp_path / "empty")


async def test_dns_discovery_resolves_every_address_and_keeps_known_replicas():
    from loraplane.router.replicas import ReplicaPool, resolve_replicas

    specs = await resolve_replicas("localhost", 8000, 8081)
    assert ("http://127.0.0.1:8000", "http://127.0.0.1:8081/status") in specs
    pool = ReplicaPool()
    pool.set_replicas(specs)
    known = pool.replicas[0]
    known.in_flight = 3
    pool.set_replicas(specs + [("http://10.9.9.9:8000", "http://10.9.9.9:8081/status")])
    assert pool.replicas[0] is known and known.in_flight == 3  # state survives re-resolution
    assert len(pool.replicas) == len(specs) + 1


async def test_dns_discovery_looks_again_soon_while_no_replica_can_serve(monkeypatch):
    """Regression (issue 11, the e2e apply→first-token benchmark): a router without a usable replica re-resolved
    the headless Service only every --dns-interval (5 s), so a route's first replica got its first request up to
    5 s after it was Ready. Without a usable replica it now looks every DNS_RETRY_WITHOUT_REPLICAS seconds; with
    one, every interval (no extra lookups in steady state)."""
    import asyncio

    from loraplane.router import replicas
    from loraplane.router.replicas import DNS_RETRY_WITHOUT_REPLICAS, ReplicaPool, run_dns_discovery

    lookups = []
    answer: list[tuple[str, str | None]] = []

    async def resolve(host, *_):
        lookups.append(host)
        return list(answer)

    async def poll(session, replica):
        replica.engine_ready = True   # the loader says vLLM is up

    monkeypatch.setattr(replicas, "resolve_replicas", resolve)
    pool = ReplicaPool()
    monkeypatch.setattr(pool, "_poll", poll)
    task = asyncio.create_task(run_dns_discovery(pool, "r-engine", 5.0, None))
    await asyncio.sleep(DNS_RETRY_WITHOUT_REPLICAS * 2.5)
    assert len(lookups) >= 3              # none yet: looked again soon
    answer.append(("http://10.0.0.9:8000", "http://10.0.0.9:8081/status"))
    await asyncio.sleep(DNS_RETRY_WITHOUT_REPLICAS * 1.5)
    assert [r.engine_url for r in pool.replicas] == ["http://10.0.0.9:8000"] and pool.replicas[0].usable()
    seen = len(lookups)
    await asyncio.sleep(DNS_RETRY_WITHOUT_REPLICAS * 3)
    assert len(lookups) == seen           # one usable replica: back to the interval
    task.cancel()

def test_the_bearer_scheme_is_matched_in_any_case(tmp_path):
    """RFC 9110 section 11.1: authentication schemes are case-insensitive; `bearer <key>` (as some clients send it)
    was refused 401. The key itself stays exact, and another scheme or no space is still refused."""
    f = tmp_path / "keys"
    f.write_text("k1\n")
    keys = ApiKeys(f)
    for value in (b"bearer k1", b"BEARER k1", b"BeArEr k1", b"Bearer  k1"):
        assert keys.check(value), value
    for value in (b"bearer K1", b"Basic k1", b"bearerk1", b"bearer", b"Bearer_k1"):
        assert not keys.check(value), value



def test_the_operators_router_command_line_is_accepted():
    """The Deployment the operator builds runs `python -m loraplane.router` with these arguments."""
    import argparse

    from loraplane.api.modelroute import ModelRoute
    from loraplane.builders.modelroute import router_args
    from loraplane.router.cli import _configure, add_router_arguments

    route = ModelRoute.model_validate({
        "apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute", "metadata": {"name": "chat", "namespace": "ml"},
        "spec": {"baseModel": {"uri": "pvc://models/base"}, "router": {"apiKeySecretRef": {"name": "keys"}}}})
    parser = argparse.ArgumentParser()
    add_router_arguments(parser)
    args = parser.parse_args(router_args(route))
    assert _configure(args) is None
    assert args.api_keys_file is not None and args.replicas_dns


def test_series_the_table_no_longer_feeds_are_dropped_after_their_retention_not_before():
    """Each adapter version has its own served name: a long-lived router must not keep a series per version it
    ever served. A (model, backend) pair, or a content model's decision series, that the routing table in use no
    longer feeds is still exported for RETIRED_SERIES_SECONDS (its last increments get scraped), then dropped;
    a pair with a request in flight stays; refusals under <unknown> are always kept."""
    from loraplane.api.wire.serving import ServingTable
    from loraplane.router.metrics import RETIRED_SERIES_SECONDS, UNKNOWN_MODEL, NO_BACKEND
    from loraplane.router.replicas import ReplicaPool
    from loraplane.router.server import Router

    def table(version: str, content: bool) -> ServingTable:
        return ServingTable.model_validate({
            "route": "r", "generation": 1, "base_model": "tiny", "served_model_name": "base", "max_lora_rank": 16,
            "max_loras": 4,
            "models": [{"name": "support", "backends": [{"served_name": f"support-{version}", "adapter": "support",
                                                         "weight": 100}]},
                       {"name": "general", "backends": [{"served_name": "base", "weight": 100}]}],
            "content_models": [{"name": "auto", "default": "general", "methods": ["rules"], "destinations": [
                {"model": "support", "rules": {"keywords": ["refund"]}}]}] if content else []})

    m = RouterMetrics()
    m.clock = lambda: 1000.0   # table changes expire too: they read the same clock as the scrapes below
    router = Router(ReplicaPool([]), metrics=m)
    router.set_table(table("v1", content=True))
    m.stats("support", "support-v1").count(200)
    busy = m.stats("support", "support-v1b")   # a pair of no table with a request still in flight
    busy.in_flight = 1
    m.count_refused(UNKNOWN_MODEL, 404)
    m.count_decision("auto", "support", "rules", 0.0001)
    m.count_fallback("auto", "rules", "no-match")
    router.set_table(table("v2", content=False))   # support-v2 replaces v1; the content model is gone
    m.stats("support", "support-v2").count(200)

    def series(now: float) -> str:   # a scrape at `now`
        m.clock = lambda: now
        return generate_latest(m.registry).decode()

    t0 = 1000.0
    text = series(t0)   # left now: still exported, with its last values
    assert 'backend="support-v1",code="200",model="support"} 1.0' in text
    assert 'loraplane_router_content_decisions_total{destination="support",method="rules",model="auto"} 1.0' in text
    assert series(t0 + RETIRED_SERIES_SECONDS - 1).count('backend="support-v1"') > 0
    text = series(t0 + RETIRED_SERIES_SECONDS)
    assert 'backend="support-v1"' not in text and 'model="auto"' not in text
    assert 'backend="support-v1b"' in text   # in flight: kept until it ends
    assert 'backend="support-v2",code="200",model="support"} 1.0' in text
    assert f'backend="{NO_BACKEND}",code="404",model="{UNKNOWN_MODEL}"' in text
    busy.in_flight = 0
    assert 'backend="support-v1b"' not in series(t0 + RETIRED_SERIES_SECONDS + 1)
    # A pair that comes back before its time is up keeps counting on the same series.
    router.set_table(table("v1", content=False))
    m.stats("support", "support-v1").count(200)
    router.set_table(table("v2", content=False))
    series(t0 + 2 * RETIRED_SERIES_SECONDS)
    router.set_table(table("v1", content=False))
    assert 'backend="support-v1",code="200",model="support"} 1.0' in series(t0 + 2 * RETIRED_SERIES_SECONDS + 10)


def test_refusals_of_a_public_name_without_backends_are_kept_while_the_table_has_the_name():
    """A route whose explicit backends all name unusable adapters publishes the name with no backends (the
    router answers it 503 itself, under backend=""): that series is fed by the table while the name is in it,
    so it is not dropped (and restarted from 0) every RETIRED_SERIES_SECONDS while clients are refused."""
    from loraplane.api.wire.serving import ServingTable
    from loraplane.router.metrics import NO_BACKEND, RETIRED_SERIES_SECONDS
    from loraplane.router.replicas import ReplicaPool
    from loraplane.router.server import Router

    m = RouterMetrics()
    router = Router(ReplicaPool([]), metrics=m)
    router.set_table(ServingTable.model_validate({
        "route": "r", "generation": 1, "base_model": "tiny", "served_model_name": "base", "max_lora_rank": 16,
        "max_loras": 4, "models": [{"name": "support", "backends": []}]}))
    m.count_refused("support", 503)
    for now in (1000.0, 1000.0 + RETIRED_SERIES_SECONDS + 1):
        m.clock = lambda now=now: now
        text = generate_latest(m.registry).decode()
        assert f'backend="{NO_BACKEND}",code="503",model="support"}} 1.0' in text


def test_series_expire_on_table_changes_too_when_nobody_scrapes():
    """Expiry ran at scrape time only: a router nobody scrapes (no Prometheus, no rollout analysis) kept a series
    per adapter version it ever served, the growth RETIRED_SERIES_SECONDS is there to bound. A table change
    expires too (each release is one), so such a router holds the versions of the last RETIRED_SERIES_SECONDS."""
    from loraplane.api.wire.serving import ServingTable
    from loraplane.router.metrics import RETIRED_SERIES_SECONDS
    from loraplane.router.replicas import ReplicaPool
    from loraplane.router.server import Router

    def table(version: int) -> ServingTable:
        return ServingTable.model_validate({
            "route": "r", "generation": version, "base_model": "tiny", "served_model_name": "base",
            "max_lora_rank": 16, "max_loras": 4,
            "models": [{"name": "support", "backends": [{"served_name": f"support-v{version}", "adapter": "support",
                                                         "weight": 100}]}]})

    m = RouterMetrics()
    router = Router(ReplicaPool([]), metrics=m)
    now = 0.0
    m.clock = lambda: now
    for version in range(1, 50):
        router.set_table(table(version))
        m.stats("support", f"support-v{version}").count(200)
        now += RETIRED_SERIES_SECONDS / 2   # a release every 7.5 minutes, never scraped
    kept = {backend for _, backend in m._stats}
    assert "support-v49" in kept and "support-v48" in kept and len(kept) <= 4, kept
