"""The real operator, started once per test module against the session's real kube-apiserver.

Module scope, not session: it watches every namespace, so left running it would also reconcile what later
test modules create for their own operator (the chart's namespaced install) and the two would fight.
"""

from __future__ import annotations

import pytest

from support.operator_process import OperatorProcess


@pytest.fixture(scope="module")
def operator(kube_cluster, crds_installed, tmp_path_factory):
    # The spec policy (issue 12, item 6) through the operator's environment, as the chart sets it: the tests'
    # unpullable images are allowed; anything else outside the operator's own images is refused.
    proc = OperatorProcess(kube_cluster.kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log",
                           extra_env={"LORAPLANE_ALLOWED_IMAGES": "registry.invalid/*"}).start()
    yield proc
    proc.stop()
