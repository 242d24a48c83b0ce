"""spec.contentRouting validation (issue 15): what `api.parse` refuses (so `loraplane validate`, `render` and the
operator's InvalidSpec say the same), each message naming the field and the fix."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from loraplane.api import parse
from loraplane.api.orchestration import compile_pattern
from loraplane.api.validation import format_validation_error


def route(content: list[dict], routes: list[dict] | None = None) -> dict:
    return {"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute", "metadata": {"name": "r"},
            "spec": {"baseModel": {"name": "org/tiny"},
                     "routes": routes or [{"name": "sql", "backends": [{"adapter": "sql"}]},
                                          {"name": "general", "backends": [{"base": True}]}],
                     "contentRouting": content}}


def error(content: list[dict], routes: list[dict] | None = None) -> str:
    with pytest.raises(ValidationError) as err:
        parse(route(content, routes))
    return format_validation_error(err.value, "spec field ")


def auto(**extra) -> dict:
    return {"name": "auto", "default": "general", "destinations": [{"model": "sql"}], **extra}


def test_a_valid_content_route_parses():
    r = parse(route([auto(methods=["rules", "classifier"], classifier={"model": "clf"},
                          destinations=[{"model": "sql", "label": "sql", "rules": {"pattern": "(?i)\\bselect\\b"}},
                                        {"model": "support", "label": "support"}])]))
    assert r.spec.content_routing[0].destinations[0].rules.pattern == "(?i)\\bselect\\b"


@pytest.mark.parametrize("pattern", ["(a)\\1", "(?=x)y", "(?<!a)b", "a{2000}{2000}"])
def test_a_pattern_re2_cannot_run_is_refused_naming_the_field(pattern):
    msg = error([auto(destinations=[{"model": "sql", "rules": {"pattern": pattern}}])])
    assert "spec.contentRouting[0].destinations[0].rules.pattern" in msg
    assert "RE2 refuses it" in msg and "RE2 syntax" in msg


def test_compile_pattern_is_the_routers_program():
    assert compile_pattern("(?i)\\bselect\\b").search("please SELECT a row")
    with pytest.raises(ValueError, match="RE2 refuses it"):
        compile_pattern("(a)\\1")


def test_a_content_name_that_spec_routes_also_publishes_is_refused():
    msg = error([auto(name="sql")])
    assert "contentRouting[0].name 'sql' is also routes[0].name" in msg and "rename" in msg


def test_two_content_models_with_one_name_are_refused():
    msg = error([auto(), auto()])
    assert "contentRouting[1].name 'auto' is also contentRouting[0].name" in msg


def test_a_label_used_twice_is_refused():
    msg = error([auto(methods=["classifier"], classifier={"model": "clf"},
                      destinations=[{"model": "sql", "label": "data"}, {"model": "general", "label": "data"}])])
    assert "spec.contentRouting[0]" in msg
    assert "destinations[1].label 'data' is also destinations[0].label" in msg and "different label" in msg


@pytest.mark.parametrize("field,extra", [
    ("default", {"default": "auto2"}),
    ("destinations[0].model", {"destinations": [{"model": "auto2"}]}),
    ("classifier.model", {"methods": ["classifier"], "classifier": {"model": "auto2"},
                          "destinations": [{"model": "sql", "label": "sql"}]}),
    ("semantic.embeddingModel", {"methods": ["semantic"], "semantic": {"embeddingModel": "auto2"},
                                 "destinations": [{"model": "sql", "examples": ["x"]}]}),
])
def test_a_content_model_sending_requests_to_a_content_model_is_refused_no_chains(field, extra):
    msg = error([auto(**extra), {"name": "auto2", "default": "general", "destinations": [{"model": "sql"}]}])
    assert f"contentRouting[0].{field} 'auto2' is a content-routed model (contentRouting[1])" in msg
    assert "do not chain" in msg


def test_a_content_model_naming_itself_is_refused():
    assert "do not chain" in error([auto(default="auto")])


def test_methods_that_could_never_choose_are_refused():
    assert "methods: 'rules' is listed twice" in error([auto(methods=["rules", "rules"])])
    assert "no destination has a `label`" in error([auto(methods=["classifier"], classifier={"model": "c"})])
    assert "no destination has `examples`" in error([auto(methods=["semantic"], semantic={"embeddingModel": "e"})])


def test_content_routing_too_large_for_the_serving_table_is_refused():
    examples = ["x" * 2000] * 256
    big = [auto(name=f"auto{i}", methods=["semantic"], semantic={"embeddingModel": "e"},
                destinations=[{"model": "sql", "examples": examples}]) for i in range(1)]
    msg = error(big)
    assert "contentRouting is" in msg and "262144-byte budget" in msg and "fewer or shorter" in msg


def test_the_patterns_of_one_spec_share_a_compile_budget_so_parsing_it_stays_cheap():
    """A spec may hold 32 x 64 rule patterns and every parse (each reconcile, `loraplane validate`) compiles them
    all: distinct near-limit patterns (a repeated Unicode class) used to be accepted after ~0.1-0.4 s each, minutes
    of the operator's CPU per reconcile for one spec. Now they share PATTERNS_MAX_INSTRUCTIONS: refused, fast,
    naming the field and the fix; many ordinary patterns still fit."""
    import time

    def refused_quickly(repeat: int) -> str:
        """The error for two content models of 64 distinct `[\\p{L}\\p{N}]{repeat}` patterns each, within 5 s."""
        specs = [{"name": f"auto{i}", "default": "general",
                  "destinations": [{"model": "sql", "rules": {"pattern": "[\\p{L}\\p{N}]{%d}" % repeat + f"z{i}x{j}"}}
                                   for j in range(64)]} for i in range(2)]
        started = time.perf_counter()
        msg = error(specs)
        assert time.perf_counter() - started < 5
        return msg

    msg = refused_quickly(300)
    assert "spec.contentRouting[0].destinations[0].rules.pattern" in msg
    assert "over their budget" in msg or "RE2 refuses it" in msg
    # Near the per-pattern bound (accepted one by one), the total refuses the rest without compiling them.
    msg = refused_quickly(50)
    assert "contentRouting[0].destinations[2].rules" not in msg and "spec.contentRouting[0].destinations[3].rules.pattern" in msg
    assert "over their budget of 262144 RE2 program instructions" in msg and "fewer or simpler" in msg
    # Ordinary patterns: 32 x 64 of them fit.
    plain = [{"name": f"auto{i}", "default": "general",
              "destinations": [{"model": "sql", "rules": {"pattern": f"(?i)\\b(select|join|w{i}x{j})\\b"}}
                               for j in range(64)]} for i in range(32)]
    parse(route(plain))


# A newcomer's mistakes (issue 15 follow-up): each refused with the field and the fix.


@pytest.mark.parametrize("method,setting", [("classifier", "classifier: {model:"),
                                            ("semantic", "semantic: {embeddingModel:")])
def test_a_method_without_its_settings_names_the_field_to_add_or_the_method_to_remove(method, setting):
    msg = error([auto(methods=[method], destinations=[{"model": "sql", "label": "sql", "examples": ["x"]}])])
    assert f"methods has `{method}` but `{method}` is not set" in msg
    assert setting in msg and f"remove {method} from methods" in msg


def test_min_prompt_tokens_over_max_is_refused_it_could_never_match():
    msg = error([auto(destinations=[{"model": "sql", "rules": {"minPromptTokens": 100, "maxPromptTokens": 10}}])])
    assert "spec.contentRouting[0].destinations[0].rules" in msg
    assert "minPromptTokens 100 is over maxPromptTokens 10" in msg and "swap them" in msg
    parse(route([auto(destinations=[{"model": "sql", "rules": {"minPromptTokens": 10, "maxPromptTokens": 10}}])]))


@pytest.mark.parametrize("name", ["X Team", "x-tenant:", ""])
def test_an_odd_header_name_is_refused_once_naming_the_field_and_the_fix(name):
    msg = error([auto(destinations=[{"model": "sql", "rules": {"headers": {name: "a"}}}])])
    assert f"spec.contentRouting[0].destinations[0].rules.headers: {name!r} is not an HTTP header name" in msg
    assert "e.g. X-Team" in msg


def test_an_embedding_model_that_is_this_generate_routes_own_model_is_refused():
    msg = error([auto(methods=["semantic"], semantic={"embeddingModel": "general"},
                      destinations=[{"model": "sql", "examples": ["count rows"]}])])
    assert "contentRouting[0].semantic.embeddingModel 'general' is routes[1].name of this route" in msg
    assert "spec.engine.task generate" in msg and "ModelRoute with spec.engine.task embed" in msg


@pytest.mark.parametrize("extra", [
    {"default": "embed"},
    {"destinations": [{"model": "embed"}]},
    {"methods": ["classifier"], "classifier": {"model": "embed"}, "destinations": [{"model": "chat", "label": "a"}]},
])
def test_a_completion_asked_of_this_embed_routes_own_model_is_refused(extra):
    body = route([auto(**{"default": "chat", **extra})], routes=[{"name": "embed", "backends": [{"base": True}]}])
    body["spec"]["engine"] = {"task": "embed"}
    with pytest.raises(ValidationError) as err:
        parse(body)
    msg = format_validation_error(err.value, "spec field ")
    assert "'embed' is routes[0].name of this route, which serves an embedding model" in msg
    assert "engine.task generate" in msg


def test_an_embed_routes_own_model_as_the_embedding_model_parses():
    body = route([auto(default="chat", methods=["semantic"], semantic={"embeddingModel": "embed"},
                       destinations=[{"model": "chat", "examples": ["x"]}])],
                 routes=[{"name": "embed", "backends": [{"base": True}]}])
    body["spec"]["engine"] = {"task": "embed"}
    parse(body)


def test_an_empty_rules_block_is_refused_it_never_matches():
    msg = error([auto(destinations=[{"model": "sql", "rules": {}}])])
    assert "spec.contentRouting[0].destinations[0].rules: rules sets no condition, so it never matches" in msg
    assert "set pattern, keywords, headers" in msg and "or remove rules" in msg
