#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs (the .venv, the locally built
# kube-apiserver/etcd, cached outside the clone), then runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# The kube-apiserver build (first time only, CPU-bound Go) overlaps the venv install (mostly downloads).
bash tests/harness/build_kube.sh &
kube_build=$!
bash tests/bootstrap.sh
wait "$kube_build"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
