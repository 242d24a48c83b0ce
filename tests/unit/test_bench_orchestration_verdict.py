"""bench_orchestration's verdict (issue 15): "rules add less than 5% CPU per request" is judged on the request's
CPU (router + vLLM of a plain named request), with the router's own extra CPU as what rules add; a part not
measured is exit 4, never a pass."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_orchestration as bo  # noqa: E402


def report(*, router_plain=33.0, router_rules=45.0, vllm=True, stub=True, accuracy=1.0) -> dict:
    out = {"held_out": 60, "not_measured": {}, "accuracy": {}, "latency_vllm": {}}
    if accuracy is not None:
        out["accuracy"]["classifier"] = {"accuracy": accuracy, "methods": {"classifier": 60}, "fallbacks": {}}
    if vllm:
        out["latency_vllm"]["plain"] = {"p50_ms": {1: 20.0, 16: 90.0}, "ratio": {1: 1.0, 16: 1.0}, "requests": 500,
                                        "non_200": 0, "cpu_us": {"router": 110.0, "engines": 4700.0}}
    if stub:
        out["cpu_stub"] = {"cpu_us_per_request": {"plain": router_plain, "rules": router_rules},
                           "rules_extra": router_rules / router_plain - 1, "p50_ms": {}, "ratio": {1: 1.0, 16: 1.0},
                           "requests": {"plain": 1000, "rules": 1000}, "non_200": {"plain": 0, "rules": 0}}
    return out


def test_rules_share_is_of_the_requests_cpu():
    added, request = bo.rules_cpu_share(report())
    assert added == pytest.approx(12.0)
    assert request == pytest.approx(4810.0)


def test_passes_when_rules_add_under_five_percent_of_the_request(capsys):
    assert bo.print_report(report()) == 0
    out = capsys.readouterr().out
    assert "0.25%, below the target of 5%" in out
    assert "+36.4% of the router's own CPU (informational)" in out


def test_fails_when_rules_add_five_percent_or_more():
    # 250 us added to a 4,810 us request: 5.2%.
    assert bo.print_report(report(router_rules=283.0)) == 3


def test_not_measured_parts_are_exit_4_never_a_pass(capsys):
    assert bo.print_report(report(vllm=False)) == 4
    assert "NOT MEASURED" in capsys.readouterr().out
    assert bo.print_report(report(stub=False)) == 4


def test_classifier_below_the_bar_fails():
    assert bo.print_report(report(accuracy=0.85)) == 3


def test_rules_cheaper_than_plain_counts_as_zero_added():
    added, _ = bo.rules_cpu_share(report(router_rules=30.0))
    assert added == 0.0
