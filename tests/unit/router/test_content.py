"""Content routing's pure part (router/content.py): the decision text, compiled rules, label parsing, and how the
routing table compiles content-routed and external models. No servers."""

from __future__ import annotations

import json
import time

import pytest

from loraplane.api.orchestration import MAX_DECISION_TEXT_CHARS, ContentModel
from loraplane.api.wire.serving import ServingTable
from loraplane.api.orchestration import parse_label
from loraplane.router.content import CompiledContentModel, compile_re2, decision_text
from loraplane.router.table import BadRequest, RoutingTable, read_model


def content_model(*destinations: dict, default: str = "base", **extra) -> ContentModel:
    return ContentModel.model_validate({"name": "auto", "default": default, "destinations": list(destinations),
                                        **extra})


def chosen(cm: CompiledContentModel, text: str, headers: dict[bytes, bytes] | None = None) -> str | None:
    """The destination rules choose without token bounds (orchestrate does the same walk, in order)."""
    data = text.encode()
    for rule in cm.rules:
        if rule.match_text(data, headers):
            return rule.destination
    return None


# ---- decision text ----

def test_chat_reads_the_last_user_message_string_or_text_parts():
    body = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first"},
                         {"role": "assistant", "content": "ok"}, {"role": "user", "content": "write SQL"},
                         {"role": "assistant", "content": "sure"}]}
    assert decision_text(body, chat=True) == b"write SQL"
    parts = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "look at"}, {"type": "image_url", "image_url": {"url": "data:..."}},
        {"type": "text", "text": "this table"}, {"type": "text", "text": 7}, "junk"]}]}
    assert decision_text(parts, chat=True) == b"look at\nthis table"


@pytest.mark.parametrize("body", [
    {}, [], "text", {"messages": "x"}, {"messages": [None, 3, {"role": "user"}]},
    {"messages": [{"role": "user", "content": {"text": "x"}}]}, {"messages": [{"role": "assistant", "content": "x"}]},
    {"messages": [{"role": "user", "content": None}]},
])
def test_chat_without_a_usable_user_message_is_the_empty_text(body):
    assert decision_text(body, chat=True) == b""


def test_completions_read_the_prompt_string_or_the_first_of_a_list():
    assert decision_text({"prompt": "hello"}, chat=False) == b"hello"
    assert decision_text({"prompt": ["first", "second"]}, chat=False) == b"first"
    assert decision_text({"prompt": [1, 2, 3]}, chat=False) == b""          # token ids: no text
    assert decision_text({"prompt": [[1, 2]]}, chat=False) == b""
    assert decision_text({"prompt": []}, chat=False) == b""
    assert decision_text({"messages": [{"role": "user", "content": "x"}]}, chat=False) == b""


def test_the_text_is_cut_and_huge_bodies_cost_bounded_work():
    long = "é" * (3 * MAX_DECISION_TEXT_CHARS)
    assert decision_text({"prompt": long}, chat=False).decode() == "é" * MAX_DECISION_TEXT_CHARS
    many_parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "abc"}] * 200_000}]}
    started = time.perf_counter()
    text = decision_text(many_parts, chat=True)
    assert len(text.decode()) <= MAX_DECISION_TEXT_CHARS + 3
    assert time.perf_counter() - started < 0.5   # stops at the limit, not after 200k parts
    many_messages = {"messages": [{"role": "assistant", "content": "x"}] * 500_000 + [{"role": "user",
                                                                                      "content": "last"}]}
    assert decision_text(many_messages, chat=True) == b"last"


def test_lone_surrogates_become_replacement_characters():
    # JSON can spell a lone surrogate (json.loads accepts "\ud800"); UTF-8 cannot, and RE2 searches UTF-8.
    obj = json.loads('{"prompt": "sql \\ud800 query"}')
    text = decision_text(obj, chat=False)
    assert text == "sql ? query".encode()
    cm = CompiledContentModel.compile(content_model({"model": "sql", "rules": {"keywords": ["query"]}}))
    assert chosen(cm, text.decode()) == "sql"


# ---- rules ----

def test_keywords_match_whole_words_case_insensitively_in_any_script():
    cm = CompiledContentModel.compile(content_model(
        {"model": "sql", "rules": {"keywords": ["SQL", "select statement", "c++", "Straße"]}}))
    for text in ("write sql", "SQL?", "(sql)", "a SELECT   statement", "in C++ please", "c++", "die STRASSE",
                 "die straße", "sql"):
        expected = None if text == "die STRASSE" else "sql"   # RE2 folds case, not ß -> SS
        assert chosen(cm, text) == expected, text
    for text in ("mysql", "sqlite", "selectstatement", "xc++", "c", ""):
        assert chosen(cm, text) is None, text


def test_pattern_keywords_and_headers_must_all_hold_first_destination_wins():
    cm = CompiledContentModel.compile(content_model(
        {"model": "support", "rules": {"pattern": r"(?i)\border\s+#\d+", "keywords": ["refund"],
                                       "headers": {"X-Tier": "gold"}}},
        {"model": "support-any", "rules": {"keywords": ["refund"]}},
        {"model": "nothing"}, {"model": "labelled", "label": "x"}))
    assert [r.destination for r in cm.rules] == ["support", "support-any"]   # no rules: never chosen by rules
    assert cm.header_names == frozenset({b"x-tier"})
    assert chosen(cm, "Refund for order #12", {b"x-tier": b"gold"}) == "support"
    assert chosen(cm, "Refund for order #12", {b"x-tier": b"Gold"}) == "support-any"   # values are exact
    assert chosen(cm, "Refund for order #12", None) == "support-any"
    assert chosen(cm, "refund please", {b"x-tier": b"gold"}) == "support-any"
    assert chosen(cm, "hello", {b"x-tier": b"gold"}) is None


def test_token_bounds_are_checked_only_when_set():
    cm = CompiledContentModel.compile(content_model(
        {"model": "long", "rules": {"min_prompt_tokens": 10}}, {"model": "kw", "rules": {"keywords": ["x"]}}))
    assert cm.needs_tokens and cm.rules[0].needs_tokens and not cm.rules[1].needs_tokens
    assert cm.rules[0].match_tokens(10) and not cm.rules[0].match_tokens(9)
    plain = CompiledContentModel.compile(content_model({"model": "kw", "rules": {"keywords": ["x"]}}))
    assert not plain.needs_tokens


@pytest.mark.parametrize("pattern", [r"(a)\1", r"(?=x)y", r"(?<!x)y", "[", "(?P<n>a)(?P=n)"])
def test_patterns_re2_refuses_leave_only_that_destination_without_rules(pattern):
    cm = CompiledContentModel.compile(content_model(
        {"model": "bad", "rules": {"pattern": pattern}}, {"model": "good", "rules": {"keywords": ["x"]}}))
    assert [r.destination for r in cm.rules] == ["good"]
    assert len(cm.problems) == 1 and "'bad'" in cm.problems[0] and "RE2 refuses it" in cm.problems[0]


def test_catastrophic_patterns_run_in_linear_time():
    # Python's re takes exponential time on these; RE2 is linear in the text.
    cm = CompiledContentModel.compile(content_model(
        {"model": "a", "rules": {"pattern": r"^(a+)+$"}}, {"model": "b", "rules": {"pattern": r"(x+x+)+y"}}))
    started = time.perf_counter()
    for _ in range(20):
        assert chosen(cm, "a" * (MAX_DECISION_TEXT_CHARS - 1) + "!") is None
        assert chosen(cm, "x" * MAX_DECISION_TEXT_CHARS) is None
    assert time.perf_counter() - started < 1.0


def test_the_largest_keyword_set_the_api_allows_compiles_and_matches():
    words = [f"w{i:03d}" + "k" * 195 for i in range(256)]   # 256 keywords of 199-200 characters (the API's bounds)
    cm = CompiledContentModel.compile(content_model({"model": "big", "rules": {"keywords": words}}))
    assert not cm.problems
    assert chosen(cm, "say " + words[200].upper() + ".") == "big"
    assert chosen(cm, "say " + words[200] + "k") is None


def test_compile_re2_names_the_field():
    with pytest.raises(ValueError, match=r"^here: RE2 refuses it"):
        compile_re2(r"(a)\1", "here")
    with pytest.raises(ValueError, match=r"^here: it holds a lone surrogate"):
        compile_re2("\ud800", "here")   # a lone surrogate in a table's pattern: not UTF-8


# ---- labels ----

@pytest.mark.parametrize("answer,label", [
    (" support", "support"), ("sql\n", "sql"), ("  SQL. yes", "sql"), (" general-chat more", "general-chat"),
    ("support_2", "support_2"), ("", None), ("   ", None), ("!sql", None), (None, None), (3, None),
    (" -x", None), ("x" * 10_000, "x" * 256),
])
def test_parse_label_reads_the_first_word(answer, label):
    assert parse_label(answer) == label


def test_labels_map_to_destinations_case_insensitively():
    cm = CompiledContentModel.compile(content_model({"model": "s", "label": "support"}, {"model": "q", "label": "sql"},
                                                    {"model": "q2", "label": "sql"}, {"model": "n"}))
    assert cm.labels == {"support": "s", "sql": "q"}   # a repeated label: the first destination keeps it
    assert cm.max_label_chars == 7


# ---- the routing table ----

def table_with(content: list[dict], external: list[dict] | None = None) -> ServingTable:
    return ServingTable.model_validate({
        "route": "r", "base_model": "tiny", "served_model_name": "base", "max_lora_rank": 16, "max_loras": 4,
        "models": [{"name": n, "backends": [{"served_name": n + "-v1", "adapter": n, "weight": 100}]}
                   for n in ("support", "sql", "general")],
        "content_models": content, "external_models": external or []})


def test_table_compiles_content_and_external_models_and_lists_content_names():
    t = RoutingTable.compile(table_with(
        [{"name": "auto", "default": "general", "destinations": [
            {"model": "sql", "rules": {"keywords": ["sql"], "headers": {"X-Team": "data"}}},
            {"model": "docs", "rules": {"keywords": ["docs"]}}]}],
        [{"name": "docs", "route": "other", "url": "http://other-router.ns.svc:8080"}]))
    assert set(t.content) == {"auto"} and set(t.external) == {"docs"}
    assert t.rule_headers == frozenset({b"x-team"})
    assert [m["id"] for m in json.loads(t.models_json)["data"]] == ["support", "sql", "general", "auto", "docs"]
    assert t.served_names() == ["support", "sql", "general", "auto", "docs"]
    assert t.dropped == [] and t.warnings == []


def test_table_drops_a_content_name_that_is_a_public_model_and_names_unknown_destinations():
    t = RoutingTable.compile(table_with([
        {"name": "sql", "default": "general", "destinations": [{"model": "support"}]},
        {"name": "auto", "default": "nowhere", "destinations": [{"model": "ghost", "rules": {"pattern": "(?=x)"}}]},
    ], [{"name": "general", "route": "other", "url": "http://x"}]))
    assert set(t.content) == {"auto"} and "sql" in t.models and t.external == {}
    text = "\n".join(t.dropped)
    assert "content_models[0] 'sql': the name is already a public model" in text
    assert "external_models[0] 'general': " in text   # left out: the route's own model keeps the name
    assert "RE2 refuses it" in text
    # Kept (the operator's status says it too), but will not serve: warnings, not entries left out.
    notes = "\n".join(t.warnings)
    assert "default 'nowhere' is neither a model of this route nor an external model" in notes
    assert "destination 'ghost' is neither" in notes and "neither" not in text


def test_semantic_key_changes_only_with_examples_or_embedding_model():
    def key(examples, embedding="emb"):
        return CompiledContentModel.compile(content_model(
            {"model": "a", "examples": examples, "rules": {"keywords": ["k"]}}, methods=["semantic"],
            semantic={"embedding_model": embedding})).semantic_key
    assert key(["x"]) == key(["x"]) != key(["y"])
    assert key(["x"]) != key(["x"], "emb2")


def test_a_body_nested_too_deeply_is_a_bad_request_not_a_crash():
    # json's C decoder raises RecursionError (not ValueError) past ~1000 levels; read_model parses bodies whose
    # `model` is spelled with escapes, and content routing parses every body it decides on.
    body = b'{"mod\\u0065l": "auto", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(BadRequest, match="nests arrays or objects too deeply"):
        read_model(body)


def test_rule_matchers_answer_as_re2_search_does():
    # The rules call RE2's compiled program directly (content._matcher); its answer must be search's, on any text.
    from loraplane.router import content as mod
    programs = [compile_re2(r"(?i)\b(sql|query)\b", "p"), compile_re2(r"^$", "empty"), compile_re2(r"é+", "u"),
                mod._keyword_program(["refund", "log in", "C++"], "k")]
    texts = [b"", b"SQL?", b"mysql", b"a query here", "caf\u00e9\u00e9".encode(), b"please log   in", b"c++ x",
             b"\xff\xfe not utf-8", b"x" * 10_000 + b" refund"]
    for p in programs:
        fast, slow = mod._matcher(p), (lambda t, p=p: p.search(t) is not None)
        assert [fast(t) for t in texts] == [slow(t) for t in texts]

    class Wrapped:   # a google-re2 without the internals the fast path uses: search answers
        def __init__(self, p):
            self.p = p

        def search(self, text):
            return self.p.search(text)

    assert [mod._matcher(Wrapped(programs[0]))(t) for t in texts] == [programs[0].search(t) is not None
                                                                      for t in texts]
