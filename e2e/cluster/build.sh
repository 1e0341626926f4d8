#!/usr/bin/env bash
# Builds the local control plane (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
# etcd, kwok, helm) from the Go module proxy at the versions pinned in versions.env, into a cache
# outside the checkout. A binary already in the cache is reused, so only a machine's first run pays.
#
#   e2e/cluster/build.sh          # build what is missing, print the bin directory
#
# Environment: APPSET_CACHE (default ~/.cache/appset).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache="${APPSET_CACHE:-$HOME/.cache/appset}"
bin="$cache/bin"
mkdir -p "$bin" "$cache/build"
# One build at a time per cache: a second caller waits and then finds the binaries built.
exec 9>"$cache/.build.lock"
flock 9
export GOWORK=off CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod

log() { echo "[build] $*" >&2; }

have() { # have NAME VERSION: the cached binary exists and was built at that version
  [[ -x "$bin/$1" && "$(cat "$bin/.$1.version" 2>/dev/null)" == "$2" ]]
}
stamp() { echo "$2" >"$bin/.$1.version"; }

build_kubernetes() {
  local v="$K8S_VERSION" names=(kube-apiserver kube-controller-manager kube-scheduler kubectl) missing=0
  for n in "${names[@]}"; do have "$n" "$v" || missing=1; done
  [[ $missing == 0 ]] && return 0
  log "kubernetes v$v"
  local dir="$cache/build/kubernetes-$v"
  rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
  local gomod
  gomod="$(go mod download -json "k8s.io/kubernetes@v$v" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')"
  local goversion
  goversion="$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$gomod")"
  {
    echo "module appset.dev/build/kubernetes"
    echo
    echo "go $goversion"
    echo
    echo "require k8s.io/kubernetes v$v"
    echo
    # Every staging module that k8s.io/kubernetes replaces with ./staging/... is published as
    # k8s.io/<name> v0.<minor>.<patch>; derive the list from the real go.mod.
    sed -n 's#^[[:space:]]*\(k8s\.io/[^[:space:]]*\) => \./staging/.*#\1#p' "$gomod" | while read -r m; do
      echo "replace $m => $m v0.${v#*.}"
    done
  } >go.mod
  cat >tools.go <<'GO'
//go:build tools

package tools
GO
  local pkgs=()
  for n in "${names[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$n"); done
  go get "${pkgs[@]}"
  local minor="${v#*.}"; minor="${minor%%.*}"
  local ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=v$v -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  go build -trimpath -ldflags "$ld" -o "$bin/" "${pkgs[@]}"
  for n in "${names[@]}"; do stamp "$n" "$v"; done
}

build_etcd() {
  local v="$ETCD_VERSION"
  have etcd "$v" && return 0
  log "etcd v$v"
  local dir="$cache/build/etcd-$v"
  rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
  # etcd's server go.mod has relative replaces, so `go install` refuses it; a wrapper module works.
  go mod init appset.dev/build/etcd >/dev/null 2>&1
  go get "go.etcd.io/etcd/server/v3@v$v"
  go build -trimpath -ldflags "-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3
  stamp etcd "$v"
}

build_go_install() { # NAME MODULE/PATH VERSION
  have "$1" "$3" && return 0
  log "$1 v$3"
  GOBIN="$bin" go install -trimpath -ldflags "-s -w" "$2@v$3"
  stamp "$1" "$3"
}

build_kubernetes
build_etcd
build_go_install kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION"
build_go_install helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION"

# The KWOK stage definitions ship inside its module; keep a copy next to the binaries.
stages="$(go env GOMODCACHE)/sigs.k8s.io/kwok@v$KWOK_VERSION/kustomize/stage"
if [[ ! -d "$cache/kwok-stages-$KWOK_VERSION" ]]; then
  [[ -d "$stages" ]] || (cd "$cache/build" && GOFLAGS=-mod=mod go mod download "sigs.k8s.io/kwok@v$KWOK_VERSION")
  cp -r "$stages" "$cache/kwok-stages-$KWOK_VERSION"
  chmod -R u+w "$cache/kwok-stages-$KWOK_VERSION"
fi
echo "$bin"
