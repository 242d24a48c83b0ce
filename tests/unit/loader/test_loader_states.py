"""The loader's control loop against a fake vLLM: which AdapterState and Reason each outcome reports."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from support.adapters import write_adapter
from loraplane.api.reasons import Reason
from loraplane.api.wire.serving import AdapterState, DesiredAdapter, ServingTable
from loraplane.loader.engine import EngineError, Probe
from loraplane.loader.reconciler import Loader
from loraplane.storage.cache import ArtifactCache

BASE = "loraplane/tiny-llama"


class FakeEngine:
    """Just enough of VllmClient: a set of loaded adapters, a load error to raise, distinct probe outputs."""

    base_url = "http://fake-vllm"

    def __init__(self, load_error: EngineError | None = None, healthy: bool = True,
                 probe_error: EngineError | None = None, probe_logprobs: tuple[float, ...] = (0.0,)):
        self.loaded: dict[str, str] = {}
        self.load_error = load_error
        self.is_healthy = healthy
        self.probe_error = probe_error          # raised by probes through an adapter (not the base model)
        self.probe_logprobs = probe_logprobs    # what probes through an adapter report
        self.loads = 0

    async def healthy(self) -> bool:
        return self.is_healthy

    async def loaded_adapters(self) -> dict[str, str]:
        return dict(self.loaded)

    async def load(self, name: str, path: str) -> None:
        self.loads += 1
        if self.load_error:
            raise self.load_error
        self.loaded[name] = path

    async def unload(self, name: str) -> None:
        self.loaded.pop(name, None)

    async def probe(self, model: str, prompt: str, max_tokens: int) -> Probe:
        if model in self.loaded:
            if self.probe_error:
                raise self.probe_error
            return Probe(text=model, tokens=(model,), logprobs=self.probe_logprobs)
        return Probe(text=model, tokens=(model,), logprobs=(0.0,))


def _table(*adapters: DesiredAdapter) -> ServingTable:
    return ServingTable(route="r", base_model=BASE, served_model_name="base", max_lora_rank=16, max_loras=4,
                        adapters=list(adapters))


def _want(name: str, uri: str) -> DesiredAdapter:
    return DesiredAdapter(served_name=name, adapter=name, uri=uri, base_model=BASE)


def _run(tmp_path, engine: FakeEngine, *adapters: DesiredAdapter) -> Loader:
    loader = Loader(engine, ArtifactCache(tmp_path / "cache", 1 << 30), "replica-0", max_attempts=2,
                    backoff_base=0.0)
    loader.set_table(_table(*adapters))
    asyncio.run(loader.reconcile_once())
    return loader


def _state(loader: Loader, name: str) -> tuple[AdapterState, str]:
    entry = loader.report().adapters[name]
    return entry.state, entry.reason


def test_a_compatible_adapter_becomes_ready_and_is_counted(tmp_path):
    loader = _run(tmp_path, FakeEngine(), _want("ok", str(write_adapter(tmp_path / "ok"))))
    assert _state(loader, "ok") == (AdapterState.Ready, Reason.Loaded)
    assert loader.metrics.adapters.labels(AdapterState.Ready)._value.get() == 1
    assert loader.metrics.adapters.labels(AdapterState.Failed)._value.get() == 0


def test_the_gate_refuses_as_incompatible(tmp_path):
    loader = _run(tmp_path, FakeEngine(), _want("big", str(write_adapter(tmp_path / "big", r=32))))
    assert _state(loader, "big") == (AdapterState.Incompatible, Reason.RankTooLarge)


@pytest.mark.parametrize("status,message,expected", [
    (400, "LoRA rank 32 is greater than max_lora_rank 16.", (AdapterState.Incompatible, Reason.RankTooLarge)),
    (400, "The lora adapter 'a' has already been loaded.", (AdapterState.Pending, Reason.AlreadyLoaded)),
    (404, "No adapter found", (AdapterState.Pending, Reason.AdapterNotFound)),
    (500, "boom", (AdapterState.Pending, Reason.LoadFailed)),
    (400, "Error while deserializing header: HeaderTooLarge", (AdapterState.Incompatible, Reason.InvalidAdapter)),
    (400, "While loading /c/a, expected target modules in ['q_proj'] but received ['c_attn'].",
     (AdapterState.Incompatible, Reason.TargetModulesNotFound)),
])
def test_engine_refusals_are_classified(tmp_path, status, message, expected):
    loader = _run(tmp_path, FakeEngine(EngineError(status, message)),
                  _want("a", str(write_adapter(tmp_path / "a"))))
    assert _state(loader, "a") == expected


def test_a_missing_artifact_is_retried(tmp_path):
    loader = _run(tmp_path, FakeEngine(), _want("gone", str(tmp_path / "nowhere")))
    assert _state(loader, "gone") == (AdapterState.Pending, Reason.FetchFailed)


def test_waiting_for_the_engine_and_unloading(tmp_path):
    loader = _run(tmp_path, FakeEngine(healthy=False), _want("a", str(write_adapter(tmp_path / "a"))))
    assert _state(loader, "a") == (AdapterState.Pending, Reason.Desired)
    engine = FakeEngine()
    engine.loaded["old"] = "/somewhere"
    loader = _run(tmp_path, engine)
    loader.set_table(_table(_want("old", "/somewhere")))
    loader.set_table(_table())
    assert _state(loader, "old") == (AdapterState.Unloading, Reason.NotDesired)


@pytest.mark.timeout(60)   # the symlink to /dev/zero used to be copied forever
def test_hostile_adapters_are_incompatible_with_the_rule_named(tmp_path):
    """Issue 12, item 4: a hostile artifact ends Incompatible with its reason, beside a healthy adapter that
    still becomes Ready (the replica keeps serving); nothing is retried."""
    zero = write_adapter(tmp_path / "zero")
    (zero / "x.bin").symlink_to("/dev/zero")       # used to copy forever
    header = write_adapter(tmp_path / "header")
    (header / "adapter_model.safetensors").write_bytes((100_000_000).to_bytes(8, "little") + b"{")
    regex = write_adapter(tmp_path / "regex", extra_config={"target_modules": r"(q)\1_proj"})
    loader = _run(tmp_path, FakeEngine(), _want("zero", str(zero)), _want("header", str(header)),
                  _want("regex", str(regex)), _want("ok", str(write_adapter(tmp_path / "ok"))))
    assert _state(loader, "zero") == (AdapterState.Incompatible, Reason.UnsafeArtifact)
    assert _state(loader, "header") == (AdapterState.Incompatible, Reason.ArtifactTooLarge)
    assert _state(loader, "regex") == (AdapterState.Incompatible, Reason.InvalidTargetModules)
    assert _state(loader, "ok") == (AdapterState.Ready, Reason.Loaded)
    assert loader.report().adapters["zero"].attempts == 1


def test_failures_that_cannot_change_settle_on_the_first_attempt(tmp_path):
    # adapter_config.json's r disagrees with the tensors' rank: was served as Ready.
    engine = FakeEngine()
    loader = _run(tmp_path, engine, _want("r", str(write_adapter(tmp_path / "r", r=8, extra_config={"r": 4}))))
    assert _state(loader, "r") == (AdapterState.Incompatible, Reason.InvalidAdapter)
    assert "r is 4 but its lora_A is [8, 128]" in loader.report().adapters["r"].message
    # NaN weights: found by the gate, never sent to vLLM.
    nan = write_adapter(tmp_path / "nan", extra_tensors={
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.full((128, 8), np.nan, np.float32)})
    loader = _run(tmp_path, engine, _want("nan", str(nan)))
    assert _state(loader, "nan") == (AdapterState.Incompatible, Reason.NonFiniteWeights)
    assert engine.loads == 0 and loader.report().adapters["nan"].attempts == 1


@pytest.mark.parametrize("engine", [
    # vLLM cannot serialise NaN log-probabilities: was "LoadFailed: vLLM refused the load" after 5 attempts
    FakeEngine(probe_error=EngineError(500, "Out of range float values are not JSON compliant")),
    FakeEngine(probe_logprobs=(float("nan"),)),   # an engine that does send them
], ids=["500", "nan"])
def test_nonfinite_probe_output_fails_at_once_and_unloads(tmp_path, engine):
    loader = _run(tmp_path, engine, _want("a", str(write_adapter(tmp_path / "a"))))
    entry = loader.report().adapters["a"]
    assert (entry.state, entry.reason, entry.attempts) == (AdapterState.Failed, Reason.NonFiniteOutput, 1)
    assert "smoke-test completion" in entry.message and "a" not in engine.loaded


def test_a_transient_probe_error_is_retried_then_fails_and_unloads(tmp_path):
    engine = FakeEngine(probe_error=EngineError(500, "engine busy"))
    loader = _run(tmp_path, engine, _want("a", str(write_adapter(tmp_path / "a"))))
    assert _state(loader, "a") == (AdapterState.Pending, Reason.LoadFailed)
    assert "vLLM refused the load" not in loader.report().adapters["a"].message
    asyncio.run(loader.reconcile_once())   # max_attempts=2
    assert _state(loader, "a") == (AdapterState.Failed, Reason.LoadFailed) and "a" not in engine.loaded


def test_the_outcome_table_covers_every_reason_a_bring_up_reports():
    from loraplane.loader import gate
    from loraplane.loader.engine import LOAD_REFUSALS, PROBE_REFUSALS
    from loraplane.loader.reconciler import OUTCOMES
    from loraplane.storage import cache

    reported = ({r.reason for r in gate.RULES} | {r.reason for r in LOAD_REFUSALS + PROBE_REFUSALS}
                | {Reason.LoadFailed, Reason.NoEffect, Reason.NonFiniteOutput, Reason.InternalError}
                # reasons the cache gives per instance (storage.cache.ArtifactCache._materialise, _download)
                | {Reason.UnsafeArtifact, Reason.ArtifactTooLarge, Reason.InsecureSource})
    fetch_errors = [cache.FetchError, *cache.FetchError.__subclasses__()]
    assert reported | {e.reason for e in fetch_errors} <= set(OUTCOMES)
    for e in fetch_errors:   # the storage layer's own flag agrees with the table
        assert OUTCOMES[e.reason].retry == e.retryable, e
    for reason in {r.reason for r in gate.RULES}:   # what the gate refuses is never retried
        assert OUTCOMES[reason].settles == AdapterState.Incompatible and not OUTCOMES[reason].retry
