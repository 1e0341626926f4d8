#!/usr/bin/env bash
# Runs every benchmark and prints their figures as one Markdown table: the webhook's admission
# benchmark (no cluster), then the config-rollout and AppSet-vs-StatefulSet benchmarks on a
# local control plane of their own (.cluster-bench, ports from 16740; or the cluster in
# KUBECONFIG when set). Extra arguments go to the config-rollout benchmark (e.g. --secrets 500
# --configmaps 200 --deployments 100, or --peer '<command>' --peer-name <name> to run the same
# scenario against another controller; BENCH_PEER / BENCH_PEER_NAME do the same).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
bin="$("$here/cluster/build.sh")"
export PATH="$bin:$PATH"
cd "$repo"
table="$(mktemp)"
trap 'rm -f "$table"' EXIT
export BENCH_TABLE="$table"
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
git diff --quiet 2>/dev/null || commit="$commit with uncommitted changes"
cargo build --release -q -p appset-operator -p appset-e2e
cargo bench -q -p appset-webhook --bench admission
if [[ -z "${KUBECONFIG:-}" ]]; then
  export APPSET_CLUSTER_DIR="$repo/.cluster-bench" APPSET_PORT_BASE=16740
  trap 'rm -f "$table"; "$here/cluster/down.sh"' EXIT
  "$here/cluster/up.sh"
  export KUBECONFIG="$APPSET_CLUSTER_DIR/kubeconfig"
fi
release="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release"
"$release/config-rollout-bench" "$@"
"$release/appset-bench"
"$release/appset-scale-bench"
echo
echo "## make bench: $commit, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs"
echo
echo "| scenario | measure | appset | reference | ratio | goal |"
echo "| --- | --- | --- | --- | --- | --- |"
cat "$table"
