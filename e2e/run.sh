#!/usr/bin/env bash
# Runs the end-to-end suite against the cluster in KUBECONFIG. When KUBECONFIG is not set, it
# brings up a local control plane of its own (state in .cluster-e2e, ports from 16540, so it
# never disturbs a `make up` cluster) and tears it down afterwards, even when tests fail.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
bin="$("$here/cluster/build.sh")"
export PATH="$bin:$PATH"
cd "$repo"
# The chart and leader-election tests run the real binaries as processes.
cargo build -q -p appset-operator -p appset-webhook
target="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug"
export APPSET_OPERATOR_BIN="$target/appset-operator" APPSET_WEBHOOK_BIN="$target/appset-webhook"
if [[ -z "${KUBECONFIG:-}" ]]; then
  export APPSET_CLUSTER_DIR="${APPSET_E2E_CLUSTER_DIR:-$repo/.cluster-e2e}" APPSET_PORT_BASE="${APPSET_E2E_PORT_BASE:-16540}"
  trap '"$here/cluster/down.sh"' EXIT
  "$here/cluster/up.sh"
  export KUBECONFIG="$APPSET_CLUSTER_DIR/kubeconfig"
fi
cargo test --no-fail-fast -p appset-e2e -- --test-threads="${APPSET_E2E_THREADS:-4}" "$@"
