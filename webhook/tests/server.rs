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
            Bytes::from(vec![b' '; server::MAX_BODY + 1]),
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
    let (renewed, _) = material::next_step(&m, &renewed_policy, now)
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
