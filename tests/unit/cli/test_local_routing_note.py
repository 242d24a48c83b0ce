"""`loraplane run`'s line for a content-routed model (issue 15): where the router sent the prompt and why, read from
the answer's headers (api.orchestration's header names, any case)."""

from __future__ import annotations

from loraplane.api.orchestration import DESTINATION_HEADER, FALLBACK_HEADER, METHOD_HEADER
from loraplane.local.pipeline import routing_note


def test_the_note_names_the_destination_the_method_and_a_fallback():
    assert routing_note({DESTINATION_HEADER: "sql", METHOD_HEADER: "rules"}) == "  [via sql, rules]"
    assert routing_note({DESTINATION_HEADER.lower(): "general", METHOD_HEADER.upper(): "default",
                         FALLBACK_HEADER: "timeout"}) == "  [via general, default: timeout]"
    assert routing_note({"Content-Type": "application/json"}) == ""


def test_the_quickstart_content_routing_snippet_fits_the_quickstart_route():
    """docs/quickstart.md's `contentRouting` snippet, added to docs/examples/quickstart.yaml's ModelRoute as the
    text says, validates and every name it sends requests to is one of that route's (nothing to warn about)."""
    import re

    import yaml

    from loraplane.api import parse
    from loraplane.builders import route_warnings
    from support.paths import ROOT

    text = (ROOT / "docs" / "quickstart.md").read_text()
    [snippet] = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "contentRouting" in b]
    docs = [d for d in yaml.safe_load_all((ROOT / "docs" / "examples" / "quickstart.yaml").read_text()) if d]
    [route] = [d for d in docs if d["kind"] == "ModelRoute"]
    route["spec"].update(yaml.safe_load(snippet))
    parsed = parse(route)
    assert [c.name for c in parsed.spec.content_routing] == ["auto"]
    warnings = route_warnings([parsed])
    assert not [w for w in warnings if "contentRouting" in w], warnings
