"""kopf handlers of the loraplane operator: `kopf run -m loraplane.controllers.handlers` or `loraplane operator`.

kopf runs the operator: its startup and cleanup handlers start and stop loraplane's `Manager`, and its
watches of the three loraplane kinds (re-lists, reconnects, backoff) feed every event through `on.event`
handlers into the Manager's informers, which schedule the reconciles. The handlers are `on.event` handlers on
purpose: they need no per-object progress or diff-base bookkeeping, so kopf itself writes nothing to the API
server (no finalizer, no annotations, no status.kopf), and every write the operator makes is a change to
children or status. The children (Jobs, Pods, Deployments) are watched by the operator's own label-selected
informers (loraplane.kube.informer): kopf filters labels client-side, so it would stream every pod of every
watched namespace. docs/operator.md, "What kopf does and what loraplane's runtime does", says why.
Settings come from LORAPLANE_* environment variables (controllers.settings.OperatorSettings.from_env).
"""

from __future__ import annotations

import gc
import logging

import kopf

from loraplane.api import KINDS
from loraplane.api.common import GROUP, VERSION
from loraplane.controllers.manager import Manager
from loraplane.controllers.settings import OperatorSettings
from loraplane.kube.client import KubeClient
from loraplane.kube.config import KubeConfig
from loraplane.api.redaction import install_log_redaction

log = logging.getLogger("loraplane.operator")


# ---- authentication ------------------------------------------------------------------------------------------

def _kube_config(memo: kopf.Memo) -> KubeConfig:
    """The one set of credentials of this process, for kopf's connection and the operator's KubeClient alike
    (kept in kopf's operator-wide memo, created by whichever of login and startup runs first)."""
    if memo.get("kube_config") is None:
        memo.kube_config = KubeConfig.from_environment()
        memo.logins = 0
        # Which credentials the operator runs with (in a pod: its service account) is the first thing to check
        # when its calls are refused.
        log.info("Kubernetes API credentials: %s", memo.kube_config.source)
    return memo.kube_config


@kopf.on.login()
async def _login(memo: kopf.Memo, **_) -> kopf.ConnectionInfo:
    """kopf logs in with the operator's own credentials (loraplane.kube.config), so both connections follow
    the same source and the same token refresh. kopf calls this again after an HTTP 401: the credentials
    are then re-read from their source first."""
    config = _kube_config(memo)
    if memo.logins:
        await config.reload()
    memo.logins += 1
    cfg = await config.configuration()
    header = await config.authorization()
    scheme, _, token = header.partition(" ") if header else (None, "", None)
    return kopf.ConnectionInfo(
        server=cfg.host, ca_path=cfg.ssl_ca_cert, insecure=not cfg.verify_ssl,
        scheme=scheme or None, token=token or None,
        certificate_path=cfg.cert_file, private_key_path=cfg.key_file, proxy_url=cfg.proxy)


# ---- lifecycle -----------------------------------------------------------------------------------------------

# kopf's watch of the loraplane kinds (seconds). The server ends each watch after WATCH_SERVER_TIMEOUT and kopf
# resumes it; the client gives up WATCH_CLIENT_GRACE later, so a half-open stream (a dropped connection the
# socket never notices: NAT or load-balancer idle timeouts, a node gone) is dropped and resumed instead of
# hanging silently until the operator restarts. kopf >= 1.44 also reconnects a stream that delivered nothing
# (not even a bookmark) for `watching.inactivity_timeout`; the total timeout is the bound on every version.
WATCH_SERVER_TIMEOUT = 300
WATCH_CLIENT_GRACE = 30
WATCH_CONNECT_TIMEOUT = 30
REQUEST_TIMEOUT = 330


class WatchOnlyDiffBase(kopf.DiffBaseStorage):
    """kopf's "diff base" (the last-handled essence of an object) for an operator without change handlers.

    kopf computes a diff base on every event so that on.create/on.update handlers get a diff; the default
    storage deep-copies the whole object and parses an annotation each time (~8% of the operator's CPU under
    load). loraplane registers only on.event handlers, which get no diff, and its controllers compare state
    themselves: the essence is empty and nothing is stored on the objects."""

    def build(self, *, body, extra_fields=None):
        return {}

    def fetch(self, *, body):
        return {}

    def store(self, *, body, patch, essence) -> None:
        return None


class WatchOnlyProgress(kopf.ProgressStorage):
    """kopf's handler progress storage for an operator without change handlers. kopf keeps the progress of
    on.create/on.update/on.delete handlers (retries, started, stopped) on the objects; on.event handlers have
    none, so nothing is ever fetched or stored. kopf still calls `clear` on both essences of every event (to
    strip progress marks before diffing them); its default storage (annotations and status) deep-copies them
    twice per call (~2% of the operator's CPU under load, issue 17). With WatchOnlyDiffBase both essences are
    empty and new on every event: returned as they are."""

    def fetch(self, *, key, body):
        return None

    def store(self, *, key, record, body, patch) -> None:
        return None

    def purge(self, *, key, body, patch) -> None:
        return None

    def touch(self, *, body, patch, value) -> None:
        return None

    def clear(self, *, essence):
        return essence


def configure_kopf(settings: kopf.OperatorSettings) -> None:
    """kopf's settings for loraplane: no kopf Events (the operator posts its own, only for state changes a user
    needs), no diff base (WatchOnlyDiffBase), and watches that time out on both sides and resume (see
    WATCH_SERVER_TIMEOUT), no handler progress (WatchOnlyProgress)."""
    settings.posting.enabled = False
    settings.persistence.diffbase_storage = WatchOnlyDiffBase()
    settings.persistence.progress_storage = WatchOnlyProgress()
    settings.watching.server_timeout = WATCH_SERVER_TIMEOUT
    settings.watching.client_timeout = WATCH_SERVER_TIMEOUT + WATCH_CLIENT_GRACE
    settings.watching.connect_timeout = WATCH_CONNECT_TIMEOUT
    settings.networking.request_timeout = REQUEST_TIMEOUT


# Python's cyclic garbage collector. Reference counting frees almost everything the operator allocates (JSON
# bodies, parsed models); the collector only finds cycles, yet with its defaults (a young collection every 700
# allocations, a full one whenever the heap grew by a quarter) it walked every object of the process: 25% of the
# operator's CPU in bench_operator.py's settle of 1,050 objects (issue 17). The objects alive once the operator
# has started and listed everything (modules, kopf, the stores) are frozen out of the collector's walks
# (`gc.freeze`, as CPython's docs suggest for long-lived servers), and the young generation is collected every
# GC_THRESHOLDS[0] allocations.
GC_THRESHOLDS = (50_000, 20, 10)


def tune_gc() -> None:
    """Freeze what is alive now out of the cyclic collector's walks and set GC_THRESHOLDS (see there). For the
    operator process only: called once it has started."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def configure_logging() -> None:
    """The operator's log: kopf's per-object chatter at WARNING, and every line written through the root
    logger's handlers (kopf's) scrubbed of credentials (api.redaction): messages and tracebacks quote spec URIs,
    which may be presigned, and API errors."""
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    install_log_redaction()


@kopf.on.startup()
async def _startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger, **_):
    configure_kopf(settings)
    configure_logging()
    op = Manager(OperatorSettings.from_env(), KubeClient(_kube_config(memo)))
    # kopf copies the operator-wide memo into every object's handler kwargs; startup runs before any watch.
    memo.operator = op
    await op.start()
    tune_gc()   # after the start-up LIST: modules, kopf and the stores as listed stay out of the GC's walks
    logger.info("loraplane operator ready: /metrics and /healthz on port %s", op.settings.metrics_port)


@kopf.on.cleanup()
async def _cleanup(memo: kopf.Memo, **_):
    if (op := memo.get("operator")) is not None:
        await op.stop()


# ---- the three loraplane kinds -> the operator's informers ----------------------------------------------------

def _feed(kind: str):
    async def handler(event, memo: kopf.Memo, **_):
        if (op := memo.get("operator")) is not None:
            op.on_event(kind, event.get("type"), event["object"])
    handler.__name__ = handler.__qualname__ = f"feed_{kind}"
    return handler


for _kind in KINDS.values():
    kopf.on.event(GROUP, VERSION, _kind.PLURAL)(_feed(_kind.KIND))
