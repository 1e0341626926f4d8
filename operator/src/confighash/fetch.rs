//! The I/O half of hashing: reading the hash key Secret (creating it when absent) and reading a
//! workload's sources to hash them.
//!
//! Each source body is fetched with a plain GET, turned into a [`Source`] restricted to the used
//! keys, and dropped by the caller after hashing: nothing here caches a body. The AppSet
//! controller calls [`sources`] and [`crate::confighash::hash::digest`] the same way the config
//! rollout controller does.

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::PostParams;
use kube::{Api, Client};

use super::discovery::SourceName;
use super::discovery::{References, SourceKind};
use super::hash::Source;
use super::keyring::{Keyring, KeyringError};

/// Errors reading sources or the key.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The API server refused or failed a request.
    #[error("{what}: {source}")]
    Api {
        /// What was being read or written.
        what: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The key Secret exists but cannot be used.
    #[error("hash key Secret {namespace}/{name}: {source}")]
    Keyring {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// What is wrong with it.
        #[source]
        source: KeyringError,
    },
}

/// Reads the hash key Secret `namespace/name`, creating it with a fresh random key when it does
/// not exist. See [`crate::confighash::keyring`] for the format and rotation.
pub async fn ensure_keyring(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Keyring, FetchError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let api_err = |what: &str, source| FetchError::Api {
        what: format!("{what} hash key Secret {namespace}/{name}"),
        source,
    };
    let keyring_err = |source| FetchError::Keyring {
        namespace: namespace.to_string(),
        name: name.to_string(),
        source,
    };
    for _ in 0..3 {
        if let Some(secret) = api.get_opt(name).await.map_err(|e| api_err("read", e))? {
            let data = secret.data.unwrap_or_default();
            return Keyring::from_secret_data(&data).map_err(keyring_err);
        }
        let fresh = Keyring::generate().map_err(keyring_err)?;
        match api
            .create(&PostParams::default(), &fresh.to_secret(namespace, name))
            .await
        {
            Ok(_) => {
                tracing::info!(
                    namespace,
                    name,
                    key_id = fresh.current.id(),
                    "created the config hash key Secret"
                );
                return Ok(fresh);
            }
            // Another replica created it first: read theirs.
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(e) => return Err(api_err("create", e)),
        }
    }
    Err(api_err(
        "read",
        kube::Error::Service("the key Secret was created and deleted repeatedly".into()),
    ))
}

/// A workload's sources as read now.
#[derive(Debug, Default)]
pub struct Fetched {
    /// Every source that exists, and every optional one that does not (as absent).
    pub sources: Vec<Source>,
    /// Required sources that do not exist.
    pub missing: Vec<SourceName>,
    /// The `resourceVersion` each source that exists was read at.
    pub versions: std::collections::BTreeMap<SourceName, String>,
}

/// Reads every source in `refs` from `namespace`.
pub async fn sources(
    client: &Client,
    namespace: &str,
    refs: &References,
) -> Result<Fetched, FetchError> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut out = Fetched::default();
    for (name, usage) in &refs.sources {
        let api_err = |source| FetchError::Api {
            what: format!("read {} {namespace}/{}", name.kind, name.name),
            source,
        };
        let mut version = None;
        let found = match name.kind {
            SourceKind::ConfigMap => cms.get_opt(&name.name).await.map_err(api_err)?.map(|cm| {
                version = cm.metadata.resource_version.clone();
                Source::from_config_map(cm, &usage.keys)
            }),
            SourceKind::Secret => secrets
                .get_opt(&name.name)
                .await
                .map_err(api_err)?
                .map(|s| {
                    version = s.metadata.resource_version.clone();
                    Source::from_secret(s, &usage.keys)
                }),
        };
        if let Some(v) = version {
            out.versions.insert(name.clone(), v);
        }
        match found {
            Some(source) => out.sources.push(source),
            None if usage.optional => out.sources.push(Source::absent(name, namespace)),
            None => out.missing.push(name.clone()),
        }
    }
    Ok(out)
}
