"""Failure truth (issue 11): the Adapter status the operator writes for the reports the *real* loader sends.

The operator's status logic used to be tested only with hand-written replica reports, one of which the loader
never sends (`Incompatible / NoEffect`: the loader reports a no-effect adapter as `Failed / NoEffect`), so the
`Failed` branch went untested. Here the reports come from the loader itself: its control loop
(`loraplane.loader.reconciler.Loader`) runs against a stand-in engine and its `report()` is carried through the
pod annotation into `controllers.adapter.adapter_status`, and every row of the loader's outcome table
(`OUTCOMES`) is checked against the phase and reason the operator shows. A change on either side of that seam
that makes them disagree fails here. (tests/integration/vllm/test_loader_vllm.py does the same with the loader
against a real vLLM; tests/e2e/ through the whole cluster.)
"""

from __future__ import annotations

import asyncio

import pytest

from loraplane.api import Adapter, ModelRoute
from loraplane.api.adapter import AdapterStatus
from loraplane.api.reasons import Reason
from loraplane.api.wire.serving import (REPORT_ANNOTATION, AdapterReport, AdapterState, DesiredAdapter,
                                        ReplicaReport, ServingTable)
from loraplane.controllers.adapter import adapter_status
from loraplane.loader.engine import EngineError, Probe
from loraplane.loader.reconciler import OUTCOMES, Loader
from loraplane.storage.cache import ArtifactCache
from support.adapters import write_adapter

BASE = "loraplane/tiny-llama"
T = "2026-01-01T00:00:00Z"
ROUTE = ModelRoute.model_validate({
    "kind": "ModelRoute", "metadata": {"name": "r", "namespace": "ns", "generation": 1},
    "spec": {"baseModel": {"name": BASE}, "engine": {"maxLoraRank": 16},
             "routes": [{"name": "m", "backends": [{"adapter": "a", "weight": 100}]}]}})
ADAPTER = Adapter.model_validate({"kind": "Adapter", "metadata": {"name": "a", "namespace": "ns"},
                                  "spec": {"baseModel": {"name": BASE}, "source": {"uri": "s3://b/a"},
                                           "version": "1"}})
SERVED = ADAPTER.served_name()
# The phase the operator shows for each state a replica's loader settles an adapter in (docs/operator.md).
PHASE_OF = {AdapterState.Incompatible: "Incompatible", AdapterState.Failed: "Failed"}


class Engine:
    """Enough of the loader's VllmClient: loads succeed unless `load_error`; a probe through an adapter gives
    the base model's exact output when `no_effect` (an untrained adapter), else a different one."""

    base_url = "http://fake-vllm"

    def __init__(self, no_effect: bool = False, load_error: EngineError | None = None):
        self.loaded: dict[str, str] = {}
        self.no_effect, self.load_error = no_effect, load_error

    async def healthy(self) -> bool:
        return True

    async def loaded_adapters(self) -> dict[str, str]:
        return dict(self.loaded)

    async def load(self, name: str, path: str) -> None:
        if self.load_error:
            raise self.load_error
        self.loaded[name] = path

    async def unload(self, name: str) -> None:
        self.loaded.pop(name, None)

    async def complete(self, model: str, prompt: str, max_tokens: int, **_) -> str:
        return "warm"

    async def probe(self, model: str, prompt: str, max_tokens: int) -> Probe:
        if model in self.loaded and not self.no_effect:
            return Probe(text="adapted", tokens=("adapted",), logprobs=(-0.5,))
        return Probe(text="base", tokens=("base",), logprobs=(-0.1,))


def loader_report(tmp_path, engine: Engine, adapter_dir, passes: int = 1) -> ReplicaReport:
    """What the real loader reports for ADAPTER (served as SERVED from `adapter_dir`) after `passes` passes."""
    loader = Loader(engine, ArtifactCache(tmp_path / "cache", 1 << 30), "r-0", max_attempts=2, backoff_base=0.0)
    loader.set_table(ServingTable(route="r", base_model=BASE, served_model_name="base", max_lora_rank=16,
                                  max_loras=4, adapters=[DesiredAdapter(served_name=SERVED, adapter="a",
                                                                        uri=str(adapter_dir), base_model=BASE)]))
    for _ in range(passes):
        asyncio.run(loader.reconcile_once())
    return loader.report()


def operator_view(report: ReplicaReport) -> AdapterStatus:
    """The Adapter status the operator computes from a Ready engine pod carrying `report` in its annotation, as
    the report relay writes it (to_annotation: the bounded form)."""
    pod = {"metadata": {"name": report.replica, "annotations": {REPORT_ANNOTATION: report.to_annotation()}},
           "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}
    return adapter_status(ADAPTER, [ROUTE], {"r": [pod]}, AdapterStatus(), 1, None)


def test_a_no_effect_adapter_is_failed_with_the_loaders_reason_and_message(tmp_path):
    report = loader_report(tmp_path, Engine(no_effect=True), write_adapter(tmp_path / "a"))
    sent = report.adapters[SERVED]
    assert (sent.state, sent.reason) == (AdapterState.Failed, Reason.NoEffect)   # what the real loader sends
    st = operator_view(report)
    ready = st.condition("Ready")
    assert (st.phase, ready.status, ready.reason) == ("Failed", "False", "NoEffect")
    assert ready.message == f"replica r-0: {sent.message}" and "changes nothing" in ready.message
    assert st.condition("Stalled").status == "True" and st.loaded_on == []


def test_an_adapter_the_gate_refuses_is_incompatible_with_the_rule_named(tmp_path):
    report = loader_report(tmp_path, Engine(), write_adapter(tmp_path / "a", r=32))   # above maxLoraRank 16
    sent = report.adapters[SERVED]
    assert (sent.state, sent.reason) == (AdapterState.Incompatible, Reason.RankTooLarge)
    st = operator_view(report)
    ready = st.condition("Ready")
    assert (st.phase, ready.reason, ready.message) == ("Incompatible", "RankTooLarge", f"replica r-0: {sent.message}")


def test_a_failure_being_retried_shows_its_reason_then_settles_failed(tmp_path):
    """Regression: while the loader retried a failed load, the Adapter said only "waiting for the replicas to
    load" (Loading) and hid why; it now carries the loader's reason and message, as progress, not stalled."""
    engine = Engine(load_error=EngineError(500, "engine busy"))
    first = loader_report(tmp_path, engine, write_adapter(tmp_path / "a"))
    assert (first.adapters[SERVED].state, first.adapters[SERVED].reason) == (AdapterState.Pending, Reason.LoadFailed)
    st = operator_view(first)
    ready = st.condition("Ready")
    assert (st.phase, ready.reason) == ("Loading", "LoadFailed")
    assert "engine busy" in ready.message and "retries" in ready.message
    assert st.condition("Reconciling").status == "True" and st.condition("Stalled") is None
    settled = loader_report(tmp_path / "2", engine, write_adapter(tmp_path / "a2"), passes=2)   # max_attempts=2
    assert settled.adapters[SERVED].state == AdapterState.Failed
    st = operator_view(settled)
    assert (st.phase, st.condition("Ready").reason) == ("Failed", "LoadFailed")


def test_a_loaded_adapter_is_ready_on_the_replica_with_the_rank_its_gate_read(tmp_path):
    """Regression (issue 11, found by `kubectl get lora` in the e2e quickstart): nothing wrote
    status.artifact.rank, so the RANK column was always empty and an Adapter without spec.rank never had the
    artifact's rank checked against maxLoraRank by the operator. The loader now reports the rank its gate read
    and the operator records it with the digest."""
    report = loader_report(tmp_path, Engine(), write_adapter(tmp_path / "a", r=4))
    assert report.adapters[SERVED].rank == 4
    st = operator_view(report)
    assert st.phase == "Ready" and [lo.replica for lo in st.loaded_on] == ["r-0"]
    assert st.artifact.rank == 4 and st.artifact.sha256 == report.adapters[SERVED].sha256


@pytest.mark.parametrize("reason", sorted(OUTCOMES), ids=str)
def test_every_outcome_the_loader_can_report_reads_as_its_state(reason):
    """Each row of the loader's outcome table, as the loader reports it: settled at once (no retry), or Pending
    after a first attempt then its settled state after the last. The operator's phase follows the state (never
    the reason: a NoEffect is Failed, not Incompatible) and Ready carries the loader's reason."""
    outcome = OUTCOMES[reason]

    def report(state: AdapterState, attempts: int) -> ReplicaReport:
        return ReplicaReport(replica="r-0", route="r", generation=1, engine_ready=True, updated_at=T, adapters={
            SERVED: AdapterReport(state=state, reason=reason, message="what the loader found", since=T,
                                  attempts=attempts)})

    if outcome.retry:
        st = operator_view(report(AdapterState.Pending, 1))
        assert (st.phase, st.condition("Ready").reason) == ("Loading", reason)
        assert st.condition("Stalled") is None
    st = operator_view(report(outcome.settles, 1 if not outcome.retry else 5))
    ready = st.condition("Ready")
    assert (st.phase, ready.reason, ready.message) == (PHASE_OF[outcome.settles], reason,
                                                      "replica r-0: what the loader found")
    assert st.condition("Stalled").status == "True"


def test_a_replica_waiting_for_its_engine_is_not_a_failure():
    from loraplane.controllers.adapter import WAITING_REASONS

    assert not WAITING_REASONS & set(OUTCOMES)   # no failure the loader retries reads as plain waiting
    for reason in WAITING_REASONS:
        st = operator_view(ReplicaReport(replica="r-0", route="r", generation=1, engine_ready=False, updated_at=T,
                                         adapters={SERVED: AdapterReport(state="Pending", reason=reason, since=T)}))
        assert (st.phase, st.condition("Ready").reason) == ("Loading", "Loading")


def test_the_sendable_pairs_are_read_from_the_loader_and_refuse_the_old_hand_written_one():
    """support.loader_reports (which the hand-written reports of the status tests go through) is derived from the
    loader's source and outcome table: it knows the progress states, and refuses Incompatible/NoEffect."""
    from support.loader_reports import check_sendable, literal_moves, sendable

    assert {(AdapterState.Fetching, Reason.Fetching), (AdapterState.Ready, Reason.Loaded),
            (AdapterState.Pending, Reason.EngineRestarted)} <= literal_moves()
    assert (AdapterState.Failed, Reason.NoEffect) in sendable()
    with pytest.raises(AssertionError, match="never reports Incompatible/NoEffect.*Failed/NoEffect"):
        check_sendable("Incompatible", "NoEffect")
    # Every Pending reason the loader's loop writes outside its outcome table is one the operator reads as waiting.
    from loraplane.controllers.adapter import WAITING_REASONS

    assert {r for s, r in literal_moves() if s == AdapterState.Pending} | {Reason.Desired} == WAITING_REASONS
