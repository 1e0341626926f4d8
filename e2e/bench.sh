#!/usr/bin/env bash
# Runs every benchmark and prints its figures: the webhook's admission benchmark (no cluster),
# then the config-rollout and AppSet-vs-StatefulSet benchmarks on a local control plane of their
# own (.cluster-bench, ports from 16740; or the cluster in KUBECONFIG when set). Extra arguments
# go to the config-rollout benchmark (e.g. --secrets 500 --configmaps 200 --deployments 100).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
bin="$("$here/cluster/build.sh")"
export PATH="$bin:$PATH"
cd "$repo"
cargo bench -p appset-webhook --bench admission
cargo build --release -q -p appset-operator -p appset-e2e
if [[ -z "${KUBECONFIG:-}" ]]; then
  export APPSET_CLUSTER_DIR="$repo/.cluster-bench" APPSET_PORT_BASE=16740
  trap '"$here/cluster/down.sh"' EXIT
  "$here/cluster/up.sh"
  export KUBECONFIG="$APPSET_CLUSTER_DIR/kubeconfig"
fi
cargo run --release -q -p appset-e2e --bin config-rollout-bench -- "$@"
cargo run --release -q -p appset-e2e --bin appset-bench
cargo run --release -q -p appset-e2e --bin appset-scale-bench
