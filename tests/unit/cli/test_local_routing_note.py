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
