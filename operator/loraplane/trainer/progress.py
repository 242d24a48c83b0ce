"""Progress reporting: one small interface (`ProgressSink.update`), two sinks.

- `LocalSink`: a tqdm bar plus a JSON file holding the same fields (for `loraplane train` on a laptop);
- `ClusterSink`: patches the FineTuneJob's `status.progress` through the status subresource, at most once
  per `interval` seconds (plus the final update), so a thousand-step run costs the API server a handful of
  writes, not a thousand.

`ProgressCallback` turns transformers' Trainer events into `TrainingProgress` (the API type, so the fields
and their names are the CRD's) and hands them to every sink.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from loraplane.api.common import now_rfc3339
from loraplane.api.finetunejob import TrainingProgress
from loraplane.trainer.config import dump_json_atomic

log = logging.getLogger("loraplane.trainer")


class ProgressSink(Protocol):
    """Where training progress goes: a local file and bar, or the FineTuneJob's status."""

    def update(self, progress: TrainingProgress, final: bool = False) -> None:
        """Take the latest progress; a sink may rate-limit, but must not drop a `final` update."""
        ...

    def close(self) -> None:
        """Send what is pending and release what the sink holds (bar, API client)."""
        ...


class RateLimiter:
    """Lets an event through at most once per `interval` seconds; `force` always passes (and resets)."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self._last: float | None = None

    def allow(self, force: bool = False) -> bool:
        """True (and restart the interval) when `interval` seconds have passed since the last pass, or `force`."""
        now = self.clock()
        if force or self._last is None or now - self._last >= self.interval:
            self._last = now
            return True
        return False


class LocalSink:
    """tqdm bar on stderr + the same fields as JSON in `path` (rewritten atomically, at most once a second)."""

    def __init__(self, path: Path | None, bar: bool = True, file_interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.path = Path(path) if path else None
        self.bar_enabled = bar
        self._bar = None
        self._limiter = RateLimiter(file_interval, clock)

    def update(self, progress: TrainingProgress, final: bool = False) -> None:
        """Advance the bar and rewrite the JSON file (at most every `file_interval` s; `final` always)."""
        if self.bar_enabled:
            self._update_bar(progress)
        if self.path and self._limiter.allow(force=final):
            dump_json_atomic(self.path, progress.wire())

    def _update_bar(self, p: TrainingProgress) -> None:
        from tqdm.auto import tqdm

        if self._bar is None:
            self._bar = tqdm(total=p.total_steps, initial=p.step, unit="step", desc="train", dynamic_ncols=True)
        self._bar.update(p.step - self._bar.n)
        fields = {"loss": p.loss, "eval_loss": p.eval_loss, "lr": p.learning_rate, "tok/s": p.tokens_per_second}
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in fields.items() if v is not None}, refresh=False)

    def close(self) -> None:
        """Close the progress bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class ClusterSink:
    """Patches `status.progress` of one FineTuneJob, rate-limited; API errors are logged, never fatal.

    `patch` defaults to a merge patch through the status subresource with the project's Kubernetes client
    (loraplane.kube; the in-cluster ServiceAccount, to which the operator grants get/patch on this one
    object's status), run from these synchronous callbacks through `BlockingKubeClient`.
    """

    def __init__(self, namespace: str, name: str, interval: float = 10.0,
                 patch: Callable[[dict], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.namespace, self.name = namespace, name
        self._limiter = RateLimiter(interval, clock)
        self._kube = None
        self._patch = patch or self._kubernetes_patch()
        self._pending: TrainingProgress | None = None
        self.patches = 0
        self.failures = 0

    def _kubernetes_patch(self) -> Callable[[dict], None]:
        from loraplane.api.common import GROUP, VERSION
        from loraplane.kube.client import BlockingKubeClient

        # In-cluster credentials; a local run pointed at a cluster (LORAPLANE_JOB_* set by hand) uses the
        # kubeconfig.
        self._kube = kube = BlockingKubeClient(timeout=30)

        def patch(body: dict) -> None:
            kube.patch_status(f"{GROUP}/{VERSION}", "FineTuneJob", self.namespace, self.name, body["status"])
        return patch

    def update(self, progress: TrainingProgress, final: bool = False) -> None:
        """Keep `progress` and patch status.progress when the rate limit allows (`final` always)."""
        self._pending = progress
        if self._limiter.allow(force=final):
            self.flush()

    def flush(self) -> None:
        """Patch status.progress with the pending progress; a failure is counted and logged, and the progress
        stays pending for the next try."""
        if self._pending is None:
            return
        body = {"status": {"progress": self._pending.wire()}}
        try:
            self._patch(body)
            self.patches += 1
            self._pending = None
        except Exception as exc:  # progress is best effort: a flaky API server must not kill training
            self.failures += 1
            log.warning("could not patch %s/%s status.progress: %s", self.namespace, self.name, exc)

    def close(self) -> None:
        """Send the pending progress, then close the API client."""
        self.flush()
        if self._kube is not None:
            self._kube.close()
            self._kube = None


class ProgressTracker:
    """Builds TrainingProgress from step events and hands it to the sinks, at most every `min_interval`
    seconds (plus every evaluation and the final update): a step of a small model takes milliseconds, and
    building and sending progress each step would cost a visible share of it.

    tokens/s and ETA are measured over this process's steps (a resumed run does not count the steps it
    skipped as instantly done)."""

    def __init__(self, sinks: Sequence[ProgressSink], clock: Callable[[], float] = time.monotonic,
                 min_interval: float = 0.5):
        self.sinks = list(sinks)
        self.clock = clock
        self._limiter = RateLimiter(min_interval, clock)
        self._start: float | None = None
        self._start_step = 0
        self._start_tokens = 0
        self._latest: dict[str, float | None] = {"loss": None, "eval_loss": None, "learning_rate": None}
        self.last = TrainingProgress()

    def report(self, *, step: int, total_steps: int | None, epoch: float | None = None, loss: float | None = None,
               eval_loss: float | None = None, learning_rate: float | None = None, tokens_seen: int | None = None,
               final: bool = False) -> TrainingProgress | None:
        """Record a step's numbers; returns the progress sent to the sinks, or None when rate-limited."""
        now = self.clock()
        if self._start is None:
            self._start, self._start_step, self._start_tokens = now, step, tokens_seen or 0
        for key, value in (("loss", loss), ("eval_loss", eval_loss), ("learning_rate", learning_rate)):
            if value is not None:
                self._latest[key] = value
        if not self.sinks or not self._limiter.allow(force=final or eval_loss is not None):
            return None
        elapsed = now - self._start
        done = step - self._start_step
        eta = tps = None
        if elapsed > 0 and done > 0 and total_steps:
            eta = int(round(elapsed / done * max(total_steps - step, 0)))
        if elapsed > 0 and tokens_seen is not None and tokens_seen > self._start_tokens:
            tps = round((tokens_seen - self._start_tokens) / elapsed, 1)
        self.last = TrainingProgress(
            step=step, total_steps=total_steps, epoch=_round(epoch, 4),
            loss=_round(self._latest["loss"], 6), eval_loss=_round(self._latest["eval_loss"], 6),
            learning_rate=self._latest["learning_rate"],
            tokens_per_second=tps if tps is not None else self.last.tokens_per_second,
            eta_seconds=0 if total_steps and step >= total_steps else eta,
            percent=min(100, int(100 * step / total_steps)) if total_steps else None,
            updated_at=now_rfc3339(),
        )
        for sink in self.sinks:
            sink.update(self.last, final=final)
        return self.last

    def close(self) -> None:
        """Close every sink (each sends what is pending)."""
        for sink in self.sinks:
            sink.close()


def _round(value: float | None, digits: int) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


def make_callback(tracker: ProgressTracker):
    """A transformers TrainerCallback feeding `tracker` (imported lazily: transformers is heavy)."""
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        def _send(self, state, logs: dict | None = None, final: bool = False) -> None:
            if not state.is_world_process_zero:
                return
            logs = logs or {}
            tracker.report(step=state.global_step, total_steps=state.max_steps or None, epoch=state.epoch,
                           loss=logs.get("loss"), eval_loss=logs.get("eval_loss"),
                           learning_rate=logs.get("learning_rate"),
                           tokens_seen=getattr(state, "num_input_tokens_seen", None), final=final)

        def on_step_end(self, args, state, control, **kwargs):
            self._send(state)

        def on_log(self, args, state, control, logs=None, **kwargs):
            self._send(state, logs)

        def on_train_end(self, args, state, control, **kwargs):
            self._send(state, final=True)

    return ProgressCallback()
