#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs (the .venv, the locally built
# kube-apiserver/etcd, cached outside the clone), then runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/bootstrap.sh
bash tests/harness/build_kube.sh
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
