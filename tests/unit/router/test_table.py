"""Routing decisions and body rewriting: pure functions, no servers."""

from __future__ import annotations

import collections
import json
import random

import pytest

from loraplane.router.table import BadRequest, RoutingTable, read_model, rewrite_model
from loraplane.api.wire.serving import ServingTable


def make_table(models: dict[str, list[tuple[str, int]]], **router) -> ServingTable:
    return ServingTable.model_validate({
        "route": "r", "base_model": "tiny", "served_model_name": "base", "max_lora_rank": 16, "max_loras": 4,
        "models": [{"name": name, "backends": [{"served_name": s, "adapter": None if s == "base" else s,
                                                "weight": w} for s, w in backends]}
                   for name, backends in models.items()],
        "router": router})


def route_of(models, name):
    return RoutingTable.compile(make_table(models)).models[name]


# ---- body surgery ----

@pytest.mark.parametrize("body", [
    b'{"model": "chat", "prompt": "hi", "max_tokens": 5}',
    b'{"prompt":"say \\"model\\": no","model":"chat"}',                          # model not first, parsed
    b'{"messages":[{"role":"user","content":"x"}],"model" : "chat","n":1}',     # openai-python key order
    b'{"model":"chat","response_format":{"json_schema":{"properties":{"model":{"type":"string"}}}}}',
])
def test_rewrite_changes_only_model(body):
    route = route_of({"chat": [("chat-v2", 100)]}, "chat")
    model, handle = read_model(body)
    assert model == "chat"
    out = rewrite_model(body, handle, route.backends[0])
    assert json.loads(out) == {**json.loads(body), "model": "chat-v2"}
    if type(handle) is tuple:  # spliced: every other byte is the client's own
        assert out.replace(b'"chat-v2"', b'"chat"', 1) == body


def test_nested_model_key_is_not_taken_for_the_top_level_one():
    body = b'{"extra":{"model":"evil"},"model":"chat"}'
    model, handle = read_model(body)
    assert model == "chat"
    out = json.loads(rewrite_model(body, handle, route_of({"chat": [("v1", 100)]}, "chat").backends[0]))
    assert out == {"extra": {"model": "evil"}, "model": "v1"}


@pytest.mark.parametrize("body", [
    b'{"model":"chat","model":"secret-adapter"}',
    b'{"model": "a", "mod\\u0065l": "x--v9"}',                      # issue 12: routed `a`, vLLM served x--v9
    b'{"mod\\u0065l": "x--v9", "model": "a"}',
    b'{"prompt":"p","\\u006d\\u006f\\u0064\\u0065\\u006C":"x--v9","model":"a"}',  # every letter, upper hex
    b'{"extra":{"model":"n"},"model":"a","mo\\u0064el":"x--v9"}',
    b'\xef\xbb\xbf{"model":"a","mod\\u0065l":"x--v9"}',             # behind a BOM
    '{"model":"a","mod\\u0065l":"x--v9"}'.encode("utf-16"),        # UTF-16, which json.loads also reads
])
def test_duplicate_top_level_model_is_refused_naming_the_param(body):
    """Which duplicate counts depends on the parser (vLLM's json.loads takes the last): the router refuses
    instead of routing one name while vLLM serves another."""
    with pytest.raises(BadRequest, match="`model` appears 2 times") as err:
        read_model(body)
    assert err.value.param == "model"


# Bodies where a fast scan and a real JSON parser could disagree about `model`.
TRICKY_BODIES = [
    b'{"model":"chat","prompt":"p"}',
    b'{"model":"chat","x":{"mod\\u0065l":"x--v9"}}',                 # escaped, but nested: not the top level
    b'{"x":{"model":"x--v9"},"mod\\u0065l":"chat"}',                  # top level escaped, literal one nested
    b'{"x":{"model":"chat"},"mod\\u0065l":"chat"}',                   # ... with the same value (splice trap)
    b'{"mod\\u0065l":"chat"}',
    b'{"model":"ch\\u0061t"}',                                        # escaped value
    b'\xef\xbb\xbf{"model":"chat"}',                                  # BOM: json.loads decodes it
    b'  {"model":"chat"}  ',
    '{"model":"chat","p":"é"}'.encode("utf-16-le"),
    '{"model":"chat","p":"é"}'.encode("utf-32"),
    b'{"model":"chat","temperature":NaN,"top_p":Infinity}',          # Python's json accepts these literals
    b'{"model":"chat","p":"\\ud800"}',                                # a lone surrogate escape
    b'{"x":{"model":1},"model":"chat","p":"\\ud800"}',                # ... in a body that must be re-encoded
    b'{"model":"chat"} {"model":"x--v9"}',                            # trailing garbage: a second object
    b'{"model":"chat"}garbage',
    b'{"model":"chat","p":"\xff"}',                                   # invalid UTF-8 after the model
    b'{"model":"ch\xffat"}',                                          # invalid UTF-8 in the model
    b'{"model":"chat","p":"\\\\u0065"}',                              # an escaped backslash, not an escape
    b'{"model":"chat", "prompt": "say \\"model\\": \\"x--v9\\""}',
    b'{"model":"chat","model":"chat"}',
    b'{"model":"chat","mod\\u0065l":"x--v9"}',                          # issue 12: vLLM would serve x--v9
    b'{"model":"\xed\xa0\x80"}',                                        # a lone surrogate as raw bytes: json.loads
    b'\xef\xbb\xbf{"model":"ch\xed\xb0\x80at"}',                          # reads them (surrogatepass)
    b'{"model":"chat","p":"\xed\xa0\x80"}',
]


def _vllm_reads(data: bytes):
    """What vLLM (FastAPI -> Starlette `json.loads(raw bytes)`) and pydantic's own JSON parser read as the
    top-level `model` of a body, and how many top-level `model` keys each parser saw; None if refused."""
    import pydantic_core

    out = []
    try:
        counts = []

        def hook(pairs):
            counts.append(sum(1 for k, _ in pairs if k == "model"))
            return dict(pairs)

        obj = json.loads(data, object_pairs_hook=hook)
        out.append(("json", obj.get("model") if isinstance(obj, dict) else None, counts[-1] if counts else 0))
    except (ValueError, UnicodeDecodeError):
        out.append(("json", None, 0))
    try:
        obj = pydantic_core.from_json(data)
        out.append(("pydantic", obj.get("model") if isinstance(obj, dict) else None, None))
    except ValueError:
        out.append(("pydantic", None, None))
    return out


@pytest.mark.parametrize("body", TRICKY_BODIES)
def test_what_the_router_routes_is_what_vllm_reads(body):
    """Whole class (issue 12): whatever the body's form, the router routes by the `model` vLLM would read,
    and every parser that accepts the forwarded body reads the served name the router chose, once."""
    route = route_of({"chat": [("chat-v2", 100)]}, "chat")
    try:
        model, handle = read_model(body)
    except BadRequest:
        return  # refused: nothing reaches vLLM
    for parser, read, _ in _vllm_reads(body):
        if read is not None and parser == "json":  # vLLM would have served `read`: the router routes it
            assert model == read, (parser, model, read)
    out = rewrite_model(body, handle, route.backends[0])
    for parser, read, count in _vllm_reads(out):
        if read is not None:
            assert read == "chat-v2", (parser, out)
        if count is not None and read is not None:
            assert count == 1, (parser, out)


def test_escaped_and_unicode_names():
    body = '{"model":"caf\\u00e9"}'.encode()
    model, handle = read_model(body)
    assert model == "café"
    out = rewrite_model(body, handle, route_of({"café": [("v\"1", 100)]}, "café").backends[0])
    assert json.loads(out)["model"] == 'v"1'


@pytest.mark.parametrize("body, fragment", [
    (b"not json", "not valid JSON"),
    (b"[1,2]", "JSON object"),
    (b'{"prompt":"x"}', "`model` is required"),
    (b'{"model":5}', "`model` is required"),
])
def test_bad_bodies_are_named(body, fragment):
    with pytest.raises(BadRequest, match=fragment):
        read_model(body)


# ---- backend choice ----

def test_weights_within_statistical_bounds():
    route = route_of({"chat": [("v1", 90), ("v2", 10)]}, "chat")
    rng = random.Random(1234)
    n = 20000
    counts = collections.Counter(route.pick(rng).served_name for _ in range(n))
    # Binomial(20000, 0.1): sd ~42; 5 sd bounds never trip by chance with a fixed seed and catch any bias.
    assert abs(counts["v2"] - 2000) < 5 * 42, counts


def test_zero_weight_is_never_chosen_and_all_zero_is_none():
    route = route_of({"chat": [("v1", 100), ("v2", 0)]}, "chat")
    rng = random.Random(1)
    assert {route.pick(rng).served_name for _ in range(2000)} == {"v1"}
    assert route.pick(rng, b"user-7").served_name == "v1"
    assert route_of({"off": [("v1", 0)]}, "off").pick(rng) is None


def test_sticky_is_stable_and_weighted():
    route = route_of({"chat": [("v1", 80), ("v2", 20)]}, "chat")
    rng = random.Random(0)
    users = [f"user-{i}".encode() for i in range(5000)]
    first = {u: route.pick(rng, u).served_name for u in users}
    assert all(route.pick(rng, u).served_name == first[u] for u in users)  # same key, same version
    share = sum(v == "v2" for v in first.values()) / len(users)
    assert 0.17 < share < 0.23, share  # HRW honours the weights (sd of the share ~0.006)


def test_sticky_moves_only_the_callers_whose_share_moves():
    users = [f"session-{i}".encode() for i in range(5000)]
    rng = random.Random(0)
    before = route_of({"chat": [("v1", 90), ("v2", 10)]}, "chat")
    after = route_of({"chat": [("v1", 70), ("v2", 30)]}, "chat")
    b = {u: before.pick(rng, u).served_name for u in users}
    a = {u: after.pick(rng, u).served_name for u in users}
    assert all(a[u] == "v2" for u in users if b[u] == "v2")  # canary callers stay on the canary
    moved = sum(b[u] != a[u] for u in users) / len(users)
    assert 0.15 < moved < 0.25, moved  # ~20% of callers move, not a reshuffle


def test_exclusion_renormalises():
    route = route_of({"chat": [("v1", 50), ("v2", 30), ("v3", 20)]}, "chat")
    rng = random.Random(5)
    v1 = route.backends[0]
    counts = collections.Counter(route.pick(rng, None, {v1}).served_name for _ in range(10000))
    assert set(counts) == {"v2", "v3"} and abs(counts["v2"] - 6000) < 5 * 49, counts
    assert route.pick(rng, b"k", {v1}).served_name in ("v2", "v3")
    assert route.pick(rng, None, set(route.backends)) is None


def test_duplicate_public_name_drops_the_entry_not_the_table():
    # Issue 13 item 2: a duplicate name used to refuse the whole table (a restarted router never got ready).
    t = make_table({"a": [("v1", 100)], "b": [("v3", 100)]})
    dup = t.models[0].model_copy(update={"backends": [t.models[0].backends[0].model_copy(
        update={"served_name": "v2"})]})
    t = t.model_copy(update={"models": [t.models[0], dup, t.models[1]]})
    compiled = RoutingTable.compile(t)
    assert set(compiled.models) == {"a", "b"}
    assert [b.served_name for b in compiled.models["a"].backends] == ["v1"]  # the first entry keeps the name
    assert len(compiled.dropped) == 1 and "models[1] 'a'" in compiled.dropped[0]
    assert [m["id"] for m in json.loads(compiled.models_json)["data"]] == ["a", "b"]


def test_models_listing():
    listing = json.loads(RoutingTable.compile(make_table({"a": [("v1", 100)], "b": [("base", 100)]})).models_json)
    assert [m["id"] for m in listing["data"]] == ["a", "b"] and listing["object"] == "list"


def test_router_service_serves_the_rest_of_a_table_with_a_duplicate(caplog):
    # Issue 13 item 2: the router refused every table holding a duplicate name, so a restarted router never
    # became ready. Now it takes the table, logs the dropped entry and exports how many it dropped.
    from loraplane.kube.tablewatch import TableRead
    from loraplane.router.replicas import ReplicaPool
    from loraplane.router.server import Router
    from loraplane.router.service import RouterService

    t = make_table({"analytics-sql": [("base", 100)], "other": [("v3", 100)]})
    t = t.model_copy(update={"models": [t.models[0], t.models[0], t.models[1]]})
    service = RouterService(router=Router(ReplicaPool()))
    with caplog.at_level("ERROR", logger="loraplane.router"):
        assert service.apply_read(TableRead("test", t.to_json(), t))
    assert set(service.router.table.models) == {"analytics-sql", "other"}
    assert "analytics-sql" in caplog.text and "left out" in caplog.text
    assert service.router.metrics.registry.get_sample_value("loraplane_router_table_dropped_entries") == 1
