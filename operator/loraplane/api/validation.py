"""How a pydantic validation error is shown to a user: one line per problem, naming the field by its wire path
and saying what to write instead.

Used by everything that parses untrusted input against the API models (`loraplane validate` and `render`, the
controllers' InvalidSpec message, the trainer's config check, the router's serving-table check), so the same
mistake reads the same everywhere. pydantic's own messages name no fix (`Extra inputs are not permitted`, a raw
regular expression, `Field required`); `_message` replaces each with one that does: the closest valid field name
(or the valid ones), the pattern in words (PATTERN_WORDS; a test checks every pattern of the API has words), and
what a missing field is for.
"""

from __future__ import annotations

import difflib
import json
import re
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from loraplane.api.rollout import DURATION_PATTERN
from loraplane.api.common import (
    DNS_1035_LABEL, DNS_LABEL, DNS_NAME, ENV_NAME, LABEL_VALUE, QUALIFIED_NAME_PART, QUANTITY_PATTERN, URI_FORM_HINTS,
    URI_FORM_PROBLEMS, URI_PATTERN_FORMS,
)

# Every `pattern` of the API models, in words (what a user reads instead of the regular expression).
PATTERN_WORDS: dict[str, str] = {
    DNS_NAME: "a DNS-1123 name: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit "
              "(at most 253)",
    DNS_LABEL: "a DNS-1123 label: lowercase letters, digits and '-', starting and ending with a letter or digit "
               "(at most 63)",
    DNS_1035_LABEL: "a DNS-1035 label: lowercase letters, digits and '-', starting with a letter and ending with a "
                    "letter or digit (at most 63)",
    LABEL_VALUE: "a label value: empty, or letters, digits, '-', '_' and '.', starting and ending with a letter or "
                 "digit (at most 63)",
    QUALIFIED_NAME_PART: "letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
    ENV_NAME: "an environment variable name: letters, digits, '-', '_' and '.', not starting with a digit",
    r"^[0-9a-f]{64}$": "64 lowercase hex characters (what `sha256sum` prints)",
    r"^[-._a-zA-Z0-9]+$": "a ConfigMap/Secret key: letters, digits, '-', '_' and '.'",
    r"^(/[-A-Za-z0-9_.]+)+$": "an absolute path of letters, digits, '-', '_' and '.' (e.g. /var/cache/models)",
    r"^[A-Z][A-Za-z0-9]*$": "a CamelCase word starting with an upper-case letter (e.g. Ready)",
    r"^[A-Za-z0-9]([-A-Za-z0-9_.:/]*[A-Za-z0-9])?$": "letters, digits, '-', '_', '.', ':' and '/', starting and "
                                                    "ending with a letter or digit",
    r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$": "a CamelCase reason: letters, digits, '_', ',' and ':', starting "
                                                 "with a letter",
    r"^[A-Za-z_]+$": "a capability name: letters and '_' (e.g. NET_BIND_SERVICE)",
    r"^[a-zA-Z_:][a-zA-Z0-9_:]*$": "a Prometheus metric name: letters, digits, '_' and ':', not starting with a "
                                   "digit (e.g. vllm:num_requests_waiting)",
    r"^[a-z0-9]([-a-z0-9_]*[a-z0-9])?$": "a label word: lowercase letters, digits, '-' and '_', starting and "
                                          "ending with a letter or digit (e.g. sql)",
    DURATION_PATTERN: "a duration: a whole number with the unit s, m or h (e.g. 30s, 5m, 1h)",
    QUANTITY_PATTERN: "a Kubernetes quantity: a number with an optional unit and no space (e.g. 8, 500m, 64Gi, 64G)",
}


def field_path(loc: tuple) -> str:
    """A pydantic error location as the path a user writes, in Kubernetes' notation: wire names, list indexes
    in brackets (`spec.routes[0].backends[1].weight`, as kubectl and the API server print them); pydantic's
    internal union/validator segments are left out."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _internal(part):
            out += ("." if out else "") + str(part)
    return out


def _internal(part: Any) -> bool:
    return isinstance(part, str) and part.startswith(("function-", "tagged-union"))


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (through Optional, unions, lists, dicts, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is None:
        return []
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        args = args[:1]
    elif origin is dict:
        args = args[1:]
    return [m for a in args for m in _models_in(a)]


def _field_of(model: type[BaseModel], key: str):
    for name, info in model.model_fields.items():
        if key in (name, info.alias):
            return info
    return None


def _models_at(root: type[BaseModel] | None, loc: tuple) -> list[type[BaseModel]]:
    """The models that may hold the object at `loc` under `root` (several for a union); a segment that is no
    field (a list index, a map key, a union tag) keeps the current ones."""
    models = [root] if root is not None else []
    for part in loc:
        if isinstance(part, int) or _internal(part):
            continue
        found = [f for m in models if (f := _field_of(m, str(part))) is not None]
        if found:
            models = [m for f in found for m in _models_in(f.annotation)]
    return models


def _wire_names(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def _model_named(title: str) -> type[BaseModel] | None:
    """The API model class a ValidationError's title names (None for one outside the API)."""
    from loraplane.api.common import ApiModel

    todo = [ApiModel]
    while todo:
        cls = todo.pop()
        if cls.__name__ == title:
            return cls
        todo.extend(cls.__subclasses__())
    return None


def _uri_message(value: str, forms: str) -> str:
    scheme = value.partition("://")[0] + "://" if "://" in value else None
    for form, hint in URI_FORM_HINTS.items():
        # The scheme is one the field takes (`forms`), so the part after it is what is wrong: say which rule.
        if scheme and hint.startswith(scheme) and hint in forms and form in URI_FORM_PROBLEMS:
            return f"invalid {scheme} URI {value[:200]!r}: {URI_FORM_PROBLEMS[form]} (expected {hint})"
    return f"unsupported URI {value[:200]!r}: use {forms}"


def _message(e: dict, root: type[BaseModel] | None = None) -> str:
    ctx = e.get("ctx") or {}
    if e["type"] == "string_pattern_mismatch":
        # pydantic would print the whole regular expression: say what the field takes instead.
        if forms := URI_PATTERN_FORMS.get(ctx.get("pattern")):
            return _uri_message(str(e.get("input")), forms)
        if words := PATTERN_WORDS.get(ctx.get("pattern")):
            return f"{str(e.get('input'))[:200]!r} is not valid: expected {words}"
    if e["type"] == "extra_forbidden" and e["loc"]:
        key = str(e["loc"][-1])
        names = sorted({n for m in _models_at(root, e["loc"][:-1]) for n in _wire_names(m)})
        if close := difflib.get_close_matches(key, names, n=1):
            return f"unknown field {key!r}: did you mean {close[0]!r}?"
        if names:
            return f"unknown field {key!r}: the fields here are {', '.join(names)}"
        return f"unknown field {key!r}: remove it"
    if e["type"] == "missing" and e["loc"]:
        key = str(e["loc"][-1])
        infos = [f for m in _models_at(root, e["loc"][:-1]) if (f := _field_of(m, key)) is not None]
        # What the field is for: its description, else the docstring of the model it holds.
        docs = [f.description or next((m.__doc__ for m in _models_in(f.annotation) if m.__doc__), "") for f in infos]
        about = " ".join((docs[0] if docs else "").split()).split(". ")[0].rstrip(".")[:200]
        return f"required: add `{key}:`" + (f" ({about})" if about else "")
    if e["type"] == "list_type" and e["loc"] and isinstance(e["loc"][-1], str):
        # A newcomer's `methods: rules` or `keywords: refund`: a scalar where a YAML list belongs.
        key, value = e["loc"][-1], e.get("input")
        if isinstance(value, dict):
            shown = "{...}"   # one mapping where a list of them belongs: make it the list's first item
        elif isinstance(value, str) and not re.fullmatch(r"[\w.\- ]{1,60}", value):
            shown = json.dumps(value[:60])
        else:
            shown = str(value)[:60]
        kind = {str: "a string", dict: "a mapping", bool: "a boolean", int: "a number", float: "a number"}.get(
            type(value), type(value).__name__)
        return f"expected a list, got {kind} {str(value)[:60]!r}: write `{key}: [{shown}]`"
    return e["msg"].removeprefix("Value error, ")


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem, `<prefix><field path>: <message>` (e.g. `spec.methd: unknown field 'methd': did
    you mean 'method'?`).

    The field path uses the wire names (camelCase aliases) and brackets for list indexes (`field_path`), so it
    is the path a user writes in YAML; a URI refused by its field's pattern names the forms the field takes (or,
    for a scheme the field takes, what is wrong after it); other patterns are said in words (PATTERN_WORDS); an
    unknown field gets the closest valid name (difflib) or the list of valid ones; a missing field says what to
    add. The model is found from the error's title (an API model's class name).
    """
    root = _model_named(err.title)
    lines = []
    for e in err.errors():
        lines.append(f"{prefix}{field_path(e['loc']) or '<object>'}: {_message(e, root)}")
    return "\n".join(lines)


# Error types whose field can be left out to check the rest: a wrong value of a field (not a missing one, not a
# rule's own error, which is reported on the object the rule belongs to).
_PRUNABLE = frozenset({"missing", "value_error", "assertion_error"})
_ROUNDS = 3


def _without(data: Any, loc: tuple) -> bool:
    """Delete the value at `loc` from `data` (in place); False when there is nothing there."""
    parts = [p for p in loc if not _internal(p)]
    for part in parts[:-1]:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return False
    if isinstance(data, dict) and parts and parts[-1] in data:
        del data[parts[-1]]
        return True
    return False


def _about_removed(e: dict, removed: list[tuple]) -> bool:
    """Whether a later round's error may come from a field left out, not from the user's object: an error of the
    object that held it (its rules now see it unset), or one whose message names it as rules do (`source.uri`)."""
    return any(e["loc"] == loc[:-1] or field_path(loc[-2:]) in e["msg"] for loc in removed if loc)


def _value_at(data: Any, loc: tuple) -> Any:
    """The value at `loc` in `data` (None when there is none)."""
    for part in (p for p in loc if not _internal(p)):
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _rules_the_user_broke(e: dict, root: type[BaseModel], data: Any, removed: list[tuple]) -> str | None:
    """The message of a later round's rule error on an object *above* a field left out, as far as the user's own
    values break those rules; None when none does (the error is then an artifact of the left-out field).

    A field left out takes its default, which an ancestor's rule then sees: two weights -10 and 110 (each out of
    range) sum to 100, but left out each counts 100 and `the weights of a route's backends must sum to 100` would
    be reported, untruthfully. So each of the object's rules named in the message is evaluated on the object as
    the user wrote it (its Python mirror, CelRule.check): a rule it passes, or cannot evaluate because a value has
    the wrong type (already reported), is dropped. An error that names no rule is kept as it is."""
    loc = e["loc"]
    if not any(len(r) > len(loc) + 1 and r[:len(loc)] == loc for r in removed):
        return e["msg"]   # not above a left-out field
    rules = [r for m in _models_at(root, loc) for r in getattr(m, "cel_rules", ()) if r.message in e["msg"]]
    if not rules:
        return e["msg"]
    original = _value_at(data, loc)
    broken = []
    for rule in rules:
        try:
            if rule.check is not None and rule.check(original) is False:
                broken.append(rule.message)
        except Exception:  # noqa: BLE001 - a value of the wrong type: reported on its own field
            continue
    return "; ".join(dict.fromkeys(broken)) or None


def format_all_problems(model: type[BaseModel], data: Any, err: ValidationError, prefix: str = "") -> str:
    """format_validation_error of `err` (the error of `model.model_validate(data)`), plus the problems it hides.

    pydantic stops at a model whose fields are wrong: that model's cross-field (CEL) rules are not evaluated, so
    a user would fix the errors one layer at a time. Here the fields with wrong values are left out of a copy of
    `data` and it is validated again (up to _ROUNDS times), and what that finds is reported too; the rules that
    involve a field still wrong or missing cannot be evaluated, which a last line says.
    """
    import copy

    root = _model_named(err.title) or model
    seen: set[tuple] = set()
    lines = []
    current: ValidationError | None = err
    pruned = copy.deepcopy(data)
    removed: list[tuple] = []
    for _ in range(_ROUNDS):
        progressed = False
        for e in current.errors():
            key = (e["loc"], e["msg"])
            if key in seen or current is not err and _about_removed(e, removed):
                continue
            seen.add(key)
            if current is not err and e["type"] == "value_error":
                msg = _rules_the_user_broke(e, root, data, removed)
                if msg is None:
                    continue
                e = {**e, "msg": msg}
            lines.append(f"{prefix}{field_path(e['loc']) or '<object>'}: {_message(e, root)}")
            if e["type"] not in _PRUNABLE and _without(pruned, e["loc"]):
                removed.append(e["loc"])
                progressed = True
        if not progressed:
            break
        try:
            model.model_validate(pruned, by_alias=True, by_name=False)   # the wire form, as parse()
        except ValidationError as again:
            # A required field just left out is reported already, as its wrong value.
            current = again
            seen.update((e["loc"], e["msg"]) for e in again.errors() if e["type"] == "missing")
            continue
        break
    if any(e["type"] != "value_error" for e in err.errors()):   # a rule's own error: the rules did run
        lines.append(f"{prefix}(fix these first: the rules that involve these fields are checked once they are "
                     "valid)")
    return "\n".join(lines)
