"""Checkpoints that survive preemption: only complete ones are resumed from.

transformers writes `checkpoint-<step>/` file by file; a pod killed in the middle leaves a directory that
looks like a checkpoint but is not one. After the Trainer has written every file of a checkpoint, the
callback below fsyncs them and then writes the marker `loraplane-complete.json` (atomically). On start, the
newest checkpoint *with* the marker is resumed from and unmarked ones are deleted. Rotation (keeping the
newest `keep`) happens only after the new checkpoint is marked, so a complete checkpoint always exists.

SIGTERM (Kubernetes preemption, node drain, `kubectl delete pod`) sets a flag; at the end of the current
step the Trainer saves a checkpoint and stops, and the process exits with EXIT_PREEMPTED.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import threading
from pathlib import Path

from loraplane.api.common import now_rfc3339

log = logging.getLogger("loraplane.trainer")
MARKER = "loraplane-complete.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of checkpoint directories, oldest first, complete or not."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def is_complete(path: Path) -> bool:
    try:
        return json.loads((Path(path) / MARKER).read_text()).get("complete") is True
    except (OSError, ValueError):
        return False


def latest_complete(folder: Path) -> Path | None:
    complete = [p for _, p in checkpoints(folder) if is_complete(p)]
    return complete[-1] if complete else None


def remove_incomplete(folder: Path) -> list[Path]:
    """Delete checkpoint directories without the marker (left by a process killed while saving)."""
    removed = []
    for _, path in checkpoints(folder):
        if not is_complete(path):
            log.warning("ignoring and removing incomplete checkpoint %s (the run stopped while writing it)", path)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def mark_complete(path: Path, step: int) -> None:
    path = Path(path)
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    tmp = path / f".{MARKER}.tmp"
    tmp.write_text(json.dumps({"complete": True, "step": step, "savedAt": now_rfc3339()}) + "\n")
    os.replace(tmp, path / MARKER)
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rotate(folder: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints."""
    complete = [p for _, p in checkpoints(folder) if is_complete(p)]
    for path in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


class Preemption:
    """Records SIGTERM (and SIGINT, for Ctrl-C in local runs) instead of dying mid-step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (in-process test runs)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal = signum
        log.warning("received %s: saving a checkpoint at the end of this step, then exiting",
                    signal.Signals(signum).name)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def make_callback(folder: Path, keep: int, preemption: Preemption):
    from transformers import TrainerCallback

    class CheckpointCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if preemption.requested:
                control.should_save = True
                control.should_training_stop = True

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                path = Path(folder) / f"checkpoint-{state.global_step}"
                if path.is_dir():
                    mark_complete(path, state.global_step)
                    rotate(folder, keep)

    return CheckpointCallback()
