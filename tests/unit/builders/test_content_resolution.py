"""builders.orchestration: a route's spec.contentRouting resolved against the ModelRoutes of its namespace (issue 15):
the wire content models, the external models owned by other routes, ownership across routes (oldest wins),
missing references and chains. Pure: the other routes are Publications built by hand."""

from __future__ import annotations

from loraplane.api import Adapter, ModelRoute
from loraplane.api.paths import ROUTER_PORT
from loraplane.api.orchestration import Publication, publication
from loraplane.builders.orchestration import (publication_changes, referenced_names,
                                              resolve_content)
from loraplane.builders.resolution import resolve

T1, T2, T3 = "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z", "2026-01-03T00:00:00Z"


def route_body(name="front", created=T2, content=None, routes=None, log_decisions=False) -> dict:
    return {"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute",
            "metadata": {"name": name, "namespace": "team", "creationTimestamp": created, "generation": 1},
            "spec": {"baseModel": {"name": "org/base"},
                     "router": {"logDecisions": log_decisions},
                     "routes": routes if routes is not None else [
                         {"name": "general", "backends": [{"base": True}]},
                         {"name": "sql", "backends": [{"adapter": "sql"}]}],
                     "contentRouting": content or []}}


def auto(**extra) -> dict:
    return {"name": "auto", "default": "general",
            "methods": ["rules", "classifier", "semantic"],
            "destinations": [{"model": "sql", "label": "sql", "rules": {"pattern": "(?i)\\bselect\\b"},
                              "examples": ["count rows per day"]},
                             {"model": "support", "label": "support", "rules": {"keywords": ["refund"]},
                              "examples": ["where is my order"]}],
            "classifier": {"model": "router-clf"}, "semantic": {"embeddingModel": "embed"}, **extra}


SQL = Adapter.model_validate({"kind": "Adapter", "metadata": {"name": "sql", "namespace": "team"},
                              "spec": {"baseModel": {"name": "org/base"}, "source": {"uri": "s3://b/sql"},
                                       "version": "1", "rank": 8}})


def test_names_served_here_stay_local_and_other_routes_names_become_external_models():
    route = ModelRoute.model_validate(route_body(content=[auto()], log_decisions=True))
    others = [Publication("support-route", T1, models=(("support", True),)),
              Publication("classifiers", T3, models=(("router-clf", False),))]
    res = resolve(route, [SQL], others=others)
    table = res.table
    assert table.route_created == T2
    [cm] = table.content_models
    assert cm.name == "auto" and cm.default == "general" and cm.log_decisions
    assert [d.model for d in cm.destinations] == ["sql", "support"]
    assert cm.destinations[0].rules.pattern == "(?i)\\bselect\\b" and cm.destinations[1].rules.keywords == ["refund"]
    assert cm.destinations[0].label == "sql" and cm.destinations[0].examples == ["count rows per day"]
    # The embedding model is nowhere: method semantic is taken out; the classifier (another route's) stays.
    assert cm.methods == ["rules", "classifier"] and cm.semantic is None and cm.classifier.model == "router-clf"
    assert [(e.name, e.route, e.url) for e in table.external_models] == [
        ("router-clf", "classifiers", f"http://classifiers-router.team.svc:{ROUTER_PORT}"),
        ("support", "support-route", f"http://support-route-router.team.svc:{ROUTER_PORT}")]
    targets = res.content.targets
    assert targets["sql"].local and targets["general"].local and targets["sql"].route == "front"
    assert targets["embed"].missing == "no ModelRoute of the namespace publishes it"
    assert res.content.missing == {"auto": [("semantic.embeddingModel", "embed")]}
    assert "semantic.embeddingModel 'embed'" in res.content.missing_message()
    # The wire invariant the router relies on: every name a content model references is in the table.
    known = {m.name for m in table.models} | {e.name for e in table.external_models}
    assert {cm.default, *(d.model for d in cm.destinations), cm.classifier.model} <= known
    # The table JSON round-trips (the router reads it with extra=forbid).
    assert type(table).model_validate_json(table.to_json()) == table


def test_the_oldest_route_publishing_a_name_owns_it():
    route = ModelRoute.model_validate(route_body(content=[auto(methods=["rules"], classifier=None,
                                                               semantic=None)]))
    others = [Publication("young", T3, models=(("support", True),)),
              Publication("old", T1, models=(("support", False),))]
    res = resolve(route, [SQL], others=others).content
    assert res.targets["support"].route == "old"
    assert [e.route for e in res.external] == ["old"]


def test_a_name_an_older_route_publishes_is_a_conflict_on_the_later_route_only():
    later = ModelRoute.model_validate(route_body(created=T2))
    older = ModelRoute.model_validate(route_body(name="older", created=T1))
    assert resolve(later, [SQL], others=[Publication("older", T1, models=(("sql", True),))]).content.conflicts == [
        ("sql", "older")]
    assert resolve(older, [SQL], others=[Publication("front", T2, models=(("sql", True),))]).content.conflicts == []
    # A content-routed name counts as published too.
    content = ModelRoute.model_validate(route_body(content=[auto(methods=["rules"], classifier=None,
                                                                 semantic=None)]))
    res = resolve(content, [SQL], others=[Publication("older", T1, content=(("auto", True),))]).content
    assert res.conflicts == [("auto", "older")]
    assert "'auto'" in res.conflict_message() and "ModelRoute older" in res.conflict_message()


def test_another_routes_content_model_is_not_a_destination_no_chains():
    route = ModelRoute.model_validate(route_body(content=[auto(methods=["rules"], classifier=None, semantic=None)]))
    res = resolve(route, [SQL], others=[Publication("b", T1, content=(("support", True),))])
    assert "content models do not chain" in res.content.targets["support"].missing
    assert [d.model for d in res.table.content_models[0].destinations] == ["sql"]
    assert res.table.external_models == []


def test_a_content_model_whose_default_nobody_serves_is_left_out_of_the_table():
    route = ModelRoute.model_validate(route_body(content=[auto(default="nowhere", methods=["rules"],
                                                               classifier=None, semantic=None)]))
    res = resolve(route, [SQL], others=[Publication("b", T1, models=(("support", True),))])
    assert res.table.content_models == [] and res.table.external_models == []
    assert ("default", "nowhere") in res.content.missing["auto"]


def test_a_selector_name_equal_to_a_content_model_name_is_left_out_with_public_name_conflict():
    routes = [{"name": "general", "backends": [{"base": True}]},
              {"selector": {"matchLabels": {}}, "prefix": "au"}]
    to = Adapter.model_validate({"kind": "Adapter", "metadata": {"name": "to", "namespace": "team"},
                                 "spec": {"baseModel": {"name": "org/base"}, "source": {"uri": "s3://b/to"},
                                          "version": "1", "rank": 8}})
    route = ModelRoute.model_validate(route_body(routes=routes, content=[
        {"name": "auto", "default": "general", "destinations": [{"model": "general"}]}]))
    res = resolve(route, [to])
    assert [m.name for m in res.table.models] == ["general"]
    assert [c.name for c in res.table.content_models] == ["auto"]
    assert [(c.name, c.kept) for c in res.conflicts] == [("auto", "contentRouting[0] (auto)")]


def test_without_content_routing_the_table_has_no_content_or_external_models():
    route = ModelRoute.model_validate(route_body())
    res = resolve(route, [SQL], others=[Publication("b", T1, models=(("support", True),))])
    assert res.table.content_models == [] and res.table.external_models == [] and res.content.missing == {}


def test_publication_reads_status_and_tolerates_foreign_shapes():
    body = {"metadata": {"name": "b", "creationTimestamp": T1},
            "status": {"models": [{"name": "x", "ready": True}, {"name": "y"}, "junk", {"name": 3}],
                       "contentModels": [{"name": "auto", "ready": False}]}}
    p = publication(body)
    assert p == Publication("b", T1, models=(("x", True), ("y", False)), content=(("auto", False),))
    assert publication({"metadata": {"name": "c"}, "status": "bad"}) == Publication("c", "")
    assert p.names() == ["x", "y", "auto"]


def test_referenced_names_and_publication_changes():
    assert referenced_names(route_body(content=[auto()])) == {"sql", "support", "general", "router-clf", "embed"}
    assert referenced_names(route_body()) == set()
    assert referenced_names({"spec": {"contentRouting": ["junk", {"destinations": "x", "classifier": 1}]}}) == set()
    a = Publication("b", T1, models=(("x", True), ("y", False)), content=(("auto", False),))
    assert publication_changes(a, a) == (set(), set())
    assert publication_changes(a, Publication("b", T1, models=(("x", False), ("y", False)),
                                              content=(("auto", True),))) == ({"x"}, set())
    assert publication_changes(a, Publication("b", T1, models=(("x", True),))) == ({"y", "auto"}, {"y", "auto"})
    assert publication_changes(None, a) == ({"x", "y", "auto"}, {"x", "y", "auto"})


def test_resolve_content_ignores_its_own_publication_among_the_others():
    route = ModelRoute.model_validate(route_body(content=[auto(methods=["rules"], classifier=None, semantic=None)]))
    me = Publication("front", T2, models=(("general", True), ("sql", True)), content=(("auto", True),))
    res = resolve_content(route, ["general", "sql"], [me])
    assert res.conflicts == [] and res.targets["general"].local


def test_the_worked_example_of_docs_orchestration_parses_and_every_name_resolves():
    """docs/orchestration.md: each `assistant` variant parses (schema, CEL and the content-routing rules) and every
    name its content model sends requests to is served (by itself, or by the `embeddings` route: its own block
    needs spec.engine.task, another part of issue 15, so it is stood in for by its Publication)."""
    import re

    import yaml

    from loraplane.api import parse
    from loraplane.api.modelroute import ModelRouteStatus
    from support.paths import ROOT

    text = (ROOT / "docs" / "orchestration.md").read_text()
    docs = [d for block in re.findall(r"```yaml\n(.*?)```", text, re.S) for d in yaml.safe_load_all(block) if d]
    adapters = [parse(d) for d in docs if d.get("kind") == "Adapter"]
    routes = [parse(d) for d in docs if d.get("kind") == "ModelRoute" and d["metadata"]["name"] == "assistant"]
    assert len(adapters) == 2 and len(routes) == 3
    classifier = Adapter.model_validate({**adapters[0].model_dump(by_alias=True, exclude_none=True),
                                         "metadata": {"name": "router-classifier", "namespace": "team"}})
    embeddings = Publication("embeddings", T1, models=(("embed", True),), task="embed")
    for r in routes:
        res = resolve(r, [*adapters, classifier], others=[embeddings])
        assert res.content.missing == {} and res.content.conflicts == [] and res.conflicts == []
        assert [m.name for m in res.table.content_models] == ["auto"]
    assert [e.name for e in resolve(routes[2], adapters, others=[embeddings]).table.external_models] == ["embed"]
    # With the real `embeddings` route (spec.engine.task embed), `loraplane validate` has nothing to say about
    # the semantic variant: every name resolves and each is asked for what its route serves.
    from loraplane.builders import route_warnings

    [embed_route] = [parse(d) for d in docs if d.get("kind") == "ModelRoute" and d["metadata"]["name"] == "embeddings"]
    assert route_warnings([*adapters, embed_route, routes[2]]) == []
    status = next(d["status"] for d in docs if "status" in d and "kind" not in d)
    assert ModelRouteStatus.model_validate(status).content_models[0].destinations[0].route == "assistant"


def test_render_and_validate_resolve_content_routing_against_the_routes_among_the_files():
    from loraplane.builders import render, route_warnings

    front = ModelRoute.model_validate(route_body(content=[auto(methods=["rules"], classifier=None, semantic=None)]))
    other = ModelRoute.model_validate(route_body(name="helpdesk", routes=[
        {"name": "support", "backends": [{"base": True}]}]))
    cm = next(m for m in render([front, other, SQL]) if m["kind"] == "ConfigMap"
              and m["metadata"]["name"] == "front-serving")
    table = type(resolve(front, []).table).model_validate_json(next(iter(cm["data"].values())))
    assert [(e.name, e.route) for e in table.external_models] == [("support", "helpdesk")]
    assert route_warnings([front, other, SQL]) == []
    [warning] = route_warnings([front, SQL])
    assert warning.startswith("ModelRoute team/front: spec.contentRouting names what no ModelRoute among these files")
    assert "destinations[1].model 'support'" in warning


def test_with_others_redoes_only_the_content_part_and_keeps_the_table_when_it_is_unchanged():
    from loraplane.builders.resolution import with_others

    route = ModelRoute.model_validate(route_body(content=[auto(methods=["rules"], classifier=None, semantic=None)]))
    base = resolve(route, [SQL])
    others = [Publication("b", T1, models=(("support", True),))]
    full = resolve(route, [SQL], others=others)
    redone = with_others(base, route, others)
    assert redone.table == full.table and redone.table.to_json() == full.table.to_json()
    assert redone.content.targets == full.content.targets and redone.selected == base.selected
    # Nothing of the content part changes: the very same table object (its JSON is not rebuilt).
    plain = ModelRoute.model_validate(route_body())
    plain_base = resolve(plain, [SQL])
    conflicted = with_others(plain_base, plain, [Publication("b", T1, models=(("sql", True),))])
    assert conflicted.table is plain_base.table and conflicted.content.conflicts == [("sql", "b")]
    # Over the byte budget with the external models: None (resolve with others leaves adapters out instead).
    assert with_others(base, route, others, max_bytes=len(base.table.to_json())) is None


def test_the_wire_invariant_holds_for_any_mix_of_local_external_missing_and_chained_names():
    """Seeded random specs and namespaces: resolution never raises, every name a wire content model references is
    in the table (models or external_models), each external model is owned by the oldest route publishing it, and a
    content model is in the table exactly when its default resolves."""
    import random

    rnd = random.Random(15)
    # The first two are route_body's own (generate) models: never its embedding model (refused by the API).
    pool = ["general", "sql", "support", "clf", "embed", "x1", "x2", "other-auto"]
    for _ in range(150):
        dests = [{"model": m, "label": f"l{i}", "examples": ["e"]} for i, m in enumerate(rnd.sample(pool, 3))]
        content = [{"name": "auto", "default": rnd.choice(pool), "methods": ["rules", "classifier", "semantic"],
                    "classifier": {"model": rnd.choice(pool)}, "semantic": {"embeddingModel": rnd.choice(pool[2:])},
                    "destinations": dests}]
        route = ModelRoute.model_validate(route_body(content=content))
        others = []
        for i in range(rnd.randint(0, 3)):
            names = rnd.sample(pool, 2)
            others.append(Publication(f"r{i}", rnd.choice([T1, T3]), models=((names[0], rnd.random() < .5),),
                                      content=((names[1], True),) if rnd.random() < .3 else (),
                                      task=rnd.choice(["generate", "embed"])))
        res = resolve(route, [SQL], others=others)
        table = res.table
        known = {m.name for m in table.models} | {e.name for e in table.external_models}
        for cm in table.content_models:
            refs = {cm.default, *(d.model for d in cm.destinations)}
            refs |= {cm.classifier.model} if cm.classifier else set()
            refs |= {cm.semantic.embedding_model} if cm.semantic else set()
            assert refs <= known
            assert (cm.classifier is not None) == ("classifier" in cm.methods)
            assert (cm.semantic is not None) == ("semantic" in cm.methods)
        for e in table.external_models:
            publishers = sorted((p.created, p.route) for p in others if e.name in dict(p.models)
                                or e.name in dict(p.content))
            assert e.route == publishers[0][1]
        assert bool(table.content_models) == (res.content.target("default", content[0]["default"])
                                              .missing is None)


def test_a_stored_route_name_the_api_refuses_publishes_nothing_so_no_url_names_another_host():
    """The API server stores any DNS subdomain as a name (`evil.victim`): `<name>-router.<ns>.svc` would then
    name a host other than a route's router Service. Such a route (the operator refuses its spec) publishes no
    name, nor do status entries outside the public-name grammar count, as in the gateway."""
    status = {"models": [{"name": "support", "ready": True}]}
    for name in ("evil.victim", "x" * 51, "Upper", ""):
        assert publication({"metadata": {"name": name, "creationTimestamp": T1}, "status": status}).names() == []
    odd = publication({"metadata": {"name": "b", "creationTimestamp": T1},
                       "status": {"models": [{"name": "a b"}, {"name": "x\r\nHost: y"}, {"name": "-x"},
                                             {"name": "n" * 201}, {"name": "ok"}]}})
    assert odd.names() == ["ok"]
    route = ModelRoute.model_validate(route_body(content=[auto(methods=["rules"], classifier=None, semantic=None)]))
    others = [publication({"metadata": {"name": "evil.victim", "creationTimestamp": T1}, "status": status})]
    res = resolve(route, [SQL], others=others)
    assert res.table.external_models == [] and res.content.targets["support"].missing


def test_a_typo_in_a_referenced_name_suggests_the_served_name_closest_to_it():
    from loraplane.builders import route_warnings

    front = ModelRoute.model_validate(route_body(content=[auto(
        default="generl", methods=["rules"], classifier=None, semantic=None,
        destinations=[{"model": "sqll", "rules": {"keywords": ["x"]}}, {"model": "helpdesk-bot", "rules": {"keywords": ["y"]}}])]))
    other = ModelRoute.model_validate(route_body(name="helpdesk", routes=[
        {"name": "helpdesk-bots", "backends": [{"base": True}]}]))
    [warning] = route_warnings([front, other, SQL])
    assert "destinations[0].model 'sqll' (no ModelRoute of the namespace publishes it; did you mean 'sql'?)" in warning
    assert "default 'generl' (no ModelRoute of the namespace publishes it; did you mean 'general'?)" in warning
    assert "'helpdesk-bot' (no ModelRoute of the namespace publishes it; did you mean 'helpdesk-bots'?)" in warning
    # Nothing close: no guess. The operator's ContentTargetNotFound message is the same text.
    far = resolve_content(ModelRoute.model_validate(route_body(content=[auto(default="zzz")])), ["general"], [])
    assert far.targets["zzz"].missing == "no ModelRoute of the namespace publishes it"


def test_validate_warns_when_another_routes_model_cannot_answer_what_content_routing_asks_of_it():
    from loraplane.builders import route_warnings

    embeddings = ModelRoute.model_validate(route_body(name="embeddings", routes=[
        {"name": "embed", "backends": [{"base": True}]}]))
    embeddings.spec.engine.task = "embed"
    chat = ModelRoute.model_validate(route_body(name="chatty", routes=[{"name": "chat", "backends": [{"base": True}]}]))
    wrong = ModelRoute.model_validate(route_body(content=[auto(
        default="embed", methods=["semantic"], classifier=None, semantic={"embeddingModel": "chat"},
        destinations=[{"model": "sql", "examples": ["count rows"]}])]))
    warnings = route_warnings([wrong, embeddings, chat, SQL])
    assert any("semantic.embeddingModel 'chat' (served by ModelRoute chatty, a generation model" in w
               and "spec.engine.task embed" in w for w in warnings), warnings
    assert any("default 'embed' (served by ModelRoute embeddings, an embedding model" in w
               and "spec.engine.task generate" in w for w in warnings), warnings
    # A wrong task is a mistake whatever the cluster holds: the warning does not say another route may publish
    # it (it does, among the files); with a name the files lack too, it does.
    assert not any("another in the cluster may publish" in w for w in warnings), warnings
    typo = ModelRoute.model_validate(route_body(content=[auto(
        default="embed", methods=["semantic"], classifier=None, semantic={"embeddingModel": "embedd"},
        destinations=[{"model": "sql", "examples": ["count rows"]}])]))
    assert any("another in the cluster may publish what they lack" in w
               for w in route_warnings([typo, embeddings, SQL])), route_warnings([typo, embeddings, SQL])
    right = ModelRoute.model_validate(route_body(content=[auto(
        default="general", methods=["semantic"], classifier=None, semantic={"embeddingModel": "embed"},
        destinations=[{"model": "sql", "examples": ["count rows"]}])]))
    assert route_warnings([right, embeddings, SQL]) == []


def test_validate_warns_about_a_destination_no_listed_method_can_choose():
    from loraplane.builders import route_warnings

    front = ModelRoute.model_validate(route_body(content=[auto(
        methods=["rules", "classifier"], semantic=None, classifier={"model": "general"},
        destinations=[{"model": "sql", "label": "sql", "rules": {"keywords": ["x"]}}, {"model": "general"},
                      {"model": "sql", "examples": ["only for semantic"]}])]))
    warnings = route_warnings([front, SQL])
    assert warnings == ["ModelRoute team/front: contentRouting 'auto': destinations[2] 'sql' can never be chosen by "
                        "methods ['rules', 'classifier']: give it `rules` or `label`"], warnings


def test_another_routes_model_whose_engine_task_cannot_answer_the_role_is_wrong_task_and_left_out():
    """The operator knows every route's spec.engine.task (Publication.task): an embedding model on a generate
    route, or a classifier or destination on an embed route, would fail on every request, so it is treated as
    missing with ContentTargetWrongTask (the method is taken out, the destination never chosen), never sent to."""
    from loraplane.api.reasons import Reason

    others = [Publication("chatty", T1, models=(("chat", True), ("router-clf", True), ("support", True))),
              Publication("embeddings", T1, models=(("embed", True), ("emb-clf", True)), task="embed")]
    wrong = ModelRoute.model_validate(route_body(content=[auto(
        semantic={"embeddingModel": "chat"}, classifier={"model": "emb-clf"})]))
    res = resolve(wrong, [SQL], others=others)
    chat, emb_clf = (res.content.target("semantic.embeddingModel", "chat"),
                     res.content.target("classifier.model", "emb-clf"))
    assert chat.reason == Reason.ContentTargetWrongTask and "no /v1/embeddings" in chat.missing
    assert emb_clf.reason == Reason.ContentTargetWrongTask
    assert "cannot answer the completion classifier.model asks for" in emb_clf.missing
    assert res.content.missing_reason == Reason.ContentTargetWrongTask
    [cm] = res.table.content_models
    assert cm.methods == ["rules"] and cm.classifier is None and cm.semantic is None
    assert [e.name for e in res.table.external_models] == ["support"]
    # The right tasks: both methods stay, both names are external models.
    right = ModelRoute.model_validate(route_body(content=[auto(
        semantic={"embeddingModel": "embed"}, classifier={"model": "router-clf"})]))
    res = resolve(right, [SQL], others=others)
    assert res.content.missing == {} and res.content.missing_reason is None
    assert res.table.content_models[0].methods == ["rules", "classifier", "semantic"]
    # A default on an embed route: the content model cannot serve at all (left out of the table).
    on_embed = ModelRoute.model_validate(route_body(content=[auto(default="embed")]))
    res = resolve(on_embed, [SQL], others=others)
    assert res.table.content_models == [] and res.content.target("default", "embed").reason == \
        Reason.ContentTargetWrongTask


def test_wrong_task_is_judged_per_role_not_per_name():
    """One name can be right in one role and wrong in another: an embed route's model is a right embeddingModel
    and a wrong default or destination (a generate route's model the reverse). Only the wrong reference is
    missing (ContentTargetWrongTask, its message naming its own field); the right one keeps its method or its
    destination, in the table, in the status and in `loraplane validate`'s warning, across content models too."""
    from loraplane.api.reasons import Reason
    from loraplane.controllers.modelroute import content_status

    others = [Publication("chatty", T1, models=(("chat", True),)),
              Publication("embeddings", T1, models=(("embed", True),), task="embed")]
    # Destination `embed` (wrong) next to embeddingModel `embed` (right); embeddingModel `chat` (wrong) of a
    # second content model next to destination `chat` (right) of the first.
    body = route_body(content=[
        auto(methods=["rules", "semantic"], classifier=None, destinations=[
            {"model": "embed", "rules": {"keywords": ["x"]}},
            {"model": "chat", "rules": {"keywords": ["y"]}, "examples": ["y"]}]),
        auto(name="auto2", methods=["semantic"], classifier=None, semantic={"embeddingModel": "chat"},
             destinations=[{"model": "sql", "examples": ["z"]}])])
    res = resolve(ModelRoute.model_validate(body), [SQL], others=others)
    assert res.content.missing == {"auto": [("destinations[0].model", "embed")],
                                   "auto2": [("semantic.embeddingModel", "chat")]}
    message = res.content.missing_message()
    assert "destinations[0].model 'embed' (served by ModelRoute embeddings, an embedding model" in message
    assert "semantic.embeddingModel 'chat' (served by ModelRoute chatty, a generation model" in message
    assert "semantic.embeddingModel 'embed'" not in message and "model 'chat'" not in message, message
    first, second = res.table.content_models
    assert first.methods == ["rules", "semantic"] and first.semantic.embedding_model == "embed"
    assert [d.model for d in first.destinations] == ["chat"]
    assert second.methods == [] and second.semantic is None
    assert [e.name for e in res.table.external_models] == ["chat", "embed"]
    status = {c.name: c for c in content_status(ModelRoute.model_validate(body), res, [], others)}
    assert status["auto"].embedding_model.ready and status["auto"].embedding_model.reason is None
    assert [(d.model, d.reason) for d in status["auto"].destinations] == [
        ("embed", Reason.ContentTargetWrongTask), ("chat", None), ("general", Reason.ModelsNotReady)]
    assert status["auto2"].embedding_model.reason == Reason.ContentTargetWrongTask


def test_a_publication_carries_the_engine_task_and_a_task_change_concerns_every_name():
    from loraplane.builders.orchestration import publication_changes

    status = {"models": [{"name": "embed", "ready": True}]}
    body = {"metadata": {"name": "embeddings", "creationTimestamp": T1}, "status": status,
            "spec": {"engine": {"task": "embed"}}}
    assert publication(body).task == "embed"
    assert publication({**body, "spec": {}}).task == "generate"
    assert publication({**body, "spec": {"engine": {"task": ["embed"]}}}).task == "generate"   # hostile shape
    before, after = publication({**body, "spec": {}}), publication(body)
    assert before.naming != after.naming
    assert publication_changes(before, after) == ({"embed"}, set())
