#!/usr/bin/env bash
# Build kube-apiserver + kube-controller-manager + kube-scheduler v1.20.2 from Debian bookworm's `kubernetes` source package,
# offline (the tree vendors its dependencies), and install etcd from Debian. No registry ships these binaries
# and there is no container runtime here, so this is how the tests get a *real* API server.
#
# The binaries are cached outside the clone (default ~/.cache/loraplane/kube-v1.20.2/bin); a second run with
# the binaries present does nothing; a cache holding only some of them (an older cache without the scheduler)
# builds only the missing ones. Usage: tests/harness/build_kube.sh [CACHE_DIR]
set -euo pipefail

DEB_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
KUBE_VERSION="v1.20.2"
CACHE="${1:-${LORAPLANE_CACHE:-$HOME/.cache/loraplane}}"
BIN="$CACHE/kube-$KUBE_VERSION/bin"

# Two runs at once (a test run and a benchmark, say) would delete each other's work tree: the second waits.
mkdir -p "$CACHE"
exec 9>"$CACHE/build_kube.lock"
flock 9

CMDS=(kube-apiserver kube-controller-manager kube-scheduler)
missing=()
for cmd in "${CMDS[@]}"; do [[ -x "$BIN/$cmd" ]] || missing+=("$cmd"); done
have_bins() { ((${#missing[@]} == 0)); }
need_pkgs=()
command -v etcd >/dev/null || need_pkgs+=(etcd-server)
if ! have_bins; then
  command -v go >/dev/null || need_pkgs+=(golang-go)
  command -v dpkg-source >/dev/null || need_pkgs+=(dpkg-dev)
  command -v rsync >/dev/null || need_pkgs+=(rsync)
  command -v make >/dev/null || need_pkgs+=(make)
  [[ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ]] || need_pkgs+=(golang-github-modern-go-reflect2-dev)
fi
if ((${#need_pkgs[@]})); then
  echo "build_kube: apt-get install ${need_pkgs[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  # tests/bootstrap.sh may run apt-get at the same time (tests/run.sh starts both): one apt at a time.
  flock /tmp/loraplane-apt.lock bash -c 'apt-get update -qq &&
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null' _ "${need_pkgs[@]}"
fi
if have_bins; then
  echo "build_kube: cached binaries in $BIN" >&2
  exit 0
fi

WORK="$CACHE/kube-build"
rm -rf "$WORK"
mkdir -p "$WORK/apt/lists/partial" "$WORK/src"
# A private deb-src list pointing at the mirror apt already uses, so the system's apt config is untouched.
mirror=$(grep -rhE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -1 || true)
if [[ -z "$mirror" ]]; then
  mirror=$(grep -rhE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | grep -v security \
           | grep -oE 'https?://[^ ]+' | head -1 || true)
fi
[[ -n "$mirror" ]] || { echo "build_kube: cannot find the Debian mirror apt uses" >&2; exit 1; }
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bookworm main" >"$WORK/apt/sources.list"
APT_OPTS=(-o "Dir::Etc::SourceList=$WORK/apt/sources.list" -o "Dir::Etc::SourceParts=/nonexistent"
          -o "Dir::State::Lists=$WORK/apt/lists")
apt-get "${APT_OPTS[@]}" update -qq
(cd "$WORK/src" && apt-get "${APT_OPTS[@]}" source -qq "kubernetes=$DEB_VERSION" >/dev/null)
tree=$(find "$WORK/src" -maxdepth 1 -mindepth 1 -type d -name 'kubernetes-*' | head -1)

export GOPATH="$WORK/gopath"
mkdir -p "$GOPATH/src/k8s.io"
mv "$tree" "$GOPATH/src/k8s.io/kubernetes"
cd "$GOPATH/src/k8s.io/kubernetes"
# reflect2 v1.0.1 (vendored) crashes Go >= 1.18 on the first custom-resource create; Debian's 1.0.2 does not.
rm -rf vendor/github.com/modern-go/reflect2
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
rm -f vendor/github.com/modern-go/reflect2/go.mod

export GO111MODULE=off GOPROXY=off GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=vendor
export GOCACHE="$WORK/gocache"
unset GOFLAGS
# The generated OpenAPI definitions are not shipped in the source package.
make gen_openapi >"$WORK/gen_openapi.log" 2>&1 || { tail -30 "$WORK/gen_openapi.log"; exit 1; }
LDFLAGS="-s -w -X k8s.io/kubernetes/vendor/k8s.io/component-base/version.gitVersion=$KUBE_VERSION \
 -X k8s.io/kubernetes/vendor/k8s.io/component-base/version.gitMajor=1 \
 -X k8s.io/kubernetes/vendor/k8s.io/component-base/version.gitMinor=20 \
 -X k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION"
mkdir -p "$WORK/out"
for cmd in "${missing[@]}"; do
  echo "build_kube: go build $cmd (several minutes)" >&2
  go build -ldflags "$LDFLAGS" -o "$WORK/out/$cmd" "./cmd/$cmd"
done
mkdir -p "$BIN"
mv "$WORK/out/"* "$BIN/"
cd /
rm -rf "$WORK"   # ~2.5 GB of sources and Go cache; only the binaries are kept
echo "build_kube: built $BIN" >&2
