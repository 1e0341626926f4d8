//! The local API server calls an admission webhook served by the test process over TLS at
//! `https://127.0.0.1:<port>`, trusting it through the `caBundle`, and applies the JSON Patch it
//! returns. This is the path the appset webhook takes in every other e2e test.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use appset_e2e::TestNamespace;
use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Request, Response};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// A CA and a serving certificate for 127.0.0.1, as PEM.
struct TestPki {
    ca_pem: String,
    acceptor: TlsAcceptor,
}

fn pki() -> Result<TestPki> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let mut leaf_params = CertificateParams::new(vec!["localhost".to_string()])?;
    leaf_params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    let leaf_key = KeyPair::generate()?;
    let leaf = leaf_params.signed_by(&leaf_key, &ca)?;
    let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der())
        .map_err(|e| anyhow::anyhow!("key: {e}"))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(vec![leaf.der().clone()], key)?;
    Ok(TestPki {
        ca_pem: ca.pem(),
        acceptor: TlsAcceptor::from(Arc::new(config)),
    })
}

/// Answers every AdmissionReview by adding the label `e2e.appset.dev/mutated: "yes"`.
async fn handle(
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let body = req.into_body().collect().await?.to_bytes();
    let review: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let uid = review["request"]["uid"].clone();
    let has_labels = review["request"]["object"]["metadata"]["labels"].is_object();
    let patch = if has_labels {
        json!([{"op": "add", "path": "/metadata/labels/e2e.appset.dev~1mutated", "value": "yes"}])
    } else {
        json!([{"op": "add", "path": "/metadata/labels", "value": {"e2e.appset.dev/mutated": "yes"}}])
    };
    let patch = base64::engine::general_purpose::STANDARD
        .encode(serde_json::to_vec(&patch).unwrap_or_default());
    let response = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {"uid": uid, "allowed": true, "patchType": "JSONPatch", "patch": patch}
    });
    Ok(Response::new(Full::new(Bytes::from(
        serde_json::to_vec(&response).unwrap_or_default(),
    ))))
}

#[tokio::test]
async fn api_server_calls_a_loopback_webhook_and_applies_its_patch() -> Result<()> {
    let ns = TestNamespace::new("cluster-webhook").await?;
    let pki = pki()?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let acceptor = pki.acceptor.clone();
    let server = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                break;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let io = hyper_util::rt::TokioIo::new(tls);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service_fn(handle))
                        .await;
                }
            });
        }
    });

    let name = format!("e2e-{}", ns.name);
    let mwc: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": name},
        "webhooks": [{
            "name": "e2e.appset.dev",
            "clientConfig": {
                "url": format!("https://127.0.0.1:{port}/mutate"),
                "caBundle": base64::engine::general_purpose::STANDARD.encode(&pki.ca_pem)
            },
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns.name}},
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 5
        }]
    }))?;
    let mwcs: Api<MutatingWebhookConfiguration> = Api::all(ns.client.clone());
    mwcs.create(&PostParams::default(), &mwc).await?;

    // The configuration takes effect asynchronously: retry the create until the label appears.
    let pods = ns.api::<Pod>();
    let mut seen = String::new();
    let mut mutated = false;
    for attempt in 0..40 {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": format!("p{attempt}"), "labels": {"app": "x"}},
            "spec": {"containers": [{"name": "c", "image": "nginx"}]}
        }))?;
        let created = pods
            .create(&PostParams::default(), &pod)
            .await
            .context("create pod")?;
        let labels = created.metadata.labels.unwrap_or_default();
        if labels.get("e2e.appset.dev/mutated").map(String::as_str) == Some("yes") {
            mutated = true;
            break;
        }
        seen = format!("{labels:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    mwcs.delete(&name, &DeleteParams::default()).await?;
    server.abort();
    assert!(
        mutated,
        "the webhook's patch never appeared; last labels {seen}"
    );
    ns.cleanup().await;
    Ok(())
}
