//! The operator's Kubernetes client: one [`kube::Client`] built from the configuration with
//! three layers of our own around kube's stack.
//!
//! * a `User-Agent` naming the binary, its version and the replica's identity, so the API
//!   server's audit log and metrics tell the replicas' requests apart;
//! * the leader [`Fence`]: a request is refused before it is sent while this replica does not
//!   lead (see [`super::lease`]);
//! * a count of the response bytes received from the API server (`/metrics`:
//!   `appset_apiserver_response_bytes_total`), so that what the watches cost is measured.

use http::HeaderValue;
use http_body_util::BodyExt;
use kube::client::ClientBuilder;
use kube::{Client, Config};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

use super::lease::Fence;

/// The client's own metrics.
#[derive(Clone, Debug, Default)]
pub struct ClientMetrics {
    /// Bytes of response bodies received from the API server (lists, watches, gets, writes).
    pub response_bytes: Counter,
}

impl ClientMetrics {
    /// Creates the counter and registers it as `appset_apiserver_response_bytes`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "appset_apiserver_response_bytes",
            "Bytes of response bodies received from the Kubernetes API server",
            m.response_bytes.clone(),
        );
        m
    }
}

/// The `User-Agent` of the replica `identity`.
pub fn user_agent(identity: &str) -> String {
    let clean: String = identity.chars().filter(|c| c.is_ascii_graphic()).collect();
    format!("appset-operator/{} ({clean})", env!("CARGO_PKG_VERSION"))
}

/// Builds the client: `config` with our `User-Agent`, every request through `fence`, every
/// response body counted into `metrics`.
pub fn build(
    mut config: Config,
    identity: &str,
    fence: &Fence,
    metrics: &ClientMetrics,
) -> Result<Client, kube::Error> {
    if let Ok(agent) = HeaderValue::from_str(&user_agent(identity)) {
        config.headers.push((http::header::USER_AGENT, agent));
    }
    let counter = metrics.response_bytes.clone();
    let count = tower::util::MapResponseLayer::new(
        move |response: http::Response<Box<kube::client::DynBody>>| {
            let counter = counter.clone();
            response.map(|body| {
                let counted = body.map_frame(move |frame| {
                    if let Some(data) = frame.data_ref() {
                        counter.inc_by(data.len() as u64);
                    }
                    frame
                });
                Box::new(counted) as Box<kube::client::DynBody>
            })
        },
    );
    Ok(ClientBuilder::try_from(config)?
        .with_layer(&count)
        .with_layer(&fence.layer())
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_agent_names_the_replica() {
        let ua = user_agent("appset-operator-7d9f-x2 \n");
        assert!(ua.starts_with("appset-operator/"), "{ua}");
        assert!(ua.ends_with("(appset-operator-7d9f-x2)"), "{ua}");
        assert!(HeaderValue::from_str(&ua).is_ok());
    }
}
