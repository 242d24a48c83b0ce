"""Label and annotation keys loraplane writes on the objects it manages, and its field manager name.

They are part of the API: users select on the labels (`kubectl get pods -l loraplane.io/route=NAME`), the loader
and the operator exchange the replica report through REPORT_ANNOTATION, and a produced Adapter keeps its
FineTuneJob's uid in PRODUCED_BY_ANNOTATION across operator restarts. Label keys follow Kubernetes' prefixed
form (`<dns-prefix>/<name>`, names at most 63 characters).
"""

from __future__ import annotations

PREFIX = "loraplane.io"
# The server-side apply field manager of every write the operator makes (metadata.managedFields[].manager).
MANAGER = "loraplane"

# --- labels --------------------------------------------------------------------------------------------------
FINETUNEJOB_LABEL = f"{PREFIX}/finetunejob"   # children of a FineTuneJob (Job, pods, ConfigMap, RBAC)
COMPONENT_LABEL = f"{PREFIX}/component"       # which part a child is (trainer, engine, router, …)
ROUTER_LABEL = f"{PREFIX}/router"             # the router pods of a ModelRoute
ROUTE_LABEL = f"{PREFIX}/route"               # the engine replicas of a ModelRoute (their reports are aggregated)

# --- annotations ---------------------------------------------------------------------------------------------
HASH_ANNOTATION = f"{PREFIX}/spec-hash"       # hash of a child's desired manifest: unchanged children are not re-applied
# A replica's ReplicaReport JSON, copied from its loader's /status by the operator (controllers/reports.py).
REPORT_ANNOTATION = f"{PREFIX}/adapters"
# On a produced Adapter: the uid of the FineTuneJob whose output its current version is, so a restarted operator
# does not bump the version a second time.
PRODUCED_BY_ANNOTATION = f"{PREFIX}/produced-by"
