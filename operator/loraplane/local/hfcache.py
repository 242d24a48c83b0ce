"""Make a local model directory resolvable by its hub id, offline, through a private Hugging Face cache.

With the model in `$HF_HOME/hub` under its id and `HF_HUB_OFFLINE=1`, the trainer, vLLM and the loader load
`loraplane/tiny-llama` (or any id) exactly as they would in a pod with a warm model cache: no path rewriting,
the same code as in the cluster. Files are symlinked, not copied.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def install(repo_id: str, model_dir: Path, hf_home: Path, revision: str = "main") -> Path:
    """Expose `model_dir` as model `repo_id` at `revision` in `hf_home`; returns the snapshot folder."""
    model_dir = Path(model_dir).resolve()
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    # A stable fake commit id: changes when the files do, so a rebuilt model gets a fresh snapshot.
    digest = hashlib.sha1()
    for f in files:
        st = f.stat()
        digest.update(f"{f.relative_to(model_dir)}:{st.st_size}:{st.st_mtime_ns}".encode())
    commit = digest.hexdigest()
    repo = Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for f in files:
        link = snapshot / f.relative_to(model_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(f)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    tmp = repo / "refs" / f".{revision}.tmp-{os.getpid()}"
    tmp.write_text(commit)
    os.replace(tmp, repo / "refs" / revision)
    return snapshot
