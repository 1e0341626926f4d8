//! Admission benchmark: latency (p50/p99) and throughput of the webhook over HTTPS on loopback.
//!
//! An in-process server (the real `server::run`, TLS and all) with three PodInjections fed
//! straight into its store, reviewing a realistic Deployment pod (two containers, probes,
//! resources, a projected token volume, managed fields: about 5 KB) that all three select. Two
//! phases, both bounded in time and count:
//!
//! * **fixed rate**: an open loop sending at a set rate over keep-alive connections; latency is
//!   measured from each request's scheduled time, so queueing is not hidden;
//! * **saturation**: closed loops on several connections, as fast as the server answers.
//!
//! Also prints the in-process cost of one review (no HTTP, no TLS). Run with
//! `cargo bench -p appset-webhook --bench admission`; `BENCH_SECONDS` (default 5) sets the
//! length of each phase and `BENCH_RATE` (default 1000/s) the fixed rate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use appset_crds::PodInjection;
use appset_webhook::admission;
use appset_webhook::metrics::Metrics;
use appset_webhook::probe::Probe;
use appset_webhook::server::{self, AppState};
use appset_webhook::tls::material::{self, Policy};
use appset_webhook::tls::resolver::CertResolver;
use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use kube::runtime::{reflector, watcher};
use serde_json::{Value, json};

fn injections() -> Vec<PodInjection> {
    let specs = [
        (
            "git-content",
            json!({
                "selector": {"matchLabels": {"app": "shop"}},
                "initContainers": [{
                    "name": "git-clone", "image": "alpine/git:2.47.2",
                    "args": ["clone", "--depth=1", "https://git.example.invalid/site.git", "/content"],
                    "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
                    "volumeMounts": [{"name": "content", "mountPath": "/content"}]
                }],
                "volumes": [{"name": "content", "emptyDir": {"sizeLimit": "256Mi"}}],
                "volumeMounts": [{"name": "content", "mountPath": "/usr/share/nginx/html", "readOnly": true, "containers": ["web"]}]
            }),
        ),
        (
            "scratch",
            json!({
                "selector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["frontend", "backend"]}]},
                "volumes": [{"name": "scratch", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}}],
                "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]
            }),
        ),
        (
            "trust-bundle",
            json!({
                "selector": {"matchLabels": {"app": "shop"}},
                "initContainerPlacement": "Last",
                "initContainers": [{
                    "name": "trust-bundle", "image": "busybox:1.37",
                    "command": ["sh", "-c", "cp /etc/ssl/certs/* /trust/"],
                    "volumeMounts": [{"name": "trust", "mountPath": "/trust"}]
                }],
                "volumes": [{"name": "trust", "emptyDir": {}}],
                "volumeMounts": [{"name": "trust", "mountPath": "/etc/ssl/certs", "readOnly": true}]
            }),
        ),
    ];
    specs
        .into_iter()
        .enumerate()
        .map(|(i, (name, spec))| {
            let mut pi = PodInjection::new(
                name,
                serde_json::from_value(spec).unwrap_or_else(|e| panic!("spec {name}: {e}")),
            );
            pi.metadata.namespace = Some("shop".into());
            pi.metadata.generation = Some(i as i64 + 1);
            pi
        })
        .collect()
}

fn pod() -> Value {
    json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {
            "generateName": "shop-7d9c6b5f4-",
            "namespace": "shop",
            "labels": {"app": "shop", "tier": "frontend", "pod-template-hash": "7d9c6b5f4", "app.kubernetes.io/version": "2.14.1"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-20T10:00:00Z", "prometheus.io/scrape": "true", "prometheus.io/port": "9100"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "shop-7d9c6b5f4", "uid": "1b7e4e4c-5a0e-4a51-9d7e-6a1f0e5f1c11", "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1", "time": "2026-11-25T19:00:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app": {}, "f:tier": {}}, "f:ownerReferences": {".": {}}},
                             "f:spec": {"f:containers": {"k:{\"name\":\"web\"}": {".": {}, "f:image": {}, "f:name": {}}, "k:{\"name\":\"exporter\"}": {".": {}, "f:image": {}}}}}}]
        },
        "spec": {
            "volumes": [{"name": "kube-api-access-x7k2p", "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}},
                {"name": "config", "configMap": {"name": "shop-config", "defaultMode": 420}}],
            "containers": [
                {"name": "web", "image": "registry.example.invalid/shop/web:2.14.1",
                 "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                 "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "POD_IP", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}}],
                 "envFrom": [{"configMapRef": {"name": "shop-env"}}],
                 "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
                 "readinessProbe": {"httpGet": {"path": "/ready", "port": "http", "scheme": "HTTP"}, "periodSeconds": 5, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
                 "livenessProbe": {"httpGet": {"path": "/live", "port": "http", "scheme": "HTTP"}, "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
                 "volumeMounts": [{"name": "config", "mountPath": "/etc/shop", "readOnly": true},
                                  {"name": "kube-api-access-x7k2p", "readOnly": true, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
                 "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent",
                 "securityContext": {"runAsNonRoot": true, "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}},
                {"name": "exporter", "image": "registry.example.invalid/shop/exporter:0.9.0",
                 "ports": [{"name": "metrics", "containerPort": 9100, "protocol": "TCP"}],
                 "resources": {"requests": {"cpu": "20m", "memory": "32Mi"}},
                 "volumeMounts": [{"name": "kube-api-access-x7k2p", "readOnly": true, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
                 "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent"}
            ],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default", "serviceAccount": "default", "securityContext": {"fsGroup": 2000},
            "schedulerName": "default-scheduler", "enableServiceLinks": true, "preemptionPolicy": "PreemptLowerPriority", "priority": 0,
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]
        },
        "status": {}
    })
}

fn review_body() -> Bytes {
    let body = json!({
        "kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": "0df28fbd-5f5f-11e8-bc74-36e6bb280816",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop", "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller", "uid": "a1", "groups": ["system:serviceaccounts", "system:authenticated"]},
            "object": pod(), "oldObject": null, "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    });
    Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn report(phase: &str, mut lat: Vec<Duration>, failures: usize, elapsed: Duration) {
    lat.sort();
    println!(
        "{phase:<34} requests {:>7}  failures {failures}  throughput {:>8.0}/s  p50 {:>8.3} ms  p99 {:>8.3} ms  max {:>8.3} ms",
        lat.len(),
        lat.len() as f64 / elapsed.as_secs_f64(),
        percentile(&lat, 0.50).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One admission over an open connection: Ok when the answer is a 200 carrying a patch.
async fn admit(conn: &mut appset_webhook::probe::Connection, body: &Bytes) -> bool {
    match conn.send(Method::POST, "/mutate-pods", body.clone()).await {
        Ok((StatusCode::OK, bytes)) => bytes.windows(9).any(|w| w == b"\"patch\":\""),
        _ => false,
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seconds = env_u64("BENCH_SECONDS", 5).clamp(1, 60);
    let rate = env_u64("BENCH_RATE", 1000).clamp(1, 20_000);
    let phase = Duration::from_secs(seconds);
    let body = review_body();
    println!(
        "appset-webhook admission benchmark: pod review {} bytes, 3 PodInjections, HTTPS on 127.0.0.1, {} CPUs, load average {}",
        body.len(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().map(str::to_string))
            .unwrap_or_else(|| "unknown".into())
    );

    // The store, fed directly.
    let (store, mut writer) = reflector::store::<PodInjection>();
    writer.apply_watcher_event(&watcher::Event::Init);
    for pi in injections() {
        writer.apply_watcher_event(&watcher::Event::InitApply(pi));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);

    // In-process cost of one review.
    let all: Vec<Arc<PodInjection>> = store.state();
    let n = 5_000;
    let mut patched = 0;
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let s = Instant::now();
        if let Ok((admission::Decision::Inject { .. }, _)) =
            admission::respond(&body, |_| all.clone())
        {
            patched += 1;
        }
        lat.push(s.elapsed());
    }
    report(
        &format!("in-process review ({patched}/{n} patched)"),
        lat,
        n - patched,
        start.elapsed(),
    );

    let m = material::create(&Policy::default(), time::OffsetDateTime::now_utc())?;
    let resolver = Arc::new(CertResolver::new());
    resolver.load_pem(&m.tls_cert, &m.tls_key)?;
    let state = Arc::new(AppState {
        injections: store,
        namespaces: None,
        resolver,
        metrics: Metrics::new(),
        readiness: appset_process::readiness::Readiness::new(),
        denials: None,
        gate: server::Gate::new(server::Limits {
            drain: std::time::Duration::ZERO,
            ..Default::default()
        }),
        client_roots: None,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::run(listener, state, async move {
        let _ = stop_rx.await;
    }));
    let probe = Probe::new(addr, "127.0.0.1", &m.bundle())?;

    // Warm-up.
    let mut warm = probe.connect().await?;
    for _ in 0..200 {
        admit(&mut warm, &body).await;
    }
    drop(warm);

    // Fixed rate, open loop.
    let workers = 8u64;
    let total = rate * seconds;
    let t0 = Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::new();
    for w in 0..workers {
        let probe = probe.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut failures = 0usize;
            let Ok(mut conn) = probe.connect().await else {
                return (lat, total as usize);
            };
            let mut i = w;
            while i < total {
                let due = t0 + Duration::from_secs_f64(i as f64 / rate as f64);
                tokio::time::sleep_until(due.into()).await;
                if admit(&mut conn, &body).await {
                    lat.push(due.elapsed());
                } else {
                    failures += 1;
                }
                i += workers;
                if t0.elapsed() > phase * 2 {
                    break;
                }
            }
            (lat, failures)
        }));
    }
    let (mut lat, mut failures) = (Vec::new(), 0);
    for t in tasks {
        let (l, f) = t.await?;
        lat.extend(l);
        failures += f;
    }
    report(
        &format!("fixed rate {rate}/s"),
        lat,
        failures,
        t0.elapsed().max(Duration::from_millis(1)),
    );

    // Saturation, closed loops.
    for conns in [1usize, 4, 16] {
        let start = Instant::now();
        let deadline = start + phase;
        let mut tasks = Vec::new();
        for _ in 0..conns {
            let probe = probe.clone();
            let body = body.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut failures = 0usize;
                let Ok(mut conn) = probe.connect().await else {
                    return (lat, 1usize);
                };
                while Instant::now() < deadline && lat.len() < 1_000_000 {
                    let s = Instant::now();
                    if admit(&mut conn, &body).await {
                        lat.push(s.elapsed());
                    } else {
                        failures += 1;
                    }
                }
                (lat, failures)
            }));
        }
        let (mut lat, mut failures) = (Vec::new(), 0);
        for t in tasks {
            let (l, f) = t.await?;
            lat.extend(l);
            failures += f;
        }
        report(
            &format!("saturation, {conns} connection(s)"),
            lat,
            failures,
            start.elapsed(),
        );
    }

    let _ = stop_tx.send(());
    server.await??;
    Ok(())
}
