//! The admin endpoints both binaries serve: `/healthz`, `/readyz` and `/metrics`.
//!
//! The answers are computed here as plain [`Answer`] values, so that each binary serves the
//! same bodies and status codes whatever its HTTP stack: the operator mounts [`router`] (axum),
//! the webhook calls [`healthz`], [`readyz`] and [`metrics`] from its own hyper handler next
//! to the admission path.
//!
//! | path | answer |
//! | --- | --- |
//! | `/healthz` | 200 while the process serves and no loop with work waiting has gone without progress for longer than its timeout ([`crate::liveness`]); else 503 naming them |
//! | `/readyz` | 200 `standby` while a replica waits for the leader Lease; 200 `ok` once no readiness gate is open; else 503 naming the open gates |
//! | `/metrics` | the registry in the OpenMetrics text format |

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;

use crate::liveness::Liveness;
use crate::readiness::Readiness;

/// The content type of [`metrics`].
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the other answers.
pub const TEXT: &str = "text/plain; charset=utf-8";

/// One admin answer: status code, content type and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The HTTP status code.
    pub status: u16,
    /// The `Content-Type` header.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

impl Answer {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: TEXT,
            body: body.into(),
        }
    }
}

/// `/healthz`: 200 while the process serves and no loop of `liveness` is stalled; else 503
/// naming the stalled loops (the kubelet then restarts the container).
pub fn healthz(liveness: &Liveness) -> Answer {
    let stalled = liveness.stalled();
    if stalled.is_empty() {
        Answer::text(200, "ok\n")
    } else {
        Answer::text(503, format!("stalled: {}\n", stalled.join(", ")))
    }
}

/// `/readyz`. A replica on `standby` (waiting for the leader Lease) is ready to take over and
/// answers 200: reporting it unready would keep a Deployment of several replicas from ever
/// completing its rollout.
pub fn readyz(readiness: &Readiness, standby: bool) -> Answer {
    if standby {
        return Answer::text(200, "standby\n");
    }
    let pending = readiness.pending();
    if pending.is_empty() {
        Answer::text(200, "ok\n")
    } else {
        Answer::text(503, format!("waiting for: {}\n", pending.join(", ")))
    }
}

/// A 503 `/readyz` answer for a reason the caller checks itself (the webhook's certificate).
pub fn unavailable(why: &str) -> Answer {
    Answer::text(503, format!("{why}\n"))
}

/// `/metrics`: `registry` in the OpenMetrics text format.
pub fn metrics(registry: &Registry) -> Answer {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => Answer {
            status: 200,
            content_type: OPENMETRICS,
            body,
        },
        Err(_) => Answer::text(500, "cannot encode metrics\n"),
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            [(header::CONTENT_TYPE, self.content_type)],
            self.body,
        )
            .into_response()
    }
}

#[derive(Clone)]
struct Admin {
    registry: Arc<Registry>,
    readiness: Readiness,
    liveness: Liveness,
    standby: Arc<AtomicBool>,
}

/// The axum router for `/metrics`, `/healthz` and `/readyz`; `standby` is read on each
/// `/readyz`.
pub fn router(
    registry: Arc<Registry>,
    readiness: Readiness,
    liveness: Liveness,
    standby: Arc<AtomicBool>,
) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(a): State<Admin>| async move { metrics(&a.registry) }),
        )
        .route(
            "/healthz",
            get(|State(a): State<Admin>| async move { healthz(&a.liveness) }),
        )
        .route(
            "/readyz",
            get(|State(a): State<Admin>| async move {
                readyz(&a.readiness, a.standby.load(Ordering::Acquire))
            }),
        )
        .with_state(Admin {
            registry,
            readiness,
            liveness,
            standby,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn readyz_names_the_open_gates_until_they_close() {
        let r = Readiness::new();
        let a = r.handle("Deployment watch");
        let b = r.handle("Secret watch");
        let answer = readyz(&r, false);
        assert_eq!(answer.status, 503);
        assert_eq!(answer.body, "waiting for: Deployment watch, Secret watch\n");
        assert_eq!(readyz(&r, true), Answer::text(200, "standby\n"));
        a.ready();
        b.ready();
        assert_eq!(readyz(&r, false), Answer::text(200, "ok\n"));
    }

    #[test]
    fn metrics_are_openmetrics_text() {
        let mut registry = Registry::default();
        let c = Counter::<u64>::default();
        registry.register("reconciles", "Reconciles", c.clone());
        c.inc();
        let answer = metrics(&registry);
        assert_eq!(answer.status, 200);
        assert_eq!(answer.content_type, OPENMETRICS);
        assert!(
            answer.body.contains("reconciles_total 1"),
            "{}",
            answer.body
        );
        assert!(answer.body.ends_with("# EOF\n"));
    }

    #[test]
    fn healthz_is_ok() {
        let l = Liveness::new(std::time::Duration::ZERO);
        assert_eq!(healthz(&l), Answer::text(200, "ok\n"));
        l.register("Lease loop").demand();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let a = healthz(&l);
        assert_eq!(a.status, 503);
        assert!(a.body.contains("Lease loop"), "{}", a.body);
    }
}
