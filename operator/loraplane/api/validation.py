"""How a pydantic validation error is shown to a user: one line per problem, naming the field by its wire path.

Used by everything that parses untrusted input against the API models (`loraplane validate`, the controllers'
InvalidSpec message, the trainer's config check, the router's serving-table check), so the same mistake reads
the same everywhere.
"""

from __future__ import annotations

from pydantic import ValidationError


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem, `<prefix><field path>: <message>` (e.g. `spec.method.r: Input should be ...`).

    The field path uses the wire names (camelCase aliases), skipping pydantic's internal union/validator
    segments, so it is the path a user writes in YAML.
    """
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "tagged-union")))
        lines.append(f"{prefix}{loc or '<object>'}: {e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)
