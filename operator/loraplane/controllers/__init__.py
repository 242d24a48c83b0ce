"""kopf handlers of the loraplane operator: `kopf run -m loraplane.controllers` or `loraplane operator`.

kopf runs the operator: its startup and cleanup handlers start and stop loraplane's `Operator`, and its
watches of the three loraplane kinds (re-lists, reconnects, backoff) feed every event through `on.event`
handlers into the Operator's informers, which schedule the reconciles. The handlers are `on.event` handlers on
purpose: they need no per-object progress or diff-base bookkeeping, so kopf itself writes nothing to the API
server (no finalizer, no annotations, no status.kopf), and every write the operator makes is a change to
children or status. The children (Jobs, Pods, Deployments) are watched by the operator's own label-selected
informers (loraplane.kube.informer): kopf filters labels client-side, so it would stream every pod of every
watched namespace. docs/operator.md, "What kopf does and what loraplane's runtime does", says why.
Settings come from LORAPLANE_* environment variables (controllers.settings.OperatorSettings.from_env).
"""

from __future__ import annotations

import logging

import kopf

from loraplane.controllers.operator import Operator
from loraplane.controllers.settings import OperatorSettings
from loraplane.kube.client import KubeClient

GROUP = "loraplane.io"

# ---- authentication ------------------------------------------------------------------------------------------
# (kopf.on.login: how kopf and the operator's KubeClient get their credentials goes here.)


# ---- lifecycle -----------------------------------------------------------------------------------------------

@kopf.on.startup()
async def _startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger, **_):
    settings.posting.enabled = False        # our own Events, only for state changes a user needs
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 330
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    op = Operator(OperatorSettings.from_env(), KubeClient.from_environment())
    # kopf copies the operator-wide memo into every object's handler kwargs; startup runs before any watch.
    memo.operator = op
    await op.start()
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
    handler.__name__ = f"feed_{kind}"
    return handler


kopf.on.event(GROUP, "v1alpha1", "finetunejobs")(_feed("FineTuneJob"))
kopf.on.event(GROUP, "v1alpha1", "adapters")(_feed("Adapter"))
kopf.on.event(GROUP, "v1alpha1", "modelroutes")(_feed("ModelRoute"))
