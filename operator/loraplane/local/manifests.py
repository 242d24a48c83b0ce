"""Reading the manifests `validate`, `render` and `run` are given: files or `-` (stdin), multi-document YAML.

One reader for the three commands (it lives here, below `cli/`, because `local.pipeline` reads `run`'s file with
it), so they agree on what is a loraplane object and on how bad input is reported:
a file that cannot be read or parsed, a document that is not a mapping, and an object of the loraplane.io API
group whose kind does not exist (a typo such as `Adaptor` would otherwise be skipped like a Secret and pass CI)
are each one error naming the file and document, never a traceback. A key written twice in one mapping is such
an error too (PyYAML would keep the last silently), and so is an object without metadata.name (parse_document).
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from loraplane.api import GROUP, KINDS, Resource


@dataclass
class Document:
    """One YAML document: where it came from (`FILE#INDEX KIND/NAME`), its content, and the error that makes it
    unusable (None for a loraplane object to parse, or `skip` for another API's object)."""

    where: str
    doc: dict | None
    error: str | None = None
    skip: bool = False


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with the same key twice. YAML 1.2 requires keys to be unique, but
    PyYAML keeps the last value silently: a second `baseModel:` would replace the first without a word, so a
    manifest would not say what it seems to."""

    def construct_mapping(self, node, deep=False):  # noqa: D102 - PyYAML hook
        first_line: dict = {}
        # The keys as written (a `<<` merge key brings defaults that explicit keys may override: not checked).
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first on line {first_line[key]}): remove one of them",
                        key_node.start_mark)
                first_line[key] = line
            except TypeError:   # an unhashable key: the base class reports it
                continue
        return super().construct_mapping(node, deep)


# A number with an exponent and no dot (`2e-4`, `1E6`) is a float in YAML 1.2 and for kubectl (go-yaml), but a
# string for PyYAML (YAML 1.1 wants a dot): read it as kubectl does, so `learningRate: 2e-4` is the number it is
# in the cluster (a quoted "2e-4" stays a string, as there).
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))
# YAML as kubectl reads it (go-yaml v2, through sigs.k8s.io/yaml; checked with `kubectl label --local -o json`).
# Two YAML 1.1 readings of PyYAML's that kubectl does not make: an unquoted date or
# time (`version: 2024-06-01`) stays the string written (go-yaml keeps a timestamp as a string in an untyped
# document), where PyYAML made a datetime that every string field refused; and `1:30` (base 60 in YAML 1.1, 90 for
# PyYAML) is the string "1:30" for kubectl, not a number (validate said to write `"90"`). Both are read as strings,
# as the API server receives them. The resolver goes first: PyYAML takes the first one that matches.
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_yaml_str)
_SEXAGESIMAL = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")
for _first in "-+0123456789":   # the class's own lists (copied from SafeLoader's by add_implicit_resolver above)
    _UniqueKeyLoader.yaml_implicit_resolvers[_first].insert(0, ("tag:yaml.org,2002:str", _SEXAGESIMAL))
# And go-yaml v2 reads that PyYAML lacks: `y`/`n` (any case) are booleans and `0o17` is octal 15.
_UniqueKeyLoader.bool_values = {**yaml.SafeLoader.bool_values, "y": True, "n": False}
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:y|Y|n|N)$"), list("yYnN"))
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?0o[0-7_]+$"), list("-+0"))
# Digits after a leading 0 that octal cannot read (`09`) are the number 9 for kubectl (go-yaml falls back to a
# float), a string for PyYAML: a number here too (after the int resolvers, which take every other run of digits).
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?0[0-9_]+$"), list("-+0"))


def _list_items(docs: list) -> Iterator[tuple[str, object]]:
    """(index, object) of each document, a list's items in its place (`3.items[0]`): `kubectl apply -f` applies
    the items of a `kind: List` (or `AdapterList`...; what `kubectl get -o yaml` exports), so they are checked,
    not skipped as another API's object."""
    for i, doc in enumerate(docs):
        items = doc.get("items") if isinstance(doc, dict) else None
        if isinstance(doc, dict) and str(doc.get("kind") or "").endswith("List") and isinstance(items, list):
            yield from ((f"{i}.items[{j}]", item) for j, item in enumerate(items))
        else:
            yield str(i), doc


def read_documents(paths: list[Path]) -> Iterator[Document]:
    """Every document of `paths` (`-` is stdin, read once). Documents of other API groups are yielded with
    skip=True; empty documents are dropped."""
    for path in paths:
        try:
            text = sys.stdin.read() if str(path) == "-" else Path(path).read_text()
        except OSError as exc:
            yield Document(f"{path}", None, f"cannot read the file: {exc.strerror or exc}")
            continue
        try:
            docs = list(yaml.load_all(text, Loader=_UniqueKeyLoader))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            yield Document(f"{path}", None, f"not valid YAML{at}: {getattr(exc, 'problem', None) or exc}")
            continue
        for i, doc in _list_items(docs):
            if doc is None:
                continue
            if not isinstance(doc, dict):
                yield Document(f"{path}#{i}", None, f"a document must be one object (a YAML mapping with apiVersion "
                                                    f"and kind), not a {type(doc).__name__}")
                continue
            kind, meta = doc.get("kind"), doc.get("metadata")
            name = meta.get("name") if isinstance(meta, dict) else None
            where = f"{path}#{i} {kind}/{name}"
            group = str(doc.get("apiVersion") or "").split("/")[0]
            if kind in KINDS:
                yield Document(where, doc)
            elif group == GROUP:
                yield Document(where, doc, f"kind: {kind!r} is not a {GROUP} kind (expected one of "
                                           f"{', '.join(KINDS)})")
            else:
                yield Document(where, doc, skip=True)


_JSON_TYPES = {"integer": "an integer", "number": "a number", "boolean": "true or false", "string": "a string"}


def _yaml_type(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
            list: "a list"}.get(type(value), type(value).__name__)


def _type_fits(value: object, schema: dict) -> bool:
    if schema.get("x-kubernetes-int-or-string"):
        return isinstance(value, (int, str)) and not isinstance(value, bool)
    want = schema.get("type")
    if want == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if want == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if want == "boolean":
        return isinstance(value, bool)
    if want == "string":
        return isinstance(value, str)
    return True


def _field_schema(schema: dict, key: object) -> dict | None:
    """The schema of key `key` of an object `schema` (a structural CRD schema): its property, or, for a map
    without properties, additionalProperties; None when the schema does not describe it."""
    props = schema.get("properties") or {}
    sub = props.get(key) if props else schema.get("additionalProperties")
    return sub if isinstance(sub, dict) else None


def _type_problems(value: object, schema: dict, path: str) -> list[str]:
    """The scalars under `value` whose YAML type is not the one `schema` (a structural CRD schema) declares."""
    if value is None or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if not _type_fits(value, schema):
        key = path.rsplit(".", 1)[-1]
        expected = _JSON_TYPES.get(schema.get("type", ""), "an integer or a string")
        if isinstance(value, str) and schema.get("type") in ("integer", "number", "boolean"):
            fix = f"write it without quotes (`{key}: {value.strip()}`)" if value.strip() else "remove it"
            if schema.get("type") == "boolean":
                fix = f"write `{key}: true` or `{key}: false`, without quotes"
        elif isinstance(value, bool) and schema.get("type") in ("integer", "number"):
            fix = f"write a number (`{key}: 1`)"
        elif isinstance(value, (bool, int, float)) and schema.get("type") == "string":
            shown = str(value).lower() if isinstance(value, bool) else value
            fix = f"quote it (`{key}: \"{shown}\"`): YAML reads {shown} as {_yaml_type(value)}"
        else:
            return []   # a mapping or list where a scalar belongs (or the reverse): the model names that itself
        shown = str(value).lower() if isinstance(value, bool) else repr(value)   # as YAML writes it
        return [f"{path}: {shown} is {_yaml_type(value)}, the field takes {expected} (the API server refuses it): "
                f"{fix}"]
    out = []
    if isinstance(value, dict):
        for k, v in value.items():
            if (sub := _field_schema(schema, k)) is not None:
                out += _type_problems(v, sub, f"{path}.{k}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            out += _type_problems(v, schema["items"], f"{path}[{i}]")
    return out


@functools.lru_cache(maxsize=None)
def _spec_schema(kind: str) -> dict:
    from loraplane.codegen.crds import crd_for

    return crd_for(KINDS[kind])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def _without_nulls(value: object, schema: dict) -> object:
    """`value` without the nulls the API server prunes: a field of `schema` (a structural CRD schema, none of
    whose fields is nullable) given null (`training:` with every line under it commented out) is dropped before
    validation, so it takes its default; values the schema does not describe (x-kubernetes-preserve-unknown-fields,
    unknown keys: the model names them) are left as written."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if (sub := _field_schema(schema, k)) is not None:
                if v is None and not sub.get("nullable"):
                    continue
                v = _without_nulls(v, sub)
            out[k] = v
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_without_nulls(v, schema["items"]) for v in value]
    return value


def without_pruned_nulls(doc: dict) -> dict:
    """`doc` with its spec as the API server stores it: a null where the CRD declares a field that is not nullable
    is pruned (apiextensions.k8s.io/v1, Kubernetes >= 1.20), so `kubectl apply` takes it as left out; pydantic
    refused it (`Input should be a valid dictionary`). A copy; `doc` is not changed."""
    spec = doc.get("spec")
    if not isinstance(spec, dict) or doc.get("kind") not in KINDS:
        return doc
    return {**doc, "spec": _without_nulls(spec, _spec_schema(doc["kind"]))}


def type_problems(doc: dict) -> list[str]:
    """The fields of a loraplane object's spec whose value has another JSON type than its CRD declares, each with
    the fix: a quoted number or boolean (`replicas: "2"`, `gradientCheckpointing: "no"`) where the API server
    wants the number (pydantic would convert it and pass what `kubectl apply` refuses), and an unquoted number
    where it wants a string (`version: 3`). Checked against the generated CRD (codegen.crds), as admission does."""
    spec = doc.get("spec")
    if not isinstance(spec, dict) or doc.get("kind") not in KINDS:
        return []
    return _type_problems(spec, _spec_schema(doc["kind"]), "spec")


def parse_document(doc: dict) -> tuple[Resource | None, str | None]:
    """Parse one loraplane object of a manifest as the operator does, for `validate` and `render`: (the object,
    None), or (None, the problems, one indented line each). Besides the schema and the rules (every problem
    pydantic's first pass hides too: api.validation.format_all_problems), `metadata.name` is required: the API
    server refuses an object without one, so a manifest without it must not pass."""
    from loraplane.api import parse
    from loraplane.api.validation import format_all_problems

    doc = without_pruned_nulls(doc)
    meta = doc.get("metadata")
    no_name = isinstance(meta, dict) and not meta.get("name") or meta is None
    lines = ["  metadata.name: required: every object needs a name (metadata: {name: NAME})"] if no_name else []
    typed = type_problems(doc)
    lines += [f"  {t}" for t in typed]
    typed_paths = tuple(f"  {t.split(':', 1)[0]}:" for t in typed)
    try:
        obj = parse(doc)
    except ValidationError as exc:
        # A field of the wrong type is said once, by the line above (pydantic's `Input should be a valid string`
        # names no fix).
        lines += [line for line in format_all_problems(KINDS[doc["kind"]], doc, exc, "  ").splitlines()
                  if not line.startswith(typed_paths)]
        return None, "\n".join(lines)
    except ValueError as exc:
        lines.append(f"  {exc}")
        return None, "\n".join(lines)
    return (None, "\n".join(lines)) if lines else (obj, None)
