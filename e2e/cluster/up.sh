#!/usr/bin/env bash
# Brings up a local Kubernetes control plane on loopback: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler and KWOK faking two nodes, with a default StorageClass
# whose claims are provisioned and bound by the controller-manager's host-path provisioner.
# Idempotent: when the cluster in the state directory is already healthy it only prints how to
# use it. Containers never run; KWOK marks pods Running and Ready.
#
#   e2e/cluster/up.sh            # build what is missing (cached), start, wait until ready
#
# Environment:
#   APPSET_CLUSTER_DIR  state directory (default <repo>/.cluster): certificates, logs, kubeconfig
#   APPSET_CACHE        binary cache (default ~/.cache/appset), see build.sh
#   APPSET_PORT_BASE    first of the loopback ports used (default 16440)
#   APPSET_ETCD_DURABLE 1: etcd fsyncs (slower; for fault tests that kill etcd)
#   APPSET_SKIP_CRDS    1: leave the appset CRDs out (for a test that installs them with the chart)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
source "$here/versions.env"
state="${APPSET_CLUSTER_DIR:-$repo/.cluster}"
base="${APPSET_PORT_BASE:-16440}"
api_port=$((base + 3)) etcd_port=$((base + 4)) etcd_peer=$((base + 5)) sched_port=$((base + 6)) kwok_port=$((base + 7))
mkdir -p "$state"/{pki,logs,pids,etcd}
kubeconfig="$state/kubeconfig"
# One `up` at a time per state directory; a second caller waits and then finds the cluster up.
exec 8>"$state.lock"
flock 8

log() { echo "[up] $*" >&2; }

bin="$("$here/build.sh")"
export PATH="$bin:$PATH"
stages="${APPSET_CACHE:-$HOME/.cache/appset}/kwok-stages-$KWOK_VERSION"

healthy() {
  [[ -f "$kubeconfig" ]] && kubectl --kubeconfig "$kubeconfig" get --raw /readyz >/dev/null 2>&1 &&
    for c in etcd kube-apiserver kube-controller-manager kube-scheduler kwok; do
      [[ -f "$state/pids/$c" ]] && kill -0 "$(cat "$state/pids/$c")" 2>/dev/null || return 1
    done
}

if healthy; then
  log "cluster already running"
else
  "$here/down.sh" --keep-pki >/dev/null 2>&1 || true
  mkdir -p "$state"/{pki,logs,pids,etcd}

  # --- certificates (kept across restarts) ---
  pki="$state/pki"
  if [[ ! -f "$pki/admin.crt" ]]; then
    log "generating certificates"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=appset-local-ca" \
      -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout "$pki/apiserver.key" \
      -out "$pki/apiserver.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n' >"$pki/apiserver.ext"
    openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
      -days 3650 -extfile "$pki/apiserver.ext" -out "$pki/apiserver.crt" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=appset-admin" -keyout "$pki/admin.key" \
      -out "$pki/admin.csr" 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\n' >"$pki/admin.ext"
    openssl x509 -req -in "$pki/admin.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
      -days 3650 -extfile "$pki/admin.ext" -out "$pki/admin.crt" 2>/dev/null
    openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
    openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  fi
  # The client certificate the API server presents to admission webhooks (a CA of its own, so a
  # webhook started with --client-ca-file trusts the API server and no other cluster client).
  if [[ ! -f "$pki/webhook-client.crt" ]]; then
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=appset-local-webhook-client-ca" \
      -keyout "$pki/webhook-client-ca.key" -out "$pki/webhook-client-ca.crt" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver-webhook-client" \
      -keyout "$pki/webhook-client.key" -out "$pki/webhook-client.csr" 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\n' >"$pki/webhook-client.ext"
    openssl x509 -req -in "$pki/webhook-client.csr" -CA "$pki/webhook-client-ca.crt" \
      -CAkey "$pki/webhook-client-ca.key" -CAcreateserial -days 3650 -extfile "$pki/webhook-client.ext" \
      -out "$pki/webhook-client.crt" 2>/dev/null
  fi
  cat >"$state/webhook-client.kubeconfig" <<EOF
apiVersion: v1
kind: Config
users:
- name: '*'
  user:
    client-certificate: $pki/webhook-client.crt
    client-key: $pki/webhook-client.key
EOF
  cat >"$state/admission.yaml" <<EOF
apiVersion: apiserver.config.k8s.io/v1
kind: AdmissionConfiguration
plugins:
- name: MutatingAdmissionWebhook
  configuration:
    apiVersion: apiserver.config.k8s.io/v1
    kind: WebhookAdmissionConfiguration
    kubeConfigFile: $state/webhook-client.kubeconfig
- name: ValidatingAdmissionWebhook
  configuration:
    apiVersion: apiserver.config.k8s.io/v1
    kind: WebhookAdmissionConfiguration
    kubeConfigFile: $state/webhook-client.kubeconfig
EOF
  cat >"$kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: appset-local
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority: $pki/ca.crt
users:
- name: appset-admin
  user:
    client-certificate: $pki/admin.crt
    client-key: $pki/admin.key
contexts:
- name: appset-local
  context: {cluster: appset-local, user: appset-admin}
current-context: appset-local
EOF

  start() { # NAME ARGS...: start a component in its own session, remember its pid
    local name="$1"
    shift
    setsid "$@" >"$state/logs/$name.log" 2>&1 </dev/null 8>&- 9>&- &
    echo $! >"$state/pids/$name"
  }
  wait_for() { # DESCRIPTION SECONDS COMMAND...
    local what="$1" secs="$2"
    shift 2
    for ((i = 0; i < secs * 4; i++)); do
      "$@" >/dev/null 2>&1 && return 0
      for c in "$state"/pids/*; do # a component that exited will not come back: fail now
        if ! kill -0 "$(cat "$c")" 2>/dev/null; then
          log "$(basename "$c") exited; last lines of $state/logs/$(basename "$c").log:"
          tail -5 "$state/logs/$(basename "$c").log" >&2
          return 1
        fi
      done
      sleep 0.25
    done
    log "timed out waiting for $what; logs in $state/logs"
    return 1
  }

  log "starting etcd"
  # --unsafe-no-fsync makes the suite fast; a fault test that kills etcd asks for a durable one.
  durability=(--unsafe-no-fsync)
  [[ "${APPSET_ETCD_DURABLE:-}" == 1 ]] && durability=()
  start etcd etcd --name appset --data-dir "$state/etcd" "${durability[@]}" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "appset=http://127.0.0.1:$etcd_peer" --listen-metrics-urls "" \
    --quota-backend-bytes 4294967296 --log-level warn
  wait_for etcd 30 curl -sf "http://127.0.0.1:$etcd_port/health"

  # Writes are audited (metadata only: who, what, when; never a body), so that tests can check
  # which client wrote what, e.g. that a paused leader sends nothing once another has taken over.
  cat >"$state/audit-policy.yaml" <<'POLICY'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  verbs: [create, update, patch, delete, deletecollection]
- level: None
POLICY
  log "starting kube-apiserver v$K8S_VERSION on 127.0.0.1:$api_port"
  start kube-apiserver kube-apiserver --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" --authorization-mode Node,RBAC \
    --service-account-issuer "https://127.0.0.1:$api_port" --service-account-key-file "$pki/sa.pub" \
    --service-account-signing-key-file "$pki/sa.key" --service-cluster-ip-range 10.96.0.0/16 \
    --allow-privileged=true --enable-priority-and-fairness=false --profiling=false \
    --api-audiences "https://127.0.0.1:$api_port" --endpoint-reconciler-type none \
    --audit-policy-file "$state/audit-policy.yaml" --audit-log-path "$state/logs/audit.log" \
    --audit-log-maxsize 500 --audit-log-maxbackup 1 \
    --admission-control-config-file "$state/admission.yaml"
  wait_for kube-apiserver 120 kubectl --kubeconfig "$kubeconfig" get --raw /readyz

  log "starting kube-controller-manager, kube-scheduler, kwok"
  start kube-controller-manager kube-controller-manager --kubeconfig "$kubeconfig" \
    --authentication-kubeconfig "$kubeconfig" --authorization-kubeconfig "$kubeconfig" \
    --leader-elect=false --use-service-account-credentials=false \
    --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
    --cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key" \
    --bind-address 127.0.0.1 --secure-port 0 --enable-hostpath-provisioner=true \
    --controllers '*' \
    --concurrent-deployment-syncs 10 --concurrent-statefulset-syncs 10 --profiling=false
  start kube-scheduler kube-scheduler --kubeconfig "$kubeconfig" \
    --authentication-kubeconfig "$kubeconfig" --authorization-kubeconfig "$kubeconfig" \
    --leader-elect=false --bind-address 127.0.0.1 --secure-port "$sched_port" --profiling=false
  for f in "$stages"/node/fast/node-initialize.yaml "$stages"/node/heartbeat-with-lease/*.yaml \
    "$stages"/pod/fast/pod-ready.yaml "$stages"/pod/fast/pod-complete.yaml "$stages"/pod/fast/pod-delete.yaml; do
    cat "$f"
    echo "---"
  done >"$state/kwok-stages.yaml"
  start kwok kwok --kubeconfig "$kubeconfig" --manage-all-nodes=true --config "$state/kwok-stages.yaml" \
    --server-address "127.0.0.1:$kwok_port" --node-lease-duration-seconds 40

  wait_for "default namespace" 60 kubectl --kubeconfig "$kubeconfig" get namespace default
  log "creating nodes and the default StorageClass"
  for n in 0 1; do
    cat <<EOF
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-$n
  annotations: {kwok.x-k8s.io/node: fake, node.alpha.kubernetes.io/ttl: "0"}
  labels: {type: kwok, kubernetes.io/hostname: kwok-node-$n, kubernetes.io/os: linux, kubernetes.io/arch: amd64, topology.kubernetes.io/zone: zone-$n}
status:
  allocatable: {cpu: "64", memory: 256Gi, pods: "500"}
  capacity: {cpu: "64", memory: 256Gi, pods: "500"}
---
EOF
  done >"$state/nodes.yaml"
  cat >>"$state/nodes.yaml" <<'EOF'
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: standard
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: kubernetes.io/host-path
reclaimPolicy: Delete
volumeBindingMode: Immediate
allowVolumeExpansion: true
EOF
  kubectl --kubeconfig "$kubeconfig" apply --server-side -f "$state/nodes.yaml" >/dev/null
  wait_for "nodes Ready" 60 kubectl --kubeconfig "$kubeconfig" wait --for=condition=Ready node --all --timeout=1s
  wait_for "default ServiceAccount" 60 kubectl --kubeconfig "$kubeconfig" get serviceaccount default -n default
fi

if [[ "${APPSET_SKIP_CRDS:-}" == 1 ]]; then
  log "leaving the appset CRDs out (APPSET_SKIP_CRDS=1)"
else
  log "installing the appset CRDs"
  kubectl --kubeconfig "$kubeconfig" apply --server-side --force-conflicts -f "$repo/charts/appset/files/crds/" >/dev/null
  # A CRD has no status for a moment after its creation, and `kubectl wait` fails rather than
  # waits on that: retry until every CRD is Established.
  for i in $(seq 1 60); do
    kubectl --kubeconfig "$kubeconfig" wait --for=condition=Established crd --all --timeout=5s >/dev/null 2>&1 && break
    [[ $i == 60 ]] && { log "the appset CRDs did not become Established"; exit 1; }
    sleep 1
  done
fi

cat <<EOF
appset local cluster is up (Kubernetes v$K8S_VERSION, 2 KWOK nodes, StorageClass "standard").
  export KUBECONFIG=$kubeconfig
  export PATH=$bin:\$PATH     # kubectl, helm at the pinned versions
  kubectl get nodes
Logs: $state/logs   Stop with: make down
EOF
