"""kopf handlers of the loraplane operator: `kopf run -m loraplane.controllers` or `loraplane operator`.

kopf watches the loraplane kinds (re-lists, reconnects, backoff); every handler here only feeds the event
into the operator's stores and schedules reconciles (see controllers/runtime.py). The children (Jobs, Pods,
Deployments) are watched by the operator itself with server-side label selectors (Operator.watch_children):
kopf filters labels client-side, so it would stream every pod of every watched namespace. The handlers are `on.event`
handlers on purpose: they need no per-object progress or diff-base bookkeeping, so kopf itself writes
nothing to the API server, and every write the operator makes is a change to children or status.
Settings come from LORAPLANE_* environment variables (see runtime.OperatorSettings.from_env).
"""

from __future__ import annotations

import logging

import kopf

from loraplane.kube.client import KubeClient
from loraplane.kube.config import KubeConfig
from loraplane.controllers.operator import Operator
from loraplane.controllers.runtime import OperatorSettings

GROUP = "loraplane.io"
_op: list[Operator] = []
_config: list[KubeConfig] = []
_logins: list[int] = []


def _kube_config() -> KubeConfig:
    """The one set of credentials of this process: kopf's connection and the operator's KubeClient."""
    if not _config:
        _config.append(KubeConfig.from_environment())
    return _config[0]


@kopf.on.login()
async def _login(**_) -> kopf.ConnectionInfo:
    """kopf logs in with the operator's own credentials (loraplane.kube.config), so both connections follow
    the same source and the same token refresh. kopf calls this again after an HTTP 401: the credentials
    are then re-read from their source first."""
    config = _kube_config()
    if _logins:
        await config.reload()
    _logins.append(1)
    cfg = await config.configuration()
    header = await config.authorization()
    scheme, _, token = header.partition(" ") if header else (None, "", None)
    return kopf.ConnectionInfo(
        server=cfg.host, ca_path=cfg.ssl_ca_cert, insecure=not cfg.verify_ssl,
        scheme=scheme or None, token=token or None,
        certificate_path=cfg.cert_file, private_key_path=cfg.key_file, proxy_url=cfg.proxy)


def current() -> Operator:
    return _op[0]


@kopf.on.startup()
async def _startup(settings: kopf.OperatorSettings, logger, **_):
    settings.posting.enabled = False        # our own Events, only for state changes a user needs
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf.progress")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="loraplane.io")
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 330
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    op = Operator(OperatorSettings.from_env(), KubeClient(_kube_config()))
    _op[:] = [op]
    await op.start()
    logger.info("loraplane operator ready: /metrics and /healthz on port %s", op.settings.metrics_port)


@kopf.on.cleanup()
async def _cleanup(**_):
    if _op:
        await _op[0].stop()


def _feed(kind: str):
    async def handler(event, **_):
        if _op:
            _op[0].on_event(kind, event.get("type"), event["object"])
    handler.__name__ = f"feed_{kind}"
    return handler


kopf.on.event(GROUP, "v1alpha1", "finetunejobs")(_feed("FineTuneJob"))
kopf.on.event(GROUP, "v1alpha1", "adapters")(_feed("Adapter"))
kopf.on.event(GROUP, "v1alpha1", "modelroutes")(_feed("ModelRoute"))
