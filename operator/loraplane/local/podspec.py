"""Run a container the builders made, as a local process: same command, args and env, with the pod's
paths mapped to local folders. This is what keeps `loraplane run` on the cluster's code paths."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

from loraplane.builders.common import SCRATCH_ENV


@dataclass
class LocalPod:
    """How pod-level facts map onto this machine."""

    name: str
    namespace: str = "default"
    # Container path -> local path (longest prefix wins), for arguments that name files in the pod.
    paths: dict[str, str] = field(default_factory=dict)
    # Env values replaced (or, with None, removed) for the local run, e.g. in-cluster-only settings.
    env_overrides: dict[str, str | None] = field(default_factory=dict)

    def map_path(self, value: str) -> str:
        """`value` with its longest matching pod path prefix replaced by the local folder; unchanged otherwise."""
        for prefix in sorted(self.paths, key=len, reverse=True):
            if value == prefix or value.startswith(prefix.rstrip("/") + "/"):
                return self.paths[prefix] + value[len(prefix):]
        return value


def container_argv(container: dict[str, Any], pod: LocalPod) -> list[str]:
    """The container's command + args, with `python3` as this interpreter and pod paths mapped."""
    argv = [*(container.get("command") or []), *(container.get("args") or [])]
    if argv and argv[0] in ("python3", "python"):
        argv[0] = sys.executable
    elif argv and argv[0] == "loraplane":  # the image's console script: this interpreter's copy of the CLI
        argv[:1] = [sys.executable, "-m", "loraplane.cli"]
    out = []
    for a in argv:
        if "=" in a and a.startswith("--"):
            flag, _, val = a.partition("=")
            out.append(f"{flag}={pod.map_path(val)}")
        else:
            out.append(pod.map_path(a))
    return out


def container_env(container: dict[str, Any], pod: LocalPod, base: dict[str, str] | None = None) -> dict[str, str]:
    """The container's env as a dict over `base` (default: this process's env).

    fieldRefs resolve to the local pod's name/namespace; Secret and resource refs are skipped (a local run
    has no Secrets: export the variables yourself if the run needs credentials).
    """
    env = dict(os.environ if base is None else base)
    for e in container.get("env") or []:
        if e.get("name") in SCRATCH_ENV:   # the pod's scratch volume; a local process keeps its own HOME/TMPDIR
            continue
        if "value" in e:
            env[e["name"]] = pod.map_path(str(e["value"]))
        elif field_path := (e.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath"):
            value = {"metadata.name": pod.name, "metadata.namespace": pod.namespace}.get(field_path)
            if value is not None:
                env[e["name"]] = value
    for k, v in pod.env_overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env
