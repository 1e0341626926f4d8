//! Test namespaces, the cluster client, and `wait_for`.
//!
//! Every test creates a [`TestNamespace`]: a namespace named `<prefix>-<random>` labelled
//! `appset.dev/e2e=true`. [`TestNamespace::cleanup`] deletes it; a test that panics before cleanup
//! leaves its namespace behind for inspection, and `e2e/run.sh` tears the whole cluster down.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::{Api, Client, Resource};

/// A client for the cluster in `KUBECONFIG`.
pub async fn client() -> Result<Client> {
    Client::try_default()
        .await
        .context("cannot build a client from KUBECONFIG; run the suite through `make e2e`")
}

/// The repository root (for charts, examples and scripts).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// A namespace of a test's own.
pub struct TestNamespace {
    /// The admin client.
    pub client: Client,
    /// The namespace name.
    pub name: String,
}

impl TestNamespace {
    /// Creates `<prefix>-<random>` with the label `appset.dev/e2e=true` and waits until the
    /// default ServiceAccount exists (pods cannot be created before it).
    pub async fn new(prefix: &str) -> Result<Self> {
        Self::with_labels(prefix, &[]).await
    }

    /// Like [`TestNamespace::new`], with extra labels on the namespace.
    pub async fn with_labels(prefix: &str, labels: &[(&str, &str)]) -> Result<Self> {
        Self::on(client().await?, prefix, labels).await
    }

    /// Like [`TestNamespace::with_labels`], in the cluster `client` talks to.
    pub async fn on(client: Client, prefix: &str, labels: &[(&str, &str)]) -> Result<Self> {
        let name = format!("{prefix}-{}", random_suffix());
        let mut all = std::collections::BTreeMap::new();
        all.insert("appset.dev/e2e".to_string(), "true".to_string());
        for (k, v) in labels {
            all.insert((*k).to_string(), (*v).to_string());
        }
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(all),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("create namespace {name}"))?;
        let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(client.clone(), &name);
        wait_for(
            "the default ServiceAccount",
            Duration::from_secs(30),
            || async {
                Ok(match sas.get_opt("default").await? {
                    Some(_) => Ok(()),
                    None => Err("not created yet".to_string()),
                })
            },
        )
        .await?;
        Ok(Self { client, name })
    }

    /// An `Api` for a namespaced kind in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Deletes the namespace (in the background: the API server finishes it).
    pub async fn cleanup(self) {
        let api = Api::<Namespace>::all(self.client.clone());
        if let Err(err) = api.delete(&self.name, &DeleteParams::background()).await {
            eprintln!("cleanup: cannot delete namespace {}: {err}", self.name);
        }
    }
}

fn random_suffix() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    format!("{:08x}", h.finish() as u32)
}

/// Polls `probe` every 250 ms until it returns `Ok(Ok(value))`, then returns the value.
///
/// `Ok(Err(seen))` means "not yet" and says what was seen; `Err(e)` is a transient error (also
/// retried). When `deadline` passes, fails with `what`, the elapsed time and the last thing seen.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<std::result::Result<T, String>>>,
{
    let start = Instant::now();
    loop {
        let last = match probe().await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(seen)) => seen,
            Err(err) => format!("error: {err:#}"),
        };
        if start.elapsed() >= deadline {
            bail!(
                "timed out after {:?} waiting for {what}; last saw: {last}",
                start.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
