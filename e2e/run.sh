#!/usr/bin/env bash
# Runs the end-to-end suite against the cluster in KUBECONFIG. When KUBECONFIG is not set, it
# brings up the local control plane first and tears it down afterwards, even when tests fail.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
bin="$("$here/cluster/build.sh")"
export PATH="$bin:$PATH"
if [[ -z "${KUBECONFIG:-}" ]]; then
  trap '"$here/cluster/down.sh"' EXIT
  "$here/cluster/up.sh"
  export KUBECONFIG="${APPSET_CLUSTER_DIR:-$repo/.cluster}/kubeconfig"
fi
cd "$repo"
cargo test -p appset-e2e -- --test-threads="${APPSET_E2E_THREADS:-4}" "$@"
