//! Admission benchmark: the in-process cost of a review against a bare JSON parse, latency at a
//! fixed rate and throughput at saturation of the webhook over HTTPS on loopback.
//!
//! An in-process server (the real `server::run`, TLS and all, in a Tokio runtime of its own with
//! one worker per CPU, as in the binary, and with the binary's allocator) with three
//! PodInjections fed straight into its store, reviewing a realistic Deployment pod (two
//! containers, probes, resources, a projected token volume, managed fields: about 4 KB of
//! AdmissionReview) that all three select. The load generator runs in another runtime on the
//! same CPUs. Phases, each bounded in time and count:
//!
//! * **in-process**: `admission::respond` (parse + plan + encode, no HTTP, no TLS) against the
//!   bare parse of the same bytes, both into the webhook's own request type (`admission::parse`)
//!   and into `serde_json::Value` (`serde_json::from_slice`); interleaved rounds, the median round;
//! * **fixed rate**: an open loop at `BENCH_RATE` over 16 keep-alive connections. A pacing thread
//!   (not Tokio's timer, whose granularity is 1 ms) sleeps until 200 µs before each due time,
//!   spins until it, and hands the request to an idle connection; latency runs from the due
//!   time, so queueing is not hidden, and the generator's own pacing error (send time minus due
//!   time) is printed beside the figures;
//! * **saturation**: closed loops on 1, 4 and 16 connections, as fast as the server answers.
//!
//! HTTP/1.1 only: the API server's webhook client asks for `http/1.1` alone in ALPN
//! (`cfg.NextProtos = []string{"http/1.1"}` in `k8s.io/apiserver/pkg/util/webhook/client.go`,
//! so that concurrent reviews spread over replicas, kubernetes/kubernetes#75791), so the server
//! offers nothing else and HTTP/2 figures would describe no real client.
//!
//! Run with `cargo bench -p appset-webhook --bench admission`; `BENCH_SECONDS` (default 5) sets
//! the length of each phase, `BENCH_RATE` (default 1000/s) the fixed rate, `BENCH_PHASES` a
//! comma-separated subset of `inprocess,fixed,saturation` (for profiling), `BENCH_ROUNDS` the
//! in-process rounds (21). With `BENCH_TABLE=<file>` the figures are also appended to that file
//! as markdown rows `| scenario | measure | appset | reference | ratio | goal |`, "met" or
//! "not met" computed from the figures (a phase with a failed request does not meet its goal);
//! the load average before and after is the last row.

use std::sync::Arc;
use std::time::{Duration, Instant};

use appset_crds::PodInjection;
use appset_webhook::admission;
use appset_webhook::metrics::Metrics;
use appset_webhook::probe::Probe;
use appset_webhook::probe::ProbeError;
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

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// `12345` as `12,345`.
fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn report(phase: &str, lat: &mut [Duration], failures: usize, elapsed: Duration) -> f64 {
    lat.sort();
    let throughput = lat.len() as f64 / elapsed.as_secs_f64();
    println!(
        "{phase:<44} requests {:>7}  failures {failures}  throughput {:>8.0}/s  p50 {:>7.3} ms  p99 {:>7.3} ms  max {:>7.3} ms",
        lat.len(),
        throughput,
        ms(percentile(lat, 0.50)),
        ms(percentile(lat, 0.99)),
        ms(lat.last().copied().unwrap_or_default()),
    );
    throughput
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The three load averages of `/proc/loadavg`.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// The rows appended to `$BENCH_TABLE`: `| scenario | measure | appset | reference | ratio | goal |`.
#[derive(Default)]
struct Table(Vec<String>);

impl Table {
    fn row(&mut self, measure: &str, appset: &str, reference: &str, ratio: &str, goal: &str) {
        self.0.push(format!(
            "| webhook | {measure} | {appset} | {reference} | {ratio} | {goal} |"
        ));
    }

    /// A row with a goal: `ratio` against `limit`, met when `ratio >= limit` (`at_least`) or
    /// `ratio <= limit`.
    fn goal(
        &mut self,
        measure: &str,
        appset: &str,
        reference: &str,
        ratio: f64,
        at_least: bool,
        limit: f64,
    ) {
        let met = if at_least {
            ratio >= limit
        } else {
            ratio <= limit
        };
        let goal = format!(
            "{} {limit:.2}: {}",
            if at_least { "≥" } else { "≤" },
            if met { "met" } else { "not met" }
        );
        self.row(measure, appset, reference, &format!("{ratio:.2}"), &goal);
    }

    fn write(&self) -> std::io::Result<()> {
        let Some(path) = std::env::var_os("BENCH_TABLE") else {
            return Ok(());
        };
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        for r in &self.0 {
            writeln!(f, "{r}")?;
        }
        Ok(())
    }
}

/// One admission over an open connection: Ok when the answer is a 200 carrying a patch.
async fn admit(conn: &mut appset_webhook::probe::Connection, body: &Bytes) -> bool {
    match conn.send(Method::POST, "/mutate-pods", body.clone()).await {
        Ok((StatusCode::OK, bytes)) => bytes.windows(9).any(|w| w == b"\"patch\":\""),
        _ => false,
    }
}

/// The mean time of one call of each of `fs`, measured in interleaved rounds (so that a burst
/// of load from elsewhere hits every function alike); the median round of each.
fn timed<const N: usize>(rounds: usize, iters: usize, fs: [&dyn Fn() -> bool; N]) -> [Duration; N] {
    let mut per: [Vec<Duration>; N] = std::array::from_fn(|_| Vec::with_capacity(rounds));
    for _ in 0..rounds {
        for (f, out) in fs.iter().zip(per.iter_mut()) {
            let start = Instant::now();
            for _ in 0..iters {
                std::hint::black_box(f());
            }
            out.push(start.elapsed() / iters as u32);
        }
    }
    per.map(|mut v| {
        v.sort();
        percentile(&v, 0.5)
    })
}

/// The in-process review against the bare JSON parse of the same bytes.
fn in_process(body: &Bytes, all: &[Arc<PodInjection>], table: &mut Table) {
    let patched = admission::respond(body, |_| all.to_vec())
        .is_ok_and(|(d, _)| matches!(d, admission::Decision::Inject { .. }));
    assert!(patched, "the benchmark's pod must be injected");
    let rounds = env_u64("BENCH_ROUNDS", 21) as usize;
    let [review, typed, value] = timed(
        rounds.max(1),
        500,
        [
            &|| admission::respond(body, |_| all.to_vec()).is_ok(),
            &|| admission::parse(body).is_ok(),
            &|| serde_json::from_slice::<Value>(body).is_ok(),
        ],
    );
    println!(
        "in-process review (parse + plan + encode)    {:>7.1} µs   (median of {rounds} rounds of 500)",
        us(review)
    );
    println!(
        "bare parse into the webhook's request type   {:>7.1} µs   review / parse {:.2}",
        us(typed),
        review.as_secs_f64() / typed.as_secs_f64()
    );
    println!(
        "bare parse into serde_json::Value            {:>7.1} µs   review / parse {:.2}",
        us(value),
        review.as_secs_f64() / value.as_secs_f64()
    );
    for (what, reference) in [
        ("the webhook's request type", typed),
        ("serde_json::Value", value),
    ] {
        table.goal(
            &format!("in-process review vs bare JSON parse ({what})"),
            &format!("{:.1} µs", us(review)),
            &format!("{:.1} µs", us(reference)),
            review.as_secs_f64() / reference.as_secs_f64(),
            false,
            2.0,
        );
    }
}

/// Waits until `due` on this thread: sleeps until shortly before, then spins, because a sleep
/// alone wakes up tens of microseconds late (timer slack and scheduling).
fn wait_until(due: Instant) {
    const SPIN: Duration = Duration::from_micros(200);
    loop {
        let now = Instant::now();
        if now >= due {
            return;
        }
        let left = due - now;
        if left > SPIN {
            std::thread::sleep(left - SPIN);
        } else {
            std::hint::spin_loop();
        }
    }
}

/// The open loop at `rate`: a pacing thread releases each request at its due time to whichever
/// connection is idle; latency runs from the due time, so queueing is not hidden. Returns the
/// latencies, the failures, the pacing errors (send time minus due time) and the elapsed time.
async fn fixed_rate(
    probe: &Probe,
    body: &Bytes,
    rate: u64,
    phase: Duration,
) -> Result<(Vec<Duration>, usize, Vec<Duration>, Duration), ProbeError> {
    let workers = 16;
    let total = (rate as f64 * phase.as_secs_f64()) as u64;
    let mut conns = Vec::new();
    for _ in 0..workers {
        conns.push(probe.connect().await?);
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let t0 = Instant::now() + Duration::from_millis(20);
    let pacer = std::thread::spawn(move || {
        for i in 0..total {
            let due = t0 + Duration::from_secs_f64(i as f64 / rate as f64);
            wait_until(due);
            if tx.send(due).is_err() {
                break;
            }
        }
    });
    let mut tasks = Vec::new();
    for mut conn in conns {
        let rx = rx.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut pacing, mut failures) = (Vec::new(), Vec::new(), 0usize);
            loop {
                let Some(due) = rx.lock().await.recv().await else {
                    break;
                };
                pacing.push(Instant::now().saturating_duration_since(due));
                if admit(&mut conn, &body).await {
                    lat.push(due.elapsed());
                } else {
                    failures += 1;
                }
            }
            (lat, pacing, failures)
        }));
    }
    let (mut lat, mut pacing, mut failures) = (Vec::new(), Vec::new(), 0);
    for t in tasks {
        if let Ok((l, p, f)) = t.await {
            lat.extend(l);
            pacing.extend(p);
            failures += f;
        }
    }
    let elapsed = t0.elapsed();
    let _ = pacer.join();
    Ok((lat, failures, pacing, elapsed))
}

/// Closed loops on `conns` connections for `phase`.
async fn saturation(
    probe: &Probe,
    body: &Bytes,
    conns: usize,
    phase: Duration,
) -> (Vec<Duration>, usize, Duration) {
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
        if let Ok((l, f)) = t.await {
            lat.extend(l);
            failures += f;
        }
    }
    (lat, failures, start.elapsed())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let load_before = loadavg();
    let seconds = env_u64("BENCH_SECONDS", 5).clamp(1, 60);
    let rate = env_u64("BENCH_RATE", 1000).clamp(1, 20_000);
    let phases = std::env::var("BENCH_PHASES").unwrap_or_else(|_| "all".into());
    let run = |p: &str| phases == "all" || phases.split(',').any(|x| x == p);
    let phase = Duration::from_secs(seconds);
    let body = review_body();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "appset-webhook admission benchmark: pod review {} bytes, 3 PodInjections, HTTPS (TLS 1.3, http/1.1) on 127.0.0.1, {cpus} CPUs, load average {load_before}",
        body.len(),
    );

    // The store, fed directly.
    let (store, mut writer) = reflector::store::<PodInjection>();
    writer.apply_watcher_event(&watcher::Event::Init);
    for pi in injections() {
        writer.apply_watcher_event(&watcher::Event::InitApply(pi));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);

    let mut table = Table::default();
    if run("inprocess") {
        in_process(&body, &store.state(), &mut table);
    }

    // The server in a runtime of its own (as in the binary: one worker per CPU), the load
    // generator in another, both on the same CPUs.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("server")
        .build()?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("generator")
        .build()?;
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
    let listener = server_rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = server_rt.spawn(server::run(listener, state, async move {
        let _ = stop_rx.await;
    }));
    let probe = Probe::new(addr, "127.0.0.1", &m.bundle())?;

    client_rt.block_on(async {
        // Warm-up.
        let mut warm = probe.connect().await?;
        for _ in 0..500 {
            admit(&mut warm, &body).await;
        }
        drop(warm);

        if run("fixed") {
            let (mut lat, failures, mut pacing, elapsed) =
                fixed_rate(&probe, &body, rate, phase).await?;
            report(
                &format!("fixed rate {rate}/s, 16 connections"),
                &mut lat,
                failures,
                elapsed,
            );
            pacing.sort();
            let (p50, p99) = (percentile(&pacing, 0.5), percentile(&pacing, 0.99));
            println!(
                "{:<44} p50 {:>5.0} µs  p99 {:>5.0} µs  max {:>5.0} µs  (send time minus due time)",
                "  generator pacing error",
                us(p50),
                us(p99),
                us(pacing.last().copied().unwrap_or_default()),
            );
            let (l50, l99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
            let p99_ratio = if failures == 0 && !lat.is_empty() {
                ms(l99)
            } else {
                f64::INFINITY
            };
            table.goal(
                &format!("fixed {}/s: p50 / p99", thousands(rate)),
                &format!("{:.2} / {:.2} ms", ms(l50), ms(l99)),
                "goal p99 1 ms",
                p99_ratio,
                false,
                1.0,
            );
            table.row(
                "generator pacing error p50 / p99",
                &format!("{:.0} / {:.0} µs", us(p50), us(p99)),
                "",
                "",
                "",
            );
        }

        if run("saturation") {
            for conns in [1usize, 4, 16] {
                let (mut lat, failures, elapsed) = saturation(&probe, &body, conns, phase).await;
                let throughput = report(
                    &format!("saturation, {conns} connection(s)"),
                    &mut lat,
                    failures,
                    elapsed,
                );
                let ok = if failures == 0 { throughput } else { 0.0 };
                table.goal(
                    &format!("saturation, {conns} connections, HTTPS http/1.1"),
                    &format!("{} reviews/s", thousands(throughput as u64)),
                    "goal 20,000/s",
                    ok / 20_000.0,
                    true,
                    1.0,
                );
            }
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;

    let _ = stop_tx.send(());
    server_rt.block_on(server)??;
    let load_after = loadavg();
    println!("load average before {load_before}, after {load_after}");
    let first = |l: &str| l.split_whitespace().next().unwrap_or("?").to_string();
    table.row(
        "load average before / after",
        &format!("{} / {}", first(&load_before), first(&load_after)),
        "",
        "",
        "",
    );
    table.write()?;
    Ok(())
}
