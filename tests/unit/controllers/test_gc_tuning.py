"""The operator process keeps Python's cyclic GC out of its way (issue 17: ~25% of its CPU in a settle of 1,050
objects went to full-heap GC walks): once started, what is alive is frozen and young collections are rarer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from loraplane.controllers import handlers


def test_tune_gc_freezes_what_is_alive_and_raises_the_thresholds():
    # In a child process: freezing the test process's heap would change the GC of the rest of the session.
    code = ("import gc; from loraplane.controllers.handlers import tune_gc, GC_THRESHOLDS; "
            "assert not gc.get_freeze_count(); tune_gc(); assert gc.get_threshold() == GC_THRESHOLDS and gc.get_threshold()[0] > 700; "
            "assert gc.get_freeze_count() > 10000, gc.get_freeze_count()")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                   env={"PYTHONPATH": str(Path(__file__).resolve().parents[3] / "operator")})


async def test_the_operator_tunes_the_gc_once_it_has_started_and_listed(monkeypatch):
    calls = []

    class Op:
        settings = type("S", (), {"metrics_port": 0})()

        def __init__(self, *_):
            pass

        async def start(self):
            calls.append("start")

    monkeypatch.setattr(handlers, "Manager", Op)
    monkeypatch.setattr(handlers, "KubeClient", lambda *_: None)
    monkeypatch.setattr(handlers, "_kube_config", lambda memo: None)
    monkeypatch.setattr(handlers, "configure_logging", lambda: None)
    monkeypatch.setattr(handlers, "tune_gc", lambda: calls.append("tune_gc"))
    import kopf

    memo = kopf.Memo()
    await handlers._startup(settings=kopf.OperatorSettings(), memo=memo, logger=handlers.logging.getLogger("t"))
    assert calls == ["start", "tune_gc"]
