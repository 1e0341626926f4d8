//! The HTTPS server in-process on loopback, without a cluster: PodInjections are fed into the
//! reflector store directly and the certificate comes from the material module.

use std::sync::Arc;

use appset_crds::{PodInjection, PodInjectionSpec};
use appset_process::readiness::Readiness;
use appset_webhook::metrics::Metrics;
use appset_webhook::probe::Probe;
use appset_webhook::server::{self, AppState};
use appset_webhook::tls::material::{self, Policy};
use appset_webhook::tls::resolver::CertResolver;
use base64::Engine;
use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use kube::runtime::{reflector, watcher};
use serde_json::{Value, json};

fn injection() -> PodInjection {
    let spec: PodInjectionSpec = serde_json::from_value(json!({
        "selector": {"matchLabels": {"app": "web"}},
        "initContainers": [{"name": "git-clone", "image": "alpine/git", "volumeMounts": [{"name": "content", "mountPath": "/work"}]}],
        "volumes": [{"name": "content", "emptyDir": {}}],
        "volumeMounts": [{"name": "content", "mountPath": "/usr/share/nginx/html", "readOnly": true}],
    }))
    .expect("spec");
    let mut pi = PodInjection::new("git-content", spec);
    pi.metadata.namespace = Some("site".into());
    pi.metadata.generation = Some(2);
    pi
}

fn review() -> Bytes {
    Bytes::from(
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "3f0e", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "site", "operation": "CREATE",
                "object": {"metadata": {"name": "web", "labels": {"app": "web"}},
                           "spec": {"containers": [{"name": "nginx", "image": "nginx"}]}}
            }
        }))
        .expect("json"),
    )
}

#[tokio::test]
async fn serves_reviews_health_readiness_metrics_and_swaps_certificates() {
    let policy = Policy::default();
    let now = time::OffsetDateTime::now_utc();
    let m = material::create(&policy, now).expect("material");
    let resolver = Arc::new(CertResolver::new());
    assert!(resolver.load_pem(&m.tls_cert, &m.tls_key).expect("load"));
    let (store, mut writer) = reflector::store::<PodInjection>();
    let readiness = Readiness::new();
    let synced = readiness.handle("PodInjection watch");
    let state = Arc::new(AppState {
        injections: store,
        namespaces: None,
        resolver: resolver.clone(),
        metrics: Metrics::new(),
        readiness,
        denials: None,
        gate: quick_gate(),
        client_roots: None,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::run(listener, state.clone(), async move {
        let _ = stop_rx.await;
    }));

    let probe = Probe::new(addr, "127.0.0.1", &m.bundle()).expect("probe");
    let mut conn = probe.connect().await.expect("connect");
    let (status, _) = conn
        .send(Method::GET, "/healthz", Bytes::new())
        .await
        .expect("healthz");
    assert_eq!(status, StatusCode::OK);
    let (status, body) = conn
        .send(Method::GET, "/readyz", Bytes::new())
        .await
        .expect("readyz");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        String::from_utf8_lossy(&body),
        "waiting for: PodInjection watch\n"
    );

    writer.apply_watcher_event(&watcher::Event::Init);
    writer.apply_watcher_event(&watcher::Event::InitApply(injection()));
    writer.apply_watcher_event(&watcher::Event::InitDone);
    synced.ready();
    let (status, _) = conn
        .send(Method::GET, "/readyz", Bytes::new())
        .await
        .expect("readyz");
    assert_eq!(status, StatusCode::OK);

    let (status, body) = conn
        .send(Method::POST, "/mutate-pods", review())
        .await
        .expect("review");
    assert_eq!(status, StatusCode::OK);
    let out: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(out["response"]["uid"], "3f0e");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(out["response"]["patch"].as_str().expect("patch"))
        .expect("base64");
    let ops: Value = serde_json::from_slice(&patch).expect("ops");
    assert_eq!(ops[0]["path"], "/spec/initContainers");
    assert_eq!(ops[3]["value"]["appset.dev/injected"], "git-content@2");

    let (status, _) = conn
        .send(
            Method::POST,
            "/mutate-pods",
            Bytes::from_static(b"{\"request\":"),
        )
        .await
        .expect("bad body");
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = conn
        .send(
            Method::POST,
            "/mutate-pods",
            Bytes::from(vec![b' '; server::Limits::default().max_body + 1]),
        )
        .await
        .expect("large body");
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let mut conn = probe.connect().await.expect("reconnect");
    let (status, _) = conn
        .send(Method::GET, "/nope", Bytes::new())
        .await
        .expect("404");
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = conn
        .send(Method::GET, "/metrics", Bytes::new())
        .await
        .expect("metrics");
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("appset_webhook_injections_total 1"), "{text}");
    assert!(
        text.contains("appset_webhook_errors_total{kind=\"bad_request\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("appset_webhook_errors_total{kind=\"body\"} 1"),
        "{text}"
    );

    // A renewed serving certificate from the same CA: new connections get it, the old one
    // keeps working, and the same CA bundle trusts both.
    let mut renewed_policy = policy.clone();
    renewed_policy.sans.push("localhost".into());
    let (renewed, _) = material::next_step(&m, &renewed_policy, now, true)
        .expect("step")
        .expect("renewal");
    assert!(
        resolver
            .load_pem(&renewed.tls_cert, &renewed.tls_key)
            .expect("load")
    );
    let mut fresh = probe.connect().await.expect("connect after renewal");
    let (status, _) = fresh
        .send(Method::POST, "/mutate-pods", review())
        .await
        .expect("review after renewal");
    assert_eq!(status, StatusCode::OK);
    let (status, _) = conn
        .send(Method::POST, "/mutate-pods", review())
        .await
        .expect("old connection");
    assert_eq!(status, StatusCode::OK);
    let by_name = Probe::new(addr, "localhost", &m.bundle()).expect("probe");
    assert!(by_name.connect().await.is_ok(), "the new SAN is served");

    // A client that trusts another CA refuses the server.
    let other = material::create(&policy, now).expect("other CA");
    let stranger = Probe::new(addr, "127.0.0.1", &other.bundle()).expect("probe");
    assert!(stranger.connect().await.is_err());

    let _ = stop_tx.send(());
    server.await.expect("join").expect("server");
}

#[test]
fn lookup_reads_injections_from_memory_and_the_namespace_cache_only_counts() {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::core::PartialObjectMeta;
    let (store, mut writer) = reflector::store::<PodInjection>();
    writer.apply_watcher_event(&watcher::Event::Apply(injection()));
    let mut other = injection();
    other.metadata.namespace = Some("elsewhere".into());
    writer.apply_watcher_event(&watcher::Event::Apply(other));
    let (namespaces, mut ns_writer) = reflector::store::<PartialObjectMeta<Namespace>>();
    let mut ns = PartialObjectMeta::<Namespace>::default();
    ns.metadata.name = Some("site".into());
    ns.metadata.labels = Some(
        [("appset.dev/injection".to_string(), "enabled".to_string())]
            .into_iter()
            .collect(),
    );
    ns_writer.apply_watcher_event(&watcher::Event::Apply(ns));
    let state = AppState {
        injections: store,
        namespaces: Some(namespaces),
        resolver: Arc::new(CertResolver::new()),
        metrics: Metrics::new(),
        readiness: Readiness::new(),
        denials: None,
        gate: quick_gate(),
        client_roots: None,
    };
    let found = state.lookup("site");
    assert_eq!(found.len(), 1);
    assert!(state.lookup("unknown").is_empty());
    // The cache agrees for "site"; for a namespace it does not know (or shows as not opted in)
    // it is stale, which is counted, never acted on.
    assert!(!state.namespace_cache_is_stale("site"));
    assert!(state.namespace_cache_is_stale("unknown"));
    assert_eq!(
        state.readyz().body,
        "no serving certificate is loaded yet\n",
        "without a certificate the webhook is unready whatever its watches say"
    );
}

/// A review of `injection()`'s namespace whose pod asks for an init container the injection
/// also adds under another image: a conflict, denied.
fn conflicting_review(dry_run: bool) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "u-dry", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "namespace": "site", "operation": "CREATE", "dryRun": dry_run,
                "object": {"metadata": {"name": "web", "labels": {"app": "web"}},
                           "spec": {"containers": [{"name": "nginx", "image": "nginx"}],
                                    "initContainers": [{"name": "git-clone", "image": "other:1"}]}}
            }
        }))
        .expect("json"),
    )
}

#[test]
fn a_dry_run_denial_is_answered_but_never_reported() {
    let (store, mut writer) = reflector::store::<PodInjection>();
    writer.apply_watcher_event(&watcher::Event::Apply(injection()));
    let (denials, mut rx) = appset_webhook::events::channel(8);
    let state = AppState {
        injections: store,
        namespaces: None,
        resolver: Arc::new(CertResolver::new()),
        metrics: Metrics::new(),
        readiness: Readiness::new(),
        denials: Some(denials),
        gate: quick_gate(),
        client_roots: None,
    };
    let answer = |dry_run| {
        let r = server::review(&state, &conflicting_review(dry_run));
        let body = futures::executor::block_on(http_body_util::BodyExt::collect(r.into_body()))
            .expect("body")
            .to_bytes();
        serde_json::from_slice::<serde_json::Value>(&body).expect("json")
    };
    let dry = answer(true);
    assert_eq!(dry["response"]["allowed"], false, "{dry}");
    assert!(rx.try_recv().is_err(), "a dry run reported a denial");
    let real = answer(false);
    assert_eq!(real["response"]["allowed"], false);
    assert!(rx.try_recv().is_ok(), "a real denial is reported");
}

/// Default limits without a drain period.
fn quick_gate() -> server::Gate {
    server::Gate::new(server::Limits {
        drain: std::time::Duration::ZERO,
        ..Default::default()
    })
}

/// A server on loopback with `limits`, one PodInjection and a loaded certificate; its probe,
/// and the sender that starts its shutdown.
async fn start(
    limits: server::Limits,
) -> (
    Probe,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), server::ServerError>>,
) {
    let m =
        material::create(&Policy::default(), time::OffsetDateTime::now_utc()).expect("material");
    let resolver = Arc::new(CertResolver::new());
    assert!(resolver.load_pem(&m.tls_cert, &m.tls_key).expect("load"));
    let (store, mut writer) = reflector::store::<PodInjection>();
    writer.apply_watcher_event(&watcher::Event::Apply(injection()));
    let state = Arc::new(AppState {
        injections: store,
        namespaces: None,
        resolver,
        metrics: Metrics::new(),
        readiness: Readiness::new(),
        denials: None,
        gate: server::Gate::new(limits),
        client_roots: None,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::run(listener, state, async move {
        let _ = stop_rx.await;
    }));
    (
        Probe::new(addr, "127.0.0.1", &m.bundle()).expect("probe"),
        stop_tx,
        server,
    )
}

#[tokio::test]
async fn on_shutdown_the_server_drains_before_it_stops() {
    use std::time::{Duration, Instant};
    let drain = Duration::from_millis(1500);
    let (probe, stop, server) = start(server::Limits {
        drain,
        ..Default::default()
    })
    .await;
    let mut kept = probe.connect().await.expect("connect");
    let (status, headers, _) = kept
        .send_full(Method::POST, "/mutate-pods", review())
        .await
        .expect("review");
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers.get("connection").is_none(),
        "kept alive while serving"
    );
    let began = Instant::now();
    let _ = stop.send(());
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Draining: still answering, on kept-alive and new connections alike, unready, and asking
    // each client to close its connection after the answer.
    let (status, headers, _) = kept
        .send_full(Method::POST, "/mutate-pods", review())
        .await
        .expect("a review on a kept-alive connection while draining");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        headers.get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        kept.is_closed(),
        "the connection was closed after its answer"
    );
    let mut fresh = probe
        .connect()
        .await
        .expect("a new connection while draining");
    let (status, body) = fresh
        .send(Method::GET, "/readyz", Bytes::new())
        .await
        .expect("readyz");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(String::from_utf8_lossy(&body).contains("draining"));
    let mut fresh = probe
        .connect()
        .await
        .expect("a new connection while draining");
    let (status, _) = fresh
        .send(Method::POST, "/mutate-pods", review())
        .await
        .expect("review while draining");
    assert_eq!(status, StatusCode::OK);
    // Then it stops: after the drain period, not before.
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server stops")
        .expect("join")
        .expect("server");
    assert!(
        began.elapsed() >= drain,
        "stopped after {:?}",
        began.elapsed()
    );
    assert!(probe.connect().await.is_err(), "no longer accepting");
}

#[tokio::test]
async fn oversized_and_slow_clients_are_refused_and_others_still_answered() {
    use std::time::{Duration, Instant};
    use tokio::io::AsyncWriteExt;
    let limits = server::Limits {
        max_connections: 4,
        max_body: 64 * 1024,
        body_budget: 128 * 1024,
        body_timeout: Duration::from_millis(500),
        drain: Duration::ZERO,
    };
    let (probe, stop, server) = start(limits).await;
    // Above the largest body: refused from the declared length.
    let mut conn = probe.connect().await.expect("connect");
    let (status, _) = conn
        .send(
            Method::POST,
            "/mutate-pods",
            Bytes::from(vec![b' '; 100 * 1024]),
        )
        .await
        .expect("oversized");
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    // Slow clients: each declares 60 KiB and sends 10 bytes. Two fill the body budget (each
    // holds 60 KiB of it), and all four connection slots are taken.
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut tls = probe.connect_tls().await.expect("tls");
        tls.write_all(
            b"POST /mutate-pods HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 61440\r\n\r\n{\"request\"",
        )
        .await
        .expect("write");
        tls.flush().await.expect("flush");
        slow.push(tls);
    }
    // A well-behaved client gets through once the slow ones time out (408 or 503 for them),
    // within about one body timeout plus one budget wait.
    let sent = Instant::now();
    let mut good = tokio::time::timeout(Duration::from_secs(5), probe.connect())
        .await
        .expect("connected in time")
        .expect("connect");
    let (status, _) = good
        .send(Method::POST, "/mutate-pods", review())
        .await
        .expect("review");
    let waited = sent.elapsed();
    assert_eq!(status, StatusCode::OK);
    assert!(waited < Duration::from_secs(3), "answered after {waited:?}");
    let mut answers = Vec::new();
    for mut tls in slow {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(3), tls.read(&mut buf))
            .await
            .map(|r| r.unwrap_or(0))
            .unwrap_or(0);
        answers.push(
            String::from_utf8_lossy(&buf[..n])
                .lines()
                .next()
                .unwrap_or_default()
                .to_string(),
        );
    }
    for a in &answers {
        assert!(
            a.contains(" 408 ") || a.contains(" 503 "),
            "a slow client got {a:?} ({answers:?})"
        );
    }
    let _ = stop.send(());
    let _ = server.await;
}

#[tokio::test]
async fn clients_holding_large_bodies_cannot_keep_a_small_review_waiting() {
    use std::time::{Duration, Instant};
    use tokio::io::AsyncWriteExt;
    // 512 KiB of bodies: 448 KiB for any body, 64 KiB that only small ones may use.
    let limits = server::Limits {
        max_connections: 8,
        max_body: 256 * 1024,
        body_budget: 512 * 1024,
        body_timeout: Duration::from_secs(3),
        drain: Duration::ZERO,
    };
    let (probe, stop, server) = start(limits).await;
    // Two clients declare 224 KiB each and stall: the general budget is full.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut tls = probe.connect_tls().await.expect("tls");
        tls.write_all(
            format!(
                "POST /mutate-pods HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{{\"request\"",
                224 * 1024
            )
            .as_bytes(),
        )
        .await
        .expect("write");
        tls.flush().await.expect("flush");
        slow.push(tls);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = Instant::now();
    let mut good = probe.connect().await.expect("connect");
    let (status, _) = good
        .send(Method::POST, "/mutate-pods", review())
        .await
        .expect("review");
    let waited = sent.elapsed();
    assert_eq!(status, StatusCode::OK);
    assert!(
        waited < Duration::from_secs(1),
        "the small review waited {waited:?} behind the large bodies"
    );
    drop(slow);
    let _ = stop.send(());
    let _ = server.await;
}

/// A review of a Pod CREATE in `site` whose pod matches `injection()` and carries the
/// config-snapshots annotation `annotation`.
fn pin_review(uid: &str, operation: &str, annotation: &str) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "site", "operation": operation,
                "object": {
                    "metadata": {"name": "web-0", "labels": {"app": "web"},
                                 "annotations": {appset_crds::keys::CONFIG_SNAPSHOTS: annotation}},
                    "spec": {
                        "containers": [{"name": "app", "image": "app:1",
                                        "envFrom": [{"configMapRef": {"name": "app-config"}}],
                                        "env": [{"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}]}],
                        "volumes": [{"name": "cfg", "projected": {"sources": [{"configMap": {"name": "app-config"}}, {"secret": {"name": "tls"}}]}}]
                    }
                }
            }
        }))
        .expect("json"),
    )
}

const SNAPSHOTS: &str =
    r#"{"configmap/app-config":"app-config-7f3a9c21e4","secret/db":"db-0b4e99d2aa"}"#;

#[tokio::test]
async fn pin_config_rewrites_references_to_snapshots_and_denies_a_malformed_annotation() {
    let (probe, stop, server) = start(server::Limits {
        drain: std::time::Duration::ZERO,
        ..Default::default()
    })
    .await;
    let mut conn = probe.connect().await.expect("connect");

    // The pod matches a PodInjection, but /pin-config only pins: replace operations, no add.
    let (status, body) = conn
        .send(
            Method::POST,
            "/pin-config",
            pin_review("p-1", "CREATE", SNAPSHOTS),
        )
        .await
        .expect("review");
    assert_eq!(status, StatusCode::OK);
    let out: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(out["kind"], "AdmissionReview");
    assert_eq!(out["response"]["uid"], "p-1");
    assert_eq!(out["response"]["allowed"], true);
    assert_eq!(out["response"]["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(out["response"]["patch"].as_str().expect("patch"))
        .expect("base64");
    let ops: Value = serde_json::from_slice(&patch).expect("ops");
    assert_eq!(
        ops,
        json!([
            {"op": "replace", "path": "/spec/containers/0/envFrom/0/configMapRef/name", "value": "app-config-7f3a9c21e4"},
            {"op": "replace", "path": "/spec/containers/0/env/0/valueFrom/secretKeyRef/name", "value": "db-0b4e99d2aa"},
            {"op": "replace", "path": "/spec/volumes/0/projected/sources/0/configMap/name", "value": "app-config-7f3a9c21e4"},
        ])
    );

    // A malformed annotation: an AdmissionReview denial (HTTP 200) with code 400 and a message
    // naming the annotation and the fault.
    let (status, body) = conn
        .send(
            Method::POST,
            "/pin-config",
            pin_review("p-2", "CREATE", r#"{"configmap/app-config":"app_config"}"#),
        )
        .await
        .expect("malformed");
    assert_eq!(status, StatusCode::OK);
    let out: Value = serde_json::from_slice(&body).expect("json");
    let r = &out["response"];
    assert_eq!(r["uid"], "p-2");
    assert_eq!(r["allowed"], false);
    assert_eq!(r["status"]["code"], 400);
    assert!(r.get("patch").is_none());
    assert_eq!(
        r["status"]["message"],
        "pod site/web-0: annotation appset.dev/config-snapshots is malformed: snapshot name \
         \"app_config\" of \"configmap/app-config\" is not a valid DNS-1123 subdomain: only \
         lowercase letters, digits, '-' and '.' are allowed"
    );
    let (_, body) = conn
        .send(
            Method::POST,
            "/pin-config",
            pin_review("p-3", "CREATE", "[1]"),
        )
        .await
        .expect("not an object");
    let out: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(out["response"]["allowed"], false);
    assert!(
        out["response"]["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(
                "appset.dev/config-snapshots is malformed: not a JSON object of strings"
            )),
        "{out}"
    );

    // Not a Pod CREATE: allowed without a patch, whatever the annotation.
    let (status, body) = conn
        .send(
            Method::POST,
            "/pin-config",
            pin_review("p-4", "UPDATE", "garbage"),
        )
        .await
        .expect("update");
    assert_eq!(status, StatusCode::OK);
    let out: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(out["response"]["allowed"], true);
    assert!(out["response"].get("patch").is_none());

    // Not an AdmissionReview: 400; above the largest body: 413, as on /mutate-pods.
    let (status, _) = conn
        .send(
            Method::POST,
            "/pin-config",
            Bytes::from_static(b"{\"request\":"),
        )
        .await
        .expect("bad body");
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = conn
        .send(
            Method::POST,
            "/pin-config",
            Bytes::from(vec![b' '; server::Limits::default().max_body + 1]),
        )
        .await
        .expect("large body");
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    let mut conn = probe.connect().await.expect("reconnect");
    let (_, body) = conn
        .send(Method::GET, "/metrics", Bytes::new())
        .await
        .expect("metrics");
    let text = String::from_utf8_lossy(&body);
    for line in [
        "appset_webhook_pinned_total 1",
        "appset_webhook_pin_denials_total 2",
        "appset_webhook_pin_skipped_total{reason=\"not_pod_create\"} 1",
        "appset_webhook_injections_total 0",
        "appset_webhook_errors_total{kind=\"bad_request\"} 1",
        "appset_webhook_errors_total{kind=\"body\"} 1",
        "appset_webhook_admission_duration_seconds_count{outcome=\"pinned\"} 1",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
    let _ = stop.send(());
    let _ = server.await;
}

#[tokio::test]
async fn with_a_client_ca_pin_config_needs_a_client_certificate() {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let m =
        material::create(&Policy::default(), time::OffsetDateTime::now_utc()).expect("material");
    let resolver = Arc::new(CertResolver::new());
    assert!(resolver.load_pem(&m.tls_cert, &m.tls_key).expect("load"));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(m.bundle().as_bytes()) {
        roots.add(cert.expect("pem")).expect("root");
    }
    let (store, _writer) = reflector::store::<PodInjection>();
    let state = Arc::new(AppState {
        injections: store,
        namespaces: None,
        resolver,
        metrics: Metrics::new(),
        readiness: Readiness::new(),
        denials: None,
        gate: quick_gate(),
        client_roots: Some(Arc::new(roots)),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::run(listener, state, async move {
        let _ = stop_rx.await;
    }));
    // The probe presents no client certificate.
    let probe = Probe::new(addr, "127.0.0.1", &m.bundle()).expect("probe");
    let mut conn = probe.connect().await.expect("connect");
    for path in ["/pin-config", "/mutate-pods"] {
        let (status, _) = conn
            .send(Method::POST, path, pin_review("p-5", "CREATE", SNAPSHOTS))
            .await
            .expect("review");
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
    }
    let (status, _) = conn
        .send(Method::GET, "/healthz", Bytes::new())
        .await
        .expect("healthz");
    assert_eq!(status, StatusCode::OK);
    let (_, body) = conn
        .send(Method::GET, "/metrics", Bytes::new())
        .await
        .expect("metrics");
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("appset_webhook_errors_total{kind=\"unauthenticated\"} 2"),
        "{text}"
    );
    assert!(text.contains("appset_webhook_pinned_total 0"), "{text}");
    let _ = stop_tx.send(());
    let _ = server.await;
}
