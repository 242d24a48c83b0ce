"""The examples in docs/examples/, as test parameters. Invalid ones carry their expectation in a header:
`# invalid-by: schema|cel` (which layer rejects it) and `# expect-error: FIELD-or-MESSAGE`."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from loraplane.api import KINDS
from support.paths import ROOT

EXAMPLES = ROOT / "docs" / "examples"


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def valid_examples() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for i, doc in enumerate(load_docs(path)):
            if doc.get("kind") in KINDS:
                out.append((f"{path.name}#{i}", doc))
    return out


def invalid_examples() -> list[tuple[str, dict, str, str]]:
    """(id, doc, invalid-by, expected error) from the header comments of docs/examples/invalid/*.yaml."""
    out = []
    for path in sorted((EXAMPLES / "invalid").glob("*.yaml")):
        text = path.read_text()
        by = re.search(r"^# invalid-by: (\w+)$", text, re.M).group(1)
        expect = re.search(r"^# expect-error: (.+)$", text, re.M).group(1).strip()
        out.append((path.name, load_docs(path)[0], by, expect))
    return out
