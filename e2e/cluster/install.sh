#!/usr/bin/env bash
# Installs appset on the local cluster the way a user would, with one difference the local
# cluster forces: the operator and the webhook run as local processes (no container runs here),
# authenticated with tokens of the chart's ServiceAccounts, so they have exactly the chart's RBAC.
#
#   1. helm upgrade --install the chart in out-of-cluster mode (Deployments off, webhook URL on
#      https://127.0.0.1:<port>/mutate-pods);
#   2. build the binaries, mint ServiceAccount tokens (TokenRequest), write a kubeconfig per account;
#   3. start appset-operator and appset-webhook in the background (pids and logs in the state dir);
#   4. apply examples/ and print what to look at.
#
# Idempotent: processes already running are restarted with the current build.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
state="${APPSET_CLUSTER_DIR:-$repo/.cluster}"
base="${APPSET_PORT_BASE:-16440}"
webhook_port=$((base + 8)) operator_port=$((base + 9))
ns=appset-system
release=appset
export KUBECONFIG="$state/kubeconfig"
bin="$("$here/build.sh")"
export PATH="$bin:$PATH"
log() { echo "[install] $*" >&2; }

log "helm upgrade --install $release (out-of-cluster mode)"
# up.sh applied the CRDs already (the e2e suite needs them without a release): the release takes
# them over, as a cluster upgraded from a chart that shipped them in crds/ would.
helm upgrade --install "$release" "$repo/charts/appset" --namespace "$ns" --create-namespace \
  --take-ownership \
  --set operator.enabled=false --set webhook.enabled=false \
  --set webhook.url="https://127.0.0.1:$webhook_port/mutate-pods" --wait --timeout 2m >/dev/null

log "building appset-operator and appset-webhook"
(cd "$repo" && cargo build -q -p appset-operator -p appset-webhook)
target="$(cd "$repo" && cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug"

# A kubeconfig per ServiceAccount, with a token from the TokenRequest API.
server="$(kubectl config view --raw -o jsonpath='{.clusters[0].cluster.server}')"
ca="$(kubectl config view --raw -o jsonpath='{.clusters[0].cluster.certificate-authority}')"
for sa in operator webhook; do
  token="$(kubectl -n "$ns" create token "$release-$sa" --duration 24h)"
  cat >"$state/$sa.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {server: "$server", certificate-authority: "$ca"}
users:
- name: $sa
  user: {token: "$token"}
contexts:
- name: $sa
  context: {cluster: local, user: $sa, namespace: $ns}
current-context: $sa
EOF
  chmod 600 "$state/$sa.kubeconfig"
done

restart() { # NAME COMMAND...
  local name="$1"
  shift
  if [[ -f "$state/pids/$name" ]]; then
    kill -TERM -- "-$(cat "$state/pids/$name")" 2>/dev/null || true
    sleep 1
  fi
  setsid "$@" >"$state/logs/$name.log" 2>&1 </dev/null 8>&- 9>&- &
  echo $! >"$state/pids/$name"
}

log "starting appset-webhook on https://127.0.0.1:$webhook_port"
KUBECONFIG="$state/webhook.kubeconfig" POD_NAMESPACE="$ns" RUST_LOG=info restart webhook \
  "$target/appset-webhook" --listen "127.0.0.1:$webhook_port" --san 127.0.0.1 \
  --webhook-configuration "$release-webhook" --log-format text --drain-seconds 1
log "starting appset-operator (metrics on http://127.0.0.1:$operator_port)"
KUBECONFIG="$state/operator.kubeconfig" POD_NAMESPACE="$ns" POD_NAME=local-operator RUST_LOG=info restart operator \
  "$target/appset-operator" --leader-elect --listen "127.0.0.1:$operator_port" --log-format text

wait_ready() { # NAME URL
  for _ in $(seq 1 120); do
    curl -skf "$2" >/dev/null 2>&1 && return 0
    kill -0 "$(cat "$state/pids/$1")" 2>/dev/null || { log "$1 exited:"; tail -5 "$state/logs/$1.log" >&2; return 1; }
    sleep 0.5
  done
  log "$1 is not ready; see $state/logs/$1.log"
  return 1
}
wait_ready webhook "https://127.0.0.1:$webhook_port/readyz"
wait_ready operator "http://127.0.0.1:$operator_port/readyz"

# The webhook writes its CA into the configuration; wait for it before creating pods.
for _ in $(seq 1 60); do
  [[ -n "$(kubectl get mutatingwebhookconfiguration "$release-webhook" -o jsonpath='{.webhooks[0].clientConfig.caBundle}')" ]] && break
  sleep 0.5
done

if [[ -d "$repo/examples" ]]; then
  log "applying examples/"
  kubectl apply --server-side -f "$repo/examples/" >/dev/null
fi

cat <<EOF
appset is running on the local cluster:
  operator  pid $(cat "$state/pids/operator"), log $state/logs/operator.log, metrics http://127.0.0.1:$operator_port/metrics
  webhook   pid $(cat "$state/pids/webhook"), log $state/logs/webhook.log, https://127.0.0.1:$webhook_port/mutate-pods
Look at:
  kubectl get appsets.appset.dev,podinjections.appset.dev,deployments,pods,pvc -n appset-examples
  kubectl get pod -n appset-examples -l app=nginx-git -o jsonpath='{.items[0].spec.initContainers[*].name}'
EOF
