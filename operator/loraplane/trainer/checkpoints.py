"""Checkpoints that survive preemption: only complete ones are resumed from.

transformers writes `checkpoint-<step>/` file by file; a pod killed in the middle leaves a directory that
looks like a checkpoint but is not one. After the Trainer has written every file of a checkpoint, the
callback below fsyncs them and then writes the marker `loraplane-complete.json` (atomically). On start, the
newest checkpoint *with* the marker is resumed from and unmarked ones are deleted. Rotation (keeping the
newest `keep`) happens only after the new checkpoint is marked, so a complete checkpoint always exists.

SIGTERM (Kubernetes preemption, node drain, `kubectl delete pod`) sets a flag; at the end of the current
step the Trainer saves a checkpoint and stops, and the process exits with EXIT_PREEMPTED.

With an `s3://` output there may be no volume that outlives the pod, so complete checkpoints are mirrored to
S3 (`S3CheckpointMirror`, by default `<output uri>.checkpoints/`) with the same rule: the marker object is
uploaded last and only checkpoints with it are restored.
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
from loraplane.storage.errors import AccessDenied, NoCredentials, NotFound, StorageError
from loraplane.trainer.config import spec_uri
from loraplane.trainer.errors import InvalidConfig, OutputWriteFailed

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
    """True when the checkpoint directory's MARKER file says complete (written last by `mark_complete`)."""
    try:
        return json.loads((Path(path) / MARKER).read_text()).get("complete") is True
    except (OSError, ValueError):
        return False


def latest_complete(folder: Path) -> Path | None:
    """The complete checkpoint with the highest step in `folder`, or None."""
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
    """fsync every file of the checkpoint, then atomically write its MARKER (step, time) and fsync the
    directory: a checkpoint counts as complete only once all of it is on disk."""
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
        """True once SIGTERM or SIGINT was received: save at the end of this step and exit."""
        return self.signal is not None

    def install(self) -> None:
        """Handle SIGTERM and SIGINT (a second SIGINT raises KeyboardInterrupt); only on the main thread,
        where Python allows signal handlers, else nothing."""
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
        """Restore the signal handlers `install` replaced."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class S3CheckpointMirror:
    """Complete checkpoints copied to s3://BUCKET/PREFIX/checkpoint-<step>/, restorable on a fresh pod.

    Upload order makes a remote checkpoint complete exactly when its marker object exists: every file first,
    the marker last. Restore picks the newest remote checkpoint with a marker, downloads it (marker last) and
    leaves the local rules (`latest_complete`) to do the rest. Remote rotation keeps the newest `keep`.
    Upload failures are logged, not raised: a multi-hour run must not die because a mirror write failed; the
    local checkpoint still exists and the next save tries again.
    """

    def __init__(self, uri: str, keep: int):
        from loraplane.storage.fetchers.s3 import S3Fetcher

        self.uri = uri.rstrip("/")
        parsed = spec_uri(self.uri, "the checkpoint mirror")
        self.bucket, self.prefix = parsed.bucket or "", parsed.key.strip("/")
        self.keep = keep
        self.store = S3Fetcher()

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def _remote(self) -> dict[int, dict[str, int]]:
        """step -> {relative key: size} of every remote checkpoint, complete or not."""
        found: dict[int, dict[str, int]] = {}
        start = self._key("") + "/" if self.prefix else ""
        for key, size in self.store.list_objects(self.bucket, start, uri=self.uri).items():
            head, _, rest = key[len(start):].partition("/")
            if (m := _CHECKPOINT_RE.match(head)) and rest:
                found.setdefault(int(m.group(1)), {})[rest] = size
        return found

    def complete_steps(self) -> list[int]:
        """Steps of the remote checkpoints whose marker object exists, ascending. Raises StorageError."""
        return sorted(step for step, files in self._remote().items() if MARKER in files)

    def push(self, path: Path) -> bool:
        """Upload one complete local checkpoint (marker last) and rotate the remote ones; returns False
        (logged) when an upload fails."""
        path = Path(path)
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.name != MARKER)
        try:
            for f in [*files, path / MARKER]:  # the marker last: it makes the remote copy complete
                self.store.upload_file(f, self.bucket, self._key(path.name, f.relative_to(path).as_posix()))
            self._rotate()
        except (StorageError, OSError) as exc:
            log.warning("could not mirror %s to %s (%s); it stays local, the next checkpoint tries again",
                        path.name, self.uri, exc)
            return False
        log.info("checkpoint %s mirrored to %s", path.name, self.uri)
        return True

    def _rotate(self) -> None:
        remote = self._remote()
        complete = sorted(step for step, files in remote.items() if MARKER in files)
        newest = complete[-1] if complete else None
        # Older than the newest `keep` complete ones, and torn uploads older than the newest complete one.
        stale = [s for s in complete[:-self.keep]] + [s for s in remote if s not in complete and newest and s < newest]
        for step in stale:
            self.store.delete_keys(self.bucket, [self._key(f"checkpoint-{step}", rel) for rel in remote[step]])

    def restore(self, folder: Path) -> Path | None:
        """Download the newest complete remote checkpoint into `folder` unless a local one is as new.

        The processes of one node (torchrun) share `folder`: a file lock lets the first download and the
        others find it already there."""
        import fcntl

        Path(folder).mkdir(parents=True, exist_ok=True)
        with open(Path(folder) / ".restore.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._restore(folder)

    def _restore(self, folder: Path) -> Path | None:
        fix = ("check spec.output.uri's bucket and the credentials (they need s3:ListBucket, GetObject, PutObject "
               "and DeleteObject on it)")
        try:
            remote = self._remote()
        except NoCredentials as exc:
            raise InvalidConfig(f"checkpoints at {self.uri}: no AWS credentials; {fix}") from exc
        except (NotFound, AccessDenied) as exc:  # wrong bucket or credentials: a retry won't help
            raise InvalidConfig(f"checkpoints at {self.uri}: {exc.code or exc.detail}; {fix}") from exc
        except StorageError as exc:
            raise OutputWriteFailed(f"listing checkpoints at {self.uri} failed: {exc}; check AWS_ENDPOINT_URL "
                                    "and the network") from exc
        complete = sorted(step for step, files in remote.items() if MARKER in files)
        local = latest_complete(folder)
        local_step = int(local.name.split("-")[1]) if local else -1
        if not complete or complete[-1] <= local_step:
            return None
        step = complete[-1]
        dest = Path(folder) / f"checkpoint-{step}"
        shutil.rmtree(dest, ignore_errors=True)
        rels = sorted(remote[step], key=lambda rel: rel == MARKER)  # the marker last, as on upload
        try:
            for rel in rels:
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                self.store.download_key(self.bucket, self._key(dest.name, rel), target)
        except (StorageError, OSError) as exc:
            shutil.rmtree(dest, ignore_errors=True)
            raise OutputWriteFailed(f"downloading checkpoint-{step} from {self.uri} failed: {exc}") from exc
        log.info("restored checkpoint-%d from %s", step, self.uri)
        return dest


def make_callback(folder: Path, keep: int, preemption: Preemption, mirror: S3CheckpointMirror | None = None):
    """A transformers TrainerCallback that stops and saves at the step's end once preemption is requested,
    and on each save (main process only) marks the checkpoint complete, rotates to `keep` and mirrors it."""
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
                    if mirror is not None:
                        mirror.push(path)

    return CheckpointCallback()
