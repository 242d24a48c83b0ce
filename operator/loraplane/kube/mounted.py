"""Files the kubelet mounts from ConfigMaps and Secrets, re-read while a program runs: change detection.

Used by the serving-table file source (kube.tablewatch) and the router's API keys (router.auth)."""

from __future__ import annotations

import os
from pathlib import Path


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """`(inode, mtime in ns, size)` of `path` (symlinks followed), or None when it does not exist.

    Compare two stamps to tell whether the file changed without reading it (one stat). The inode is part
    of it because the kubelet updates a mounted ConfigMap or Secret by an atomic swap of a symlinked
    folder: the new file can have the old size and, at coarse clock resolution, the old mtime.
    Raises OSError other than FileNotFoundError (e.g. permission denied).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)
