//! The AppSet controller on the real local control plane.
//!
//! Each test runs the controller in-process, scoped to its own namespace (the config hash key
//! Secret lives there too), creates AppSets through the API and waits for the cluster to reach
//! the expected state. KWOK marks scheduled pods Running and Ready; a "broken" pod is simulated
//! with a nodeSelector no node satisfies, so it stays Pending and never becomes Ready.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use appset_crds::{AppSet, keys};
use appset_e2e::fixtures::{appset, claimed_set_spec, is_ready, merge, revision_of, statefulset};
use appset_e2e::runners::AppSetController;
use appset_e2e::{TestNamespace, wait_for};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{ControllerRevision, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

mod adoption;
mod basics;
mod config;
mod rolling;
mod safety;
mod storage;

const LONG: Duration = Duration::from_secs(120);

/// Waits until the AppSet has exactly the pods `<name>-0 .. <name>-<n-1>`, all Ready and at the
/// update revision, and its status says so. Returns the pods by name.
async fn wait_settled(ns: &TestNamespace, name: &str, n: i32) -> Result<BTreeMap<String, Pod>> {
    appset_e2e::fixtures::wait_settled(&ns.client, &ns.name, name, n, LONG).await
}

async fn claim_names(ns: &TestNamespace) -> Result<BTreeSet<String>> {
    Ok(ns
        .api::<PersistentVolumeClaim>()
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|c| c.metadata.deletion_timestamp.is_none())
        .map(|c| c.name_any())
        .collect())
}

async fn wait_claims(ns: &TestNamespace, want: &[&str]) -> Result<()> {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    wait_for(&format!("claims {want:?}"), LONG, || async {
        let have = claim_names(ns).await?;
        Ok(if have == want {
            Ok(())
        } else {
            Err(format!("{have:?}"))
        })
    })
    .await
}

async fn patch_spec(ns: &TestNamespace, name: &str, spec: Value) -> Result<()> {
    ns.api::<AppSet>()
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": spec })),
        )
        .await
        .with_context(|| format!("patch AppSet {name}"))?;
    Ok(())
}

fn condition(set: &AppSet, type_: &str) -> Option<(String, String)> {
    set.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}
