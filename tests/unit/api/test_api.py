"""The API models: defaults, conditions, CEL rules (offline with cel-python), generated CRDs."""

from __future__ import annotations

import copy

import pytest
from pydantic import ValidationError

from loraplane.api import KINDS, Adapter, FineTuneJob, ModelRoute, parse
from loraplane.api import cel
from loraplane.codegen import crds as crdgen
from loraplane.api.common import Condition, set_condition
from loraplane.api.conditions import ConditionState, ConditionStatus, ConditionType
from loraplane.api.reasons import Reason
from loraplane.cli import main as cli_main

from support import structural
from support.crds import validate_object, write_crds
from support.examples import EXAMPLES, ROOT, invalid_examples, load_docs, valid_examples


def crd_schema(kind: str) -> dict:
    cls = KINDS[kind]
    return crdgen.crd_for(cls)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


# --- conditions -------------------------------------------------------------------------------------------

def test_set_condition_keeps_transition_time_unless_status_flips():
    ready, compatible = ConditionType.Ready, ConditionType.Compatible
    conds = set_condition([], ready, ConditionState(ConditionStatus.FALSE, Reason.Pending, "waiting"),
                          observed_generation=1, now="2026-01-01T00:00:00Z")
    conds = set_condition(conds, ready, ConditionState(ConditionStatus.FALSE, Reason.Running, "still"),
                          observed_generation=2, now="2026-01-02T00:00:00Z")
    (c,) = conds
    assert c.last_transition_time == "2026-01-01T00:00:00Z"  # same status: time kept, reason/message updated
    assert (c.reason, c.message, c.observed_generation) == ("Running", "still", 2)
    conds = set_condition(conds, ready, ConditionState(ConditionStatus.TRUE, Reason.Ready),
                          observed_generation=2, now="2026-01-03T00:00:00Z")
    assert conds[0].last_transition_time == "2026-01-03T00:00:00Z" and conds[0].status == "True"
    conds = set_condition(conds, compatible, ConditionState(ConditionStatus.UNKNOWN, Reason.NoRoute),
                          now="2026-01-04T00:00:00Z")
    assert [c.type for c in conds] == ["Ready", "Compatible"]


def test_condition_wire_shape():
    c = Condition(type="Ready", status="True", reason="Loaded", message="ok", observed_generation=3,
                  last_transition_time="2026-01-01T00:00:00Z")
    assert c.wire() == {"type": "Ready", "status": "True", "reason": "Loaded", "message": "ok",
                        "observedGeneration": 3, "lastTransitionTime": "2026-01-01T00:00:00Z"}


def test_status_helpers_on_models():
    adapter = parse(valid_examples()[0][1])
    assert isinstance(adapter, Adapter)
    from loraplane.api import AdapterStatus

    st = AdapterStatus()
    st.set_condition(ConditionType.Compatible,
                     ConditionState(ConditionStatus.FALSE, Reason.RankTooLarge, "rank 32 > maxLoraRank 16"), generation=4)
    assert st.condition("Compatible").reason == "RankTooLarge"
    assert st.wire()["conditions"][0]["observedGeneration"] == 4


# --- examples ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,doc", valid_examples(), ids=[v[0] for v in valid_examples()])
def test_valid_examples_parse_and_round_trip(name, doc):
    obj = parse(doc)
    # What a user wrote comes back unchanged (no defaults injected, nothing dropped).
    wire = obj.model_dump(by_alias=True, exclude_unset=True, mode="json")
    assert wire["spec"] == doc["spec"]
    assert validate_object(crd_schema(doc["kind"]), doc) == []


@pytest.mark.parametrize("name,doc,by,expect", invalid_examples(), ids=[v[0] for v in invalid_examples()])
def test_invalid_examples_rejected_naming_the_field(name, doc, by, expect):
    with pytest.raises(ValidationError) as err:
        parse(doc)
    locs = [".".join(str(p) for p in e["loc"]) for e in err.value.errors()]
    text = str(err.value)
    if by == "schema":
        # expect-error names the field, e.g. spec.routes[0].backends[0].weight
        want = expect.replace("[", ".").replace("]", "")
        assert any(loc == want or loc.startswith(want + ".") for loc in locs), (locs, text)
    else:
        assert expect in text
        # The same rule, evaluated from the generated CRD the way the API server would, fails too.
        assert any(expect in e for e in validate_object(crd_schema(doc["kind"]), doc))


def test_error_messages_name_field_and_fix():
    doc = load_docs(EXAMPLES / "finetunejob.yaml")[0]
    bad = copy.deepcopy(doc)
    bad["spec"]["method"]["rank"] = 8  # typo for `r`
    with pytest.raises(ValidationError) as err:
        parse(bad)
    assert "spec.method.rank" in [".".join(map(str, e["loc"])) for e in err.value.errors()]
    bad = copy.deepcopy(doc)
    bad["apiVersion"] = "loraplane.io/v1"
    with pytest.raises(ValidationError, match="must be loraplane.io/v1alpha1") as err:
        parse(bad)
    assert [e["loc"] for e in err.value.errors()] == [("apiVersion",)]
    with pytest.raises(ValueError, match="not a loraplane.io kind"):
        parse({"kind": "Deployment"})


def test_modelroute_name_must_fit_child_names():
    doc = load_docs(EXAMPLES / "modelroute.yaml")[0]
    doc["metadata"]["name"] = "qwen.small"
    with pytest.raises(ValidationError, match="must be a DNS-1035 label"):
        parse(doc)
    doc["metadata"]["name"] = "7b-chat"  # Service names (NAME-router) must start with a letter
    with pytest.raises(ValidationError, match="must be a DNS-1035 label"):
        parse(doc)


def test_more_cel_rules():
    route = load_docs(EXAMPLES / "modelroute.yaml")[0]
    dup = copy.deepcopy(route)
    dup["spec"]["routes"].append({"name": "support", "backends": [{"base": True}]})
    with pytest.raises(ValidationError, match="route names must be unique"):
        parse(dup)
    both = copy.deepcopy(route)
    both["spec"]["replicas"] = 3
    with pytest.raises(ValidationError, match="set replicas or autoscaling, not both"):
        parse(both)
    minmax = copy.deepcopy(route)
    minmax["spec"]["autoscaling"].update(minReplicas=5, maxReplicas=2)
    with pytest.raises(ValidationError, match="minReplicas must be <= "):
        parse(minmax)
    s3 = copy.deepcopy(route)
    s3["spec"]["baseModel"] = {"uri": "s3://models/llama"}
    assert parse(s3).spec.base_model.uri == "s3://models/llama"  # fetched by the engine pod's init container
    web = copy.deepcopy(route)
    web["spec"]["baseModel"] = {"uri": "https://models.example.com/llama"}
    with pytest.raises(ValidationError, match="an https:// base model must be a .tar.gz, .tgz or .tar archive"):
        parse(web)
    web["spec"]["baseModel"] = {"uri": "https://models.example.com/llama.tar.gz", "sha256": "a" * 64}
    assert validate_object(crd_schema("ModelRoute"), web) == []
    hub_pin = copy.deepcopy(route)
    hub_pin["spec"]["baseModel"] = {"name": "org/m", "sha256": "a" * 64}
    with pytest.raises(ValidationError, match="baseModel.sha256 pins a downloaded model"):
        parse(hub_pin)
    pvc = copy.deepcopy(route)
    pvc["spec"]["baseModel"] = {"uri": "pvc://models/llama"}
    assert parse(pvc).spec.base_model.uri == "pvc://models/llama"
    single = copy.deepcopy(route)
    single["spec"]["routes"] = [{"name": "x", "backends": [{"adapter": "a"}]}]  # weight defaults to 100
    assert parse(single).spec.routes[0].backends[0].weight == 100
    assert validate_object(crd_schema("ModelRoute"), single) == []


def test_cel_transition_rules_make_fields_immutable():
    schema = crd_schema("FineTuneJob")
    old = load_docs(EXAMPLES / "finetunejob.yaml")[0]
    new = copy.deepcopy(old)
    new["spec"]["suspend"] = True  # mutable
    assert validate_object(schema, new, old) == []
    new["spec"]["method"]["r"] = 32
    assert validate_object(schema, new, old) == ["spec.method: spec.method is immutable; create a new object "
                                                     "instead"]
    # Without an old object (a create), transition rules do not apply.
    assert validate_object(schema, new) == []
    adapter_old = load_docs(EXAMPLES / "adapter.yaml")[0]
    adapter_new = copy.deepcopy(adapter_old)
    adapter_new["spec"]["version"] = "4"  # a new version: allowed
    assert validate_object(crd_schema("Adapter"), adapter_new, adapter_old) == []
    adapter_new["spec"]["baseModel"]["name"] = "other/model"
    assert validate_object(crd_schema("Adapter"), adapter_new, adapter_old)[0].startswith("spec.baseModel:")
    route_old = load_docs(EXAMPLES / "modelroute.yaml")[0]
    route_new = copy.deepcopy(route_old)
    route_new["spec"]["routes"][0]["backends"][0]["weight"] = 50
    route_new["spec"]["routes"][0]["backends"][1]["weight"] = 50  # canary shift: allowed
    assert validate_object(crd_schema("ModelRoute"), route_new, route_old) == []


def test_kubernetes_list_functions():
    assert cel.evaluate("self.map(x, x).sum() == 6", [1, 2, 3])
    assert cel.evaluate("self.min() == 1 && self.max() == 3 && self.isSorted()", [1, 2, 3])
    assert not cel.evaluate("self.isSorted()", [3, 1])


# --- generated CRDs ---------------------------------------------------------------------------------------

def test_crds_are_not_stale():
    """crds/ must be exactly what `loraplane crds` generates from the models."""
    generated = crdgen.all_crds()
    on_disk = {p.name for p in (ROOT / "crds").glob("*.yaml")}
    assert on_disk == set(generated), "crds/ has files the models do not generate (or misses some)"
    for name, crd in generated.items():
        assert (ROOT / "crds" / name).read_text() == crdgen.render(crd), \
            f"crds/{name} is stale: run `loraplane crds`"
    assert cli_main(["crds", "--check"]) == 0


def test_crds_check_detects_stale(tmp_path):
    ref = tmp_path / "api-reference.md"
    args = ["--out", str(tmp_path), "--reference", str(ref), "--chart", str(tmp_path / "chart")]  # never the repo
    assert cli_main(["crds", "--check", *args]) == 1  # nothing there yet
    assert cli_main(["crds", *args]) == 0
    assert cli_main(["crds", "--check", *args]) == 0
    victim = tmp_path / "loraplane.io_adapters.yaml"
    victim.write_text(victim.read_text().replace("Rank", "R4nk"))
    assert cli_main(["crds", "--check", *args]) == 1
    write_crds(tmp_path)
    ref.write_text(ref.read_text().replace("maxLoraRank", "maxRank"))
    assert cli_main(["crds", "--check", *args]) == 1


def test_api_reference_documents_every_field():
    from loraplane.codegen import reference

    text = reference.render()
    assert (ROOT / "docs" / "api-reference.md").read_text() == text, "run `loraplane crds`"
    for field in ("spec.engine.maxLoraRank", "spec.routes[].backends[].weight", "status.loadedOn[].servedName",
                  "status.progress.tokensPerSecond", "spec.method.targetModules"):
        assert f"`{field}`" in text
    assert "rule: the weights of a route's backends must sum to 100" in text


@pytest.mark.parametrize("kind", list(KINDS))
def test_generated_schemas_are_structural(kind):
    crd = crdgen.crd_for(KINDS[kind])
    assert structural.check(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]) == []
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert crd["spec"]["names"]["shortNames"] and crd["spec"]["names"]["categories"] == ["loraplane"]
    assert {c["name"] for c in version["additionalPrinterColumns"]} >= {"Age"}


@pytest.mark.parametrize("snippet,problem", [
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}}, "'$ref'"),
    ({"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}, "'anyOf'"),
    ({"type": "string", "const": "x"}, "'const'"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "'uniqueItems'"),
    ({"type": "integer", "exclusiveMinimum": 0}, "exclusiveMinimum must be a boolean"),
    ({"type": "string", "title": "Name"}, "'title'"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": False},
     "mutually exclusive"),
    ({"type": "object", "additionalProperties": False}, "additionalProperties: false"),
    ({"type": "object", "properties": {"a": {}}}, "every node needs a type"),
    ({"type": "object", "properties": {"a": {"type": "null"}}}, "type 'null'"),
    ({"type": "array"}, "single items schema"),
    ({"type": "object", "required": ["b"], "properties": {"a": {"type": "string"}}}, "required field 'b'"),
    ({"x-kubernetes-int-or-string": True, "type": "string"}, "must not set a type"),
    ({"type": "string", "default": "x"}, "'default'"),
    ({"type": "object", "oneOf": [{"type": "object"}]}, "'oneOf'"),
    ({"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["k"],
      "items": {"type": "object", "properties": {"k": {"type": "string"}}}}, "list-map key 'k'"),
])
def test_structural_checker_rejects(snippet, problem):
    problems = structural.check(snippet)
    assert any(problem in p for p in problems), problems


def test_structural_checker_accepts_kubernetes_forms():
    ok = {"type": "object", "properties": {
        "q": {"x-kubernetes-int-or-string": True},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "n": {"type": "number", "minimum": 0, "exclusiveMinimum": True},
        "conds": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"],
                  "items": {"type": "object", "required": ["type"], "properties": {"type": {"type": "string"}}}},
    }, "x-kubernetes-validations": [{"rule": "true", "message": "m"}]}
    assert structural.check(ok) == []


def test_crdgen_rejects_unions():
    from typing import Union

    from pydantic import BaseModel

    class Bad(BaseModel):
        x: Union[int, list[str]]

    with pytest.raises(crdgen.SchemaError, match="not structural"):
        crdgen.model_schema(Bad)


def test_defaults_are_documented_not_injected():
    spec = crd_schema("ModelRoute")["properties"]["spec"]
    max_rank = spec["properties"]["engine"]["properties"]["maxLoraRank"]
    assert "default" not in max_rank and "Default: 16." in max_rank["description"]


def test_served_name_changes_with_version_and_source():
    a = parse(load_docs(EXAMPLES / "adapter.yaml")[0])
    assert a.served_name() == "sql-helper--3"
    b = a.model_copy(update={"spec": a.spec.model_copy(update={"version": None})})
    c_src = b.spec.source.model_copy(update={"uri": "hf://acme/other@v4"})
    c = b.model_copy(update={"spec": b.spec.model_copy(update={"source": c_src})})
    assert b.served_name() != c.served_name() and b.served_name().startswith("sql-helper--")


def test_validate_cli(capsys):
    assert cli_main(["validate", str(EXAMPLES / "modelroute.yaml")]) == 0
    assert cli_main(["validate", str(EXAMPLES / "invalid" / "finetunejob-rank-too-large.yaml")]) == 1
    out = capsys.readouterr().out
    assert "spec.method.r: Input should be less than or equal to 512" in out


def test_kinds_have_distinct_names():
    assert {FineTuneJob.PLURAL, Adapter.PLURAL, ModelRoute.PLURAL} == {"finetunejobs", "adapters", "modelroutes"}


def test_autoscaling_metric_and_archive_suffix_cannot_inject(tmp_path):
    """Issue 12, item 7: autoscaling.metric was spliced unescaped into KEDA's PromQL query; an https base model
    ending in "#.tar.gz" passed the archive check. Both are refused at admission (schema pattern and CEL)."""
    from loraplane.builders import modelroute as route_builders

    route = load_docs(EXAMPLES / "modelroute.yaml")[0]
    for metric in ('up or vector(1000)', 'x{a="b"}', "vllm:num_requests_waiting) or (1", "9lives", ""):
        bad = copy.deepcopy(route)
        bad["spec"]["autoscaling"]["metric"] = metric
        with pytest.raises(ValidationError, match="metric"):
            parse(bad)
        assert validate_object(crd_schema("ModelRoute"), bad) != [], metric
    keda = copy.deepcopy(route)
    keda["spec"]["autoscaling"].update(backend="keda", metric="vllm:num_requests_waiting")
    keda["metadata"]["name"] = "chat"
    query = route_builders.keda_scaled_object(parse(keda))["spec"]["triggers"][0]["metadata"]["query"]
    assert query.startswith("sum(vllm:num_requests_waiting{namespace=") and 'pod=~"(chat-engine-[' in query
    assert route_builders.promql_string('a"b\\c') == '"a\\"b\\\\c"'
    for uri in ("https://models.example.com/llama#.tar.gz", "https://models.example.com/llama?x=.tar.gz"):
        web = copy.deepcopy(route)
        web["spec"]["baseModel"] = {"uri": uri}
        with pytest.raises(ValidationError, match="must be a .tar.gz"):
            parse(web)
    signed = copy.deepcopy(route)
    signed["spec"]["baseModel"] = {"uri": "https://b.s3.amazonaws.com/llama.tar.gz?X-Amz-Signature=abc"}
    assert parse(signed).spec.base_model.uri.endswith("abc")


def test_a_replica_report_annotation_always_fits_its_budget():
    """Issue 13 review p10: 120 failing adapters with long messages made a 275 KB annotation, over Kubernetes'
    256 KiB for all of a pod's annotations, so the report patch failed and every adapter's status went stale.
    The annotation is bounded: at 1,000 adapters with maximal messages every state and reason is kept; with
    maximal names too, entries are left out (counted in `omitted`) but it still fits and parses."""
    from loraplane.api.redaction import MAX_MESSAGE, redacted
    from loraplane.api.wire.serving import REPORT_MAX_BYTES, AdapterReport, ReplicaReport

    msg = redacted("GET https://evil.example/a.tar.gz answered HTTP 404 " + "x" * 8000, MAX_MESSAGE)
    assert len(msg) >= MAX_MESSAGE - 1

    def report(name_len):
        return ReplicaReport(replica="p", route="r", generation=1, engine_ready=True, updated_at="t", adapters={
            f"{'a' * name_len}-{i:04d}--v1": AdapterReport(
                state="Ready" if i % 2 else "Failed", reason="Loaded" if i % 2 else "FetchFailed", message=msg,
                since="2026-01-01T00:00:00Z", attempts=3, sha256="0" * 64) for i in range(1000)})

    full = report(8)
    text = full.to_annotation()
    assert len(text.encode()) <= REPORT_MAX_BYTES
    back = ReplicaReport.model_validate_json(text)
    assert back.omitted is None and back.adapters.keys() == full.adapters.keys()
    for name, entry in full.adapters.items():
        assert (back.adapters[name].state, back.adapters[name].reason) == (entry.state, entry.reason)
        if entry.state == "Ready":
            assert back.adapters[name].sha256 == entry.sha256   # the operator records digests from Ready ones
    huge = report(240)
    text = huge.to_annotation()
    back = ReplicaReport.model_validate_json(text)
    assert len(text.encode()) <= REPORT_MAX_BYTES and back.omitted and len(back.adapters) + back.omitted == 1000
    small = ReplicaReport(replica="p", route="r", generation=1, engine_ready=True, updated_at="t", adapters={
        "a--1": AdapterReport(state="Failed", reason="FetchFailed", message="m", since="t")})
    assert ReplicaReport.model_validate_json(small.to_annotation()) == small   # what fits is left whole


def test_shm_must_fit_in_the_engine_memory():
    """A new user's report: shmSize 8Gi next to memory 4Gi was accepted, though /dev/shm (memory-backed) counts
    against the replica's memory limit. Refused naming both fields, with the default shm (2Gi per worker) too;
    `loraplane validate` says the same."""
    route = load_docs(EXAMPLES / "modelroute.yaml")[0]
    for engine, expect in (({"shmSize": "8Gi", "memory": "4Gi"}, "shmSize must be less than memory (4Gi)"),
                           ({"shmSize": "4096Mi", "memory": "4Gi"}, "shmSize must be less than memory"),
                           ({"tensorParallelSize": 2, "gpus": 2, "memory": "4Gi"},
                            "shmSize (default: 2Gi per tensor-parallel worker, 4Gi) must be less than memory")):
        bad = copy.deepcopy(route)
        bad["spec"]["engine"] = {**bad["spec"]["engine"], **engine}
        with pytest.raises(ValidationError) as err:
            parse(bad)
        assert expect in str(err.value) and "spec.engine" in str(err.value), str(err.value)
    fine = copy.deepcopy(route)
    fine["spec"]["engine"] = {**fine["spec"]["engine"], "shmSize": "1Gi", "memory": "4Gi"}
    parse(fine)
    fine["spec"]["engine"].pop("memory")   # no memory limit: nothing to compare
    fine["spec"]["engine"]["shmSize"] = "64Gi"
    parse(fine)


def test_model_cache_size_limit_only_with_the_default_cache(tmp_path, capsys):
    """sizeLimit next to claimName or hostPath did nothing and was accepted: refused by the CRD's CEL rule and
    its Python mirror, naming both fields; alone (or with neither) it is fine."""
    import yaml

    route = load_docs(EXAMPLES / "modelroute.yaml")[0]
    for cache in ({"claimName": "models", "sizeLimit": "300Gi"}, {"hostPath": "/models", "sizeLimit": "300Gi"}):
        bad = copy.deepcopy(route)
        bad["spec"]["engine"]["modelCache"] = cache
        with pytest.raises(ValidationError, match="modelCache.sizeLimit bounds only the default emptyDir"):
            parse(bad)
        assert any("modelCache.claimName or modelCache.hostPath" in e
                   for e in validate_object(crd_schema("ModelRoute"), bad))
        path = tmp_path / "route.yaml"
        path.write_text(yaml.safe_dump(bad))
        assert cli_main(["validate", str(path)]) == 1
        assert "remove modelCache.sizeLimit" in capsys.readouterr().out
    for cache in ({"sizeLimit": "300Gi"}, {"claimName": "models"}):
        ok = copy.deepcopy(route)
        ok["spec"]["engine"]["modelCache"] = cache
        parse(ok)


@pytest.mark.parametrize("routes,refused", [
    ([], False),
    ([{"name": "embed", "backends": [{"base": True}]}], False),
    ([{"name": "sql", "backends": [{"adapter": "sql"}]}], True),
    ([{"name": "mix", "backends": [{"base": True, "weight": 50}, {"adapter": "sql", "weight": 50}]}], True),
    ([{"selector": {"matchLabels": {"team": "a"}}}], True),
])
def test_an_embedding_route_refuses_adapters_naming_the_field(routes, refused):
    """spec.engine.task embed runs vLLM's pooling runner without --enable-lora: a route that needs an adapter
    is refused by the CRD's rule (CEL, as the API server runs it) and by `parse` (its Python mirror) alike."""
    from loraplane.api import cel
    from loraplane.api.modelroute import ModelRouteSpec

    doc = {"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute", "metadata": {"name": "embedder"},
           "spec": {"baseModel": {"uri": "/models/e5"}, "engine": {"task": "embed"}, "routes": routes}}
    rule = next(r for r in ModelRouteSpec.cel_rules if "embed" in r.rule)
    assert cel.evaluate(rule.rule, doc["spec"]) is (not refused)
    assert rule.check(doc["spec"]) is (not refused)
    if refused:
        with pytest.raises(ValidationError, match="spec.engine.task embed serves an embedding model without "
                                                  "adapters"):
            parse(doc)
    else:
        assert parse(doc).spec.engine.task == "embed"
    generate = copy.deepcopy(doc)
    generate["spec"]["engine"]["task"] = "generate"
    assert parse(generate).spec.engine.task == "generate"
    del generate["spec"]["engine"]
    assert parse(generate).spec.engine.task == "generate" and rule.check(generate["spec"])
