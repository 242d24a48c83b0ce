"""`loraplane fetch-model`: put an `s3://` or `https://` base model on the replica's model volume.

It runs as the engine pod's init container, before vLLM, whose `--model` names the directory it leaves
(`storage.uri.fetched_model_path(cache_dir, uri)`). The download goes through the verified cache (temporary
directory, verified, renamed into place, metadata last), so a pod restarted mid-download starts clean and a
complete copy is not fetched twice. A failure writes {"reason": "ModelFetchFailed", "message"} to the
termination-message path, as the trainer does: the ModelRoute's status shows it, not only the container log.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from loraplane.api.paths import PVC_ROOT
from loraplane.api.reasons import Reason
from loraplane.api.wire.trainer import TerminationMessage, write_termination_message
from loraplane.api.redaction import install_log_redaction, redacted, scrubbed
from loraplane.loader.cli import add_fetch_policy_arguments
from loraplane.storage.cache import FetchError, model_cache
from loraplane.storage.fetchers import FetchPolicy
from loraplane.storage.uri import fetched_model_path

log = logging.getLogger("loraplane.loader")


def add_fetch_model_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `loraplane fetch-model`: the base model URI, the model volume's folder, the expected
    sha256 and where PVCs are mounted."""
    p.add_argument("uri", help="s3://BUCKET/PREFIX (a model directory or one .tar.gz) or an https:// archive")
    p.add_argument("--cache-dir", type=Path, required=True,
                   help="the model volume's folder; the model lands in CACHE_DIR/<key of the URI>")
    p.add_argument("--sha256", help="expected digest (archive sha256 or the directory's sha256_dir)")
    p.add_argument("--pvc-root", default=PVC_ROOT)
    add_fetch_policy_arguments(p)


def fetch_model_main(args: argparse.Namespace) -> int:
    """Fetch and verify the base model into CACHE_DIR/<cache key of the URI>; returns 0, or 1 after writing
    a ModelFetchFailed termination message when the fetch fails."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_redaction()
    try:
        policy = FetchPolicy(allow_insecure_http=args.allow_insecure_http)
        art = asyncio.run(model_cache(args.cache_dir, args.pvc_root, policy).fetch(args.uri, args.sha256))
    except FetchError as exc:
        message = scrubbed(f"spec.baseModel.uri {redacted(args.uri)}: {exc}; check the URI, that the model is a "
                           "save_pretrained directory (or a .tar.gz of one) and spec.baseModel.credentialsSecretRef")
        print(f"error: {message}", file=sys.stderr)
        # $LORAPLANE_TERMINATION_LOG; the ModelRoute's status quotes it.
        write_termination_message(TerminationMessage(reason=Reason.ModelFetchFailed, message=message).to_json())
        return 1
    assert art.path == fetched_model_path(args.cache_dir, args.uri)
    log.info("base model %s at %s (%d bytes, sha256 %s)", redacted(args.uri), art.path, art.size_bytes, art.sha256)
    return 0
