"""Names at the seams (issue 13): served names, public model names and the names and labels of children.

Every schema-valid spec must yield children the API server accepts; what cannot be made valid is refused by
`parse` (so by `loraplane validate`, `render` and the operator's InvalidSpec) with the field named.
"""

from __future__ import annotations

import copy
import re

import kubernetes_validate
import pytest
from pydantic import ValidationError

from loraplane.api import FineTuneJob, ModelRoute, parse
from loraplane.api.adapter import adapter_of_served_name, served_name
from loraplane.builders import BuildSettings, render, resolve
from loraplane.builders.common import bounded_name, label_value, pvc_volume_name
from loraplane.builders.engine_pod import served_model_name
from loraplane.controllers.pods import reported_adapters

# Kubernetes' rules (k8s.io/apimachinery/pkg/util/validation), written out here independently of api.common.
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


def subdomain(n: int, seed: str = "a") -> str:
    """A DNS-1123 subdomain of exactly `n` characters with dots, starting with `seed`."""
    text = (seed + "b1-c.d9e" * 64)[:n]
    return text[:-1] + "z" if not text[-1].isalnum() else text


def label_problems(labels: dict, where: str) -> list[str]:
    out = []
    for k, v in (labels or {}).items():
        prefix, _, name = k.rpartition("/")
        if (prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix))) or len(name) > 63 \
                or not QUALIFIED_NAME.match(name):
            out.append(f"{where}: label key {k!r}")
        if len(v) > 63 or not LABEL_VALUE.match(v):
            out.append(f"{where}: label value {v!r} ({len(v)} characters)")
    return out


def name_problems(m: dict) -> list[str]:
    """What the API server would refuse in `m`'s names and labels (and its pod template's)."""
    kind, meta = m["kind"], m["metadata"]
    name = meta["name"]
    where = f"{kind}/{name}"
    out = []
    if kind == "Service":
        ok = len(name) <= 63 and DNS1035_LABEL.match(name)
    elif kind == "Job":  # its name becomes its pods' job-name label value
        ok = len(name) <= 63 and DNS1123_SUBDOMAIN.match(name)
    else:
        ok = len(name) <= 253 and DNS1123_SUBDOMAIN.match(name)
    if not ok:
        out.append(f"{where}: name ({len(name)} characters)")
    out += label_problems(meta.get("labels"), where)
    spec = m.get("spec") or {}
    out += label_problems(spec.get("selector") if kind == "Service" else (spec.get("selector") or {}).get(
        "matchLabels"), f"{where} selector")
    template = spec.get("template") or (spec.get("jobTemplate") or {}).get("template")
    if template:
        out += label_problems(template["metadata"].get("labels"), f"{where} pod")
        pod = template["spec"]
        if pod.get("subdomain") and not DNS1123_LABEL.match(pod["subdomain"]):
            out.append(f"{where}: pod subdomain {pod['subdomain']!r}")
        if kind == "Job" and spec.get("completionMode") == "Indexed" and not DNS1123_LABEL.match(f"{name}-0"):
            out.append(f"{where}: indexed pod hostname {name}-0")
        out += label_problems(pod.get("nodeSelector"), f"{where} nodeSelector")
        volumes = [v["name"] for v in pod.get("volumes", [])]
        out += [f"{where}: volume name {v!r}" for v in volumes if len(v) > 63 or not DNS1123_LABEL.match(v)]
        if len(set(volumes)) != len(volumes):
            out.append(f"{where}: duplicate volume names {volumes}")
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            env = [e["name"] for e in c.get("env", [])]
            if len(set(env)) != len(env):
                out.append(f"{where} container {c['name']}: duplicate env names {env}")
            out += [f"{where}: env name {e!r}" for e in env if not ENV_NAME.match(e)]
            out += [f"{where} container {c['name']}: mount of unknown volume {vm['name']!r}"
                    for vm in c.get("volumeMounts", []) if vm["name"] not in volumes]
    return out


LONG_CLAIM = subdomain(253, "p")          # a PVC name may have 253 characters, with dots
DOTTED_CLAIM = "my.claim"


def max_resources(ftj_name: str, route_name: str, adapter_name: str) -> list:
    """A FineTuneJob, a ModelRoute and two Adapters, every name and label at its API limit."""
    label_key = f"{subdomain(253, 'k')}/{'n' * 63}"
    ftj = parse({
        "apiVersion": "loraplane.io/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": ftj_name, "namespace": "ns"},
        "spec": {"baseModel": {"uri": f"pvc://{LONG_CLAIM}/model"},
                 "dataset": {"uri": f"pvc://{DOTTED_CLAIM}/d.jsonl", "validationUri": "pvc://my-claim/v.jsonl"},
                 "resources": {"nodes": 4, "gpuType": "G" * 63, "nodeSelector": {label_key: "v" * 63}},
                 "output": {"adapterName": adapter_name, "uri": f"pvc://{subdomain(253, 'o')}/out",
                            "adapterLabels": {label_key: "x" * 63}}}})
    adapters = [parse({
        "apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter", "metadata": {"name": name, "namespace": "ns",
                                                                              "labels": {"team": "t"}},
        "spec": {"baseModel": {"name": "org/base"}, "source": {"uri": uri}, "version": "v" * 63}})
        for name, uri in ((adapter_name, f"pvc://{LONG_CLAIM}/a"), ("b", f"pvc://{DOTTED_CLAIM}/b"))]
    route = parse({
        "apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute",
        "metadata": {"name": route_name, "namespace": "ns"},
        "spec": {"baseModel": {"name": "org/base"},
                 "engine": {"env": [{"name": "HF_HOME", "value": "/x"}], "nodeSelector": {label_key: "v" * 63}},
                 "routes": [{"name": "explicit", "backends": [{"adapter": adapter_name}]},
                            {"selector": {"matchLabels": {"team": "t"}}, "prefix": "p/"}]}})
    return [ftj, *adapters, route]


@pytest.mark.parametrize("ftj_name, route_name, adapter_name", [
    (subdomain(253), "r" * 50, subdomain(253, "s")),       # the longest names the API admits
    ("a" * 69, "r" + "-x" * 24 + "y", "a" * 63),          # issue 13: a 69-character FineTuneJob
    ("1.job", "r", "1"),                                   # shortest, a digit first, dots (not DNS-1035)
    (subdomain(64, "9"), "a1", subdomain(64, "z")),        # just past a label's 63
])
def test_every_child_of_a_maximal_spec_has_valid_names_and_labels(ftj_name, route_name, adapter_name):
    resources = max_resources(ftj_name, route_name, adapter_name)
    children = render(resources, BuildSettings())
    assert {m["kind"] for m in children} >= {"Job", "Service", "Deployment", "ConfigMap", "Role", "ServiceAccount"}
    problems = [p for m in children for p in name_problems(m)]
    assert problems == []
    for m in children:  # and the rest of each child against Kubernetes' own schema
        kubernetes_validate.validate(m, "1.30.0", strict=True)
    # The produced Adapter carries its job's label too.
    from loraplane.builders.finetunejob import produced_adapter
    made = produced_adapter(resources[0], "pvc://x/y", None, None)
    assert label_problems(made["metadata"]["labels"], "produced Adapter") == []
    # Served names stay unique (and tell their Adapter) whatever the lengths.
    table = resolve(resources[-1], resources[1:3]).table
    served = [a.served_name for a in table.adapters]
    assert len(set(served)) == len(served) == 2
    assert {adapter_of_served_name(s) for s in served} == {adapter_name, "b"}


def test_bounded_names_are_stable_distinct_and_unchanged_when_valid():
    assert bounded_name("support-bot", "train") == "support-bot-train"  # valid names keep their old form
    assert pvc_volume_name("adapters") == "pvc-adapters"
    assert label_value("r" * 63) == "r" * 63
    long = bounded_name("a" * 69, "train")
    assert len(long) == 63 and long.endswith("-train") and long == bounded_name("a" * 69, "train")
    assert bounded_name("a" * 69, "train") != bounded_name("a" * 68 + "b", "train")
    # Sanitising never merges two claims into one volume: a changed name always carries the hash.
    assert pvc_volume_name("my.claim") != pvc_volume_name("my-claim") == "pvc-my-claim"
    assert bounded_name("1job", "rdzv", 63, "dns1035")[0].isalpha()


# ---- item 1: served names ------------------------------------------------------------------------------------

def adapter(name: str, version: str | None, labels=None) -> dict:
    body = {"apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter",
            "metadata": {"name": name, "namespace": "ns", "labels": labels or {}},
            "spec": {"baseModel": {"name": "org/base"}, "source": {"uri": f"s3://b/{name}"}}}
    if version is not None:
        body["spec"]["version"] = version
    return body


def test_two_adapters_can_no_longer_share_a_served_name():
    # Issue 13 item 1: sql@v2--1 and sql--v2@1 were both served as sql--v2--1.
    with pytest.raises(ValidationError, match=r"spec.version must not contain '--'"):
        parse(adapter("sql", "v2--1"))
    other = parse(adapter("sql--v2", "1"))
    assert other.served_name() == "sql--v2--1" and adapter_of_served_name("sql--v2--1") == "sql--v2"
    with pytest.raises(ValueError):
        served_name("sql", "v2--1")
    # The operator maps a replica's report back to the right Adapter.
    pod = {"metadata": {"annotations": {"loraplane.io/adapters": '{"adapters": {"sql--v2--1": {}, "x--1": {}}}'}}}
    assert reported_adapters(pod) == {"sql--v2", "x"}


def test_served_names_are_injective_over_valid_pairs():
    names = ["a", "a-b", "a--b", "sql--v2", "sql", "x.y"]
    versions = ["1", "v2", "v2-1", "1a2b3c4d", "a.b_c"]
    seen = {}
    for n in names:
        for v in versions:
            s = served_name(n, v)
            assert seen.setdefault(s, (n, v)) == (n, v), s
            assert adapter_of_served_name(s) == n


def test_the_base_model_served_name_never_looks_like_an_adapters():
    route = {"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute", "metadata": {"name": "r"},
             "spec": {"baseModel": {"name": "org/base"}, "servedModelName": "sql--1"}}
    with pytest.raises(ValidationError, match="servedModelName must not contain"):
        parse(route)
    route["spec"] = {"baseModel": {"name": "org/a--b"}}
    with pytest.raises(ValidationError, match="set spec.servedModelName"):
        parse(route)
    route["spec"]["servedModelName"] = "a-b"
    assert served_model_name(parse(route)) == "a-b"


# ---- item 2: public model names ------------------------------------------------------------------------------

def conflicting_route() -> ModelRoute:
    return parse({"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute",
                  "metadata": {"name": "r", "namespace": "ns"},
                  "spec": {"baseModel": {"name": "org/base"},
                           "routes": [{"selector": {"matchLabels": {"team": "analytics"}}, "prefix": "analytics-"},
                                      {"name": "analytics-sql", "backends": [{"base": True}]}]}})


def test_a_public_name_published_twice_is_left_out_once_and_reported():
    # Issue 13 item 2: route `analytics-sql` and prefix `analytics-` over Adapter `sql` both published it.
    adapters = [parse(adapter("sql", "1", {"team": "analytics"})), parse(adapter("web", "1", {"team": "analytics"}))]
    res = resolve(conflicting_route(), adapters)
    names = [m.name for m in res.table.models]
    assert sorted(names) == ["analytics-sql", "analytics-web"] and len(set(names)) == len(names)
    # The explicit route wins, though the selector is listed first.
    sql = next(m for m in res.table.models if m.name == "analytics-sql")
    assert [b.adapter for b in sql.backends] == [None]
    assert [(c.name, c.kept, c.dropped) for c in res.conflicts] == [
        ("analytics-sql", "routes[1] (analytics-sql)", "routes[0] selector (Adapter sql)")]


def test_two_selectors_publishing_one_name_keep_the_earlier_route():
    route = parse({"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute",
                   "metadata": {"name": "r", "namespace": "ns"},
                   "spec": {"baseModel": {"name": "org/base"},
                            "routes": [{"selector": {"matchLabels": {"team": "a"}}},
                                       {"selector": {"matchExpressions": [{"key": "team", "operator": "Exists"}]}}]}})
    res = resolve(route, [parse(adapter("sql", "1", {"team": "a"}))])
    assert [m.name for m in res.table.models] == ["sql"]
    assert [c.dropped for c in res.conflicts] == ["routes[1] selector (Adapter sql)"]


# ---- item 3: what cannot be made valid is refused, with the field named ----------------------------------------

ROUTE = {"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute", "metadata": {"name": "r", "namespace": "ns"},
         "spec": {"baseModel": {"name": "org/base"}}}


@pytest.mark.parametrize("patch, field", [
    ({"routes": [{"selector": {"matchLabels": ["team"]}}]}, "spec.routes[0].selector.matchLabels"),
    ({"routes": [{"selector": {"matchExpressions": [{"key": "t", "operator": "Equals", "values": ["a"]}]}}]},
     "spec.routes[0].selector.matchExpressions[0].operator"),
    ({"routes": [{"selector": {"matchExpressions": [{"key": "t", "operator": "In"}]}}]},
     "spec.routes[0].selector.matchExpressions[0]"),
    ({"routes": [{"selector": {"matchLabels": {"team": "a b"}}}]}, "spec.routes[0].selector.matchLabels.team"),
    ({"routes": [{"selector": {"matchLbels": {"team": "a"}}}]}, "spec.routes[0].selector.matchLbels"),
    ({"engine": {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}}, "spec.engine.env"),
    ({"engine": {"env": [{"value": "1"}]}}, "spec.engine.env"),
    ({"engine": {"nodeSelector": {"gpu": "x" * 64}}}, "spec.engine.nodeSelector.gpu"),
    ({"engine": {"gpuTypeLabel": "bad key!"}}, "spec.engine"),
    ({"baseModel": {"uri": "pvc://" + "c" * 254 + "/m"}}, "spec.baseModel"),
])
def test_specs_whose_children_cannot_be_valid_are_refused_with_the_field_named(patch, field):
    doc = copy.deepcopy(ROUTE)
    doc["spec"].update(patch)
    with pytest.raises(ValidationError) as err:
        parse(doc)
    from loraplane.api.validation import format_validation_error
    assert field in format_validation_error(err.value)


def test_adapter_labels_of_a_finetunejob_are_checked():
    doc = {"apiVersion": "loraplane.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "j"},
           "spec": {"baseModel": {"name": "org/base"}, "dataset": {"uri": "/d"},
                    "output": {"adapterName": "a", "adapterLabels": {"team": "-bad-"}}}}
    with pytest.raises(ValidationError, match="spec.output.adapterLabels"):
        FineTuneJob.model_validate(doc)


def _uri_route(uri: str) -> ModelRoute:
    return parse({"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute",
                  "metadata": {"name": "r", "namespace": "ns", "generation": 1},
                  "spec": {"baseModel": {"uri": uri},
                           "routes": [{"name": "sql", "backends": [{"adapter": "sql"}]}]}})


def test_a_uri_base_models_derived_served_name_is_never_an_adapters():
    """Property over derived base names (issue 13 review p2): every last path component built from `a`, `-` and
    `.` up to 6 characters, under every URI form and archive suffix (valid or not), gives a base served name that contains no
    `--`, is read as no adapter's and equals no `served_name(adapter, version)` — so the router can never mark an
    adapter ready because vLLM (the base) is up."""
    import itertools

    template = _uri_route("s3://models/base")
    checked = 0
    for n in range(1, 7):
        for chars in itertools.product("a-.", repeat=n):
            last = "".join(chars)
            for uri in (f"s3://models/{last}", f"pvc://claim/{last}", f"/data/{last}",
                        f"s3://models/{last}.tar.gz", f"https://h/{last}.tgz?sig=1", f"s3://models/{last}/"):
                # Every string, not only the schema-valid ones (validating each costs its CEL rules).
                spec = template.spec.model_copy(update={
                    "base_model": template.spec.base_model.model_copy(update={"uri": uri})})
                base = served_model_name(template.model_copy(update={"spec": spec}))
                checked += 1
                assert base and "--" not in base, (uri, base)
                assert adapter_of_served_name(base) is None, (uri, base)
                adapter, sep, version = last.rpartition("--")
                if sep and adapter and version and "--" not in version:
                    assert base != served_name(adapter, version)
    assert checked > 1000


def test_the_base_served_name_of_a_uri_named_like_an_adapter_version_differs_from_it():
    route = _uri_route("s3://models/sql--v1")
    adapter = parse({"apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter",
                     "metadata": {"name": "sql", "namespace": "ns"},
                     "spec": {"baseModel": {"name": "s3://models/sql--v1"}, "version": "v1",
                              "source": {"uri": "s3://adapters/sql/v1"}}})
    table = resolve(route, [adapter]).table
    assert table.served_model_name == "sql-v1"
    assert table.served_model_name not in {a.served_name for a in table.adapters}
    assert adapter.served_name() in {a.served_name for a in table.adapters}
