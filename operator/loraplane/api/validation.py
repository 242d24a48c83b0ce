"""How a pydantic validation error is shown to a user: one line per problem, naming the field by its wire path.

Used by everything that parses untrusted input against the API models (`loraplane validate`, the controllers'
InvalidSpec message, the trainer's config check, the router's serving-table check), so the same mistake reads
the same everywhere.
"""

from __future__ import annotations

from pydantic import ValidationError

from loraplane.api.common import URI_PATTERN_FORMS


def field_path(loc: tuple) -> str:
    """A pydantic error location as the path a user writes, in Kubernetes' notation: wire names, list indexes
    in brackets (`spec.routes[0].backends[1].weight`, as kubectl and the API server print them); pydantic's
    internal union/validator segments are left out."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith(("function-", "tagged-union")):
            out += ("." if out else "") + str(part)
    return out


def _message(e: dict) -> str:
    # A URI that matches none of the field's forms: pydantic would print the whole regular expression; say which
    # forms the field takes instead (uri_pattern registered them).
    if e["type"] == "string_pattern_mismatch" and (forms := URI_PATTERN_FORMS.get((e.get("ctx") or {}).get("pattern"))):
        return f"unsupported URI {str(e.get('input'))[:200]!r}: use {forms}"
    return e["msg"].removeprefix("Value error, ")


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem, `<prefix><field path>: <message>` (e.g. `spec.method.r: Input should be ...`).

    The field path uses the wire names (camelCase aliases) and brackets for list indexes (`field_path`), so it
    is the path a user writes in YAML; a URI refused by its field's pattern names the forms the field takes.
    """
    lines = []
    for e in err.errors():
        lines.append(f"{prefix}{field_path(e['loc']) or '<object>'}: {_message(e)}")
    return "\n".join(lines)
