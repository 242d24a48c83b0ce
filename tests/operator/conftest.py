"""The real operator, started once per session against the session's real kube-apiserver."""

from __future__ import annotations

import pytest

from operator_process import OperatorProcess


@pytest.fixture(scope="session")
def operator(kube_cluster, crds_installed, tmp_path_factory):
    proc = OperatorProcess(kube_cluster.kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log").start()
    yield proc
    proc.stop()
