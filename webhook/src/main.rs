//! The `appset-webhook` binary: flags and environment; logging and signals come from the shared
//! process shell (`appset_process`), everything else is [`appset_webhook::serve`].

use std::net::SocketAddr;
use std::time::Duration;

use appset_process::logging::{self, LogFormat};
use appset_process::signal;
use appset_webhook::tls::manager::TlsConfig;
use appset_webhook::tls::material::Policy;
use clap::Parser;

// The C library's allocator, on purpose: mimalloc made a review faster, but under the e2e abuse
// test (100 slow 3 MiB bodies and more) it held nearly twice the memory (peak RSS 128-134 MiB
// against 74-75 MiB), breaking the bound the body budget is meant to guarantee.

/// The appset injection webhook: injects the init containers and emptyDir volumes declared in
/// PodInjections into pods at creation. Log levels come from RUST_LOG (default `info`).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to serve HTTPS on.
    #[arg(long, env = "APPSET_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// Name of the Secret holding the CA and serving certificate (created when absent).
    #[arg(
        long,
        env = "APPSET_WEBHOOK_CERT_SECRET",
        default_value = "appset-webhook-certs"
    )]
    cert_secret_name: String,
    /// Namespace of that Secret (usually the webhook's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "appset-system")]
    cert_secret_namespace: String,
    /// MutatingWebhookConfiguration whose caBundle the webhook keeps current.
    #[arg(long, env = "APPSET_WEBHOOK_CONFIGURATION")]
    webhook_configuration: Option<String>,
    /// Subject alternative names of the serving certificate (DNS names or IPs), comma-separated.
    #[arg(
        long = "san",
        env = "APPSET_WEBHOOK_SANS",
        value_delimiter = ',',
        default_value = "127.0.0.1"
    )]
    sans: Vec<String>,
    /// Watch PodInjections in this namespace only.
    #[arg(long, env = "APPSET_WEBHOOK_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Do not keep a namespace label cache (then only the webhook configuration's
    /// namespaceSelector decides; no list/watch on namespaces is needed).
    #[arg(long, env = "APPSET_WEBHOOK_NO_NAMESPACE_CACHE")]
    no_namespace_cache: bool,
    /// Lifetime of the serving certificate, in hours.
    #[arg(long, default_value_t = 90 * 24)]
    serving_validity_hours: u64,
    /// How often certificates are checked, in seconds.
    #[arg(long, default_value_t = 60)]
    check_interval_seconds: u64,
    /// Open connections at most (each serves one request at a time).
    #[arg(long, env = "APPSET_WEBHOOK_MAX_CONNECTIONS", default_value_t = 256)]
    max_connections: usize,
    /// The largest AdmissionReview body accepted, in bytes (413 above).
    #[arg(long, env = "APPSET_WEBHOOK_MAX_BODY_BYTES", default_value_t = 3 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Bytes of request bodies held in memory at once, across all connections.
    #[arg(long, env = "APPSET_WEBHOOK_BODY_BUDGET_BYTES", default_value_t = 64 * 1024 * 1024)]
    body_budget_bytes: usize,
    /// How long a request body may take to arrive, in seconds (408 after).
    #[arg(
        long,
        env = "APPSET_WEBHOOK_BODY_TIMEOUT_SECONDS",
        default_value_t = 10
    )]
    body_timeout_seconds: u64,
    /// How long to keep serving after SIGTERM (with /readyz failing), in seconds.
    #[arg(long, env = "APPSET_WEBHOOK_DRAIN_SECONDS", default_value_t = 15)]
    drain_seconds: u64,
    /// Answer admission reviews only to clients with a certificate signed by a CA in this PEM
    /// file (give the API server one in its admission configuration). Probes and metrics stay
    /// open.
    #[arg(long, env = "APPSET_WEBHOOK_CLIENT_CA_FILE")]
    client_ca_file: Option<std::path::PathBuf>,
    /// Log format.
    #[arg(long, env = "APPSET_LOG_FORMAT", value_enum, default_value_t = LogFormat::default())]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    logging::init(args.log_format);
    let serving = Duration::from_secs(args.serving_validity_hours * 3600);
    let policy = Policy {
        sans: args.sans,
        serving_validity: serving,
        serving_renew_before: serving / 3,
        ..Policy::default()
    };
    let config = appset_webhook::Config {
        listen: args.listen,
        tls: TlsConfig {
            secret_namespace: args.cert_secret_namespace,
            secret_name: args.cert_secret_name,
            webhook_configuration: args.webhook_configuration,
            policy,
            check_interval: Duration::from_secs(args.check_interval_seconds.max(1)),
        },
        watch_namespace: args.watch_namespace,
        namespace_cache: !args.no_namespace_cache,
        client_ca_file: args.client_ca_file,
        limits: appset_webhook::server::Limits {
            max_connections: args.max_connections.max(1),
            max_body: args.max_body_bytes.max(1024),
            body_budget: args.body_budget_bytes.max(args.max_body_bytes),
            body_timeout: Duration::from_secs(args.body_timeout_seconds.max(1)),
            drain: Duration::from_secs(args.drain_seconds),
        },
    };
    let client = kube::Client::try_default().await?;
    appset_webhook::serve(config, client, signal::shutdown_signal()).await?;
    Ok(())
}
