#!/usr/bin/env bash
# Stops the local control plane started by up.sh and removes its state. Idempotent; leaves no
# process behind. `--keep-pki` keeps the certificates (used by up.sh when it restarts a cluster).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
state="${APPSET_CLUSTER_DIR:-$repo/.cluster}"
[[ -d "$state" ]] || exit 0
# Processes started by `make up` on top of the control plane (operator, webhook) stop first.
for order in extra core; do
  if [[ $order == extra ]]; then names=(operator operator-2 webhook); else names=(kwok kube-scheduler kube-controller-manager kube-apiserver etcd); fi
  for c in "${names[@]}"; do
    f="$state/pids/$c"
    [[ -f "$f" ]] || continue
    pid="$(cat "$f")"
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
      for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$f"
  done
done
if [[ "${1:-}" == "--keep-pki" ]]; then
  find "$state" -mindepth 1 -maxdepth 1 ! -name pki -exec rm -rf {} +
else
  rm -rf "$state"
fi
echo "[down] local cluster stopped"
