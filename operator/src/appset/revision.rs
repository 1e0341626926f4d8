//! Revision bookkeeping, sans-IO: naming, reuse on rollback, collisions and history pruning.
//!
//! A revision is the pod template an AppSet's pods are built from. Its data is
//! `{"spec": {"template": <template>}}`, where, with `configRollout` on, the template carries the
//! config hash as the `appset.dev/config-hash` annotation, so a change to the referenced data is a
//! new revision exactly like a template change, and the pods show which data they were built for.
//!
//! Naming follows StatefulSet: `<set>-<hash>`, the hash being a digest of the data and of the
//! AppSet's `collisionCount`. When a revision of that name already exists with other data (a
//! hash collision, or a revision someone else wrote), the collision count is raised and the name
//! recomputed; the count is persisted in the status so names stay stable.
//!
//! Data flow: the controller lists the AppSet's ControllerRevisions into [`RevisionInfo`]s and
//! calls [`choose_update_revision`] with the new data; it creates or bumps the revision as told,
//! then, after the pods are planned, calls [`revisions_to_prune`] with the revisions still used.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::PodTemplateSpec;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use appset_crds::keys;

use crate::confighash::discovery::SourceName;

/// What the bookkeeping needs to know about one existing ControllerRevision.
#[derive(Clone, Debug, PartialEq)]
pub struct RevisionInfo {
    /// `metadata.name`.
    pub name: String,
    /// `revision`, the ordering number.
    pub number: i64,
    /// `data`.
    pub data: Value,
}

/// The template with the config hash annotation added (when there is one).
pub fn effective_template(
    template: &PodTemplateSpec,
    config_hash: Option<&str>,
    pins: Option<&BTreeMap<SourceName, String>>,
) -> PodTemplateSpec {
    let mut t = template.clone();
    if let Some(hash) = config_hash {
        t.metadata
            .get_or_insert_with(Default::default)
            .annotations
            .get_or_insert_with(Default::default)
            .insert(keys::CONFIG_HASH.to_string(), hash.to_string());
    }
    // Config snapshots: the revision's pods read the copies; the pins go with the revision, so
    // its pods keep them and a rollback brings them back.
    if let Some(pins) = pins {
        if let Some(spec) = t.spec.as_mut() {
            crate::config::snapshot::pin_spec(spec, pins);
        }
        t.metadata
            .get_or_insert_with(Default::default)
            .annotations
            .get_or_insert_with(Default::default)
            .insert(
                keys::CONFIG_SNAPSHOTS.to_string(),
                crate::config::snapshot::annotation(pins),
            );
    }
    t
}

/// The revision data for a template: `{"spec": {"template": ...}}`.
pub fn revision_data(template: &PodTemplateSpec) -> Value {
    json!({ "spec": { "template": template } })
}

/// The template stored in revision data, if it has the expected shape.
pub fn template_of(data: &Value) -> Option<PodTemplateSpec> {
    serde_json::from_value(data.get("spec")?.get("template")?.clone()).ok()
}

/// The hash part of a revision name: ten hex digits of SHA-256 over the canonical JSON of the
/// data (object keys sorted) and the collision count.
pub fn revision_hash(data: &Value, collision_count: i32) -> String {
    let mut h = Sha256::new();
    // `Value` keeps object keys sorted, so equal data always serialises to equal bytes.
    h.update(data.to_string().as_bytes());
    h.update(collision_count.to_le_bytes());
    let digest = h.finalize();
    digest.iter().take(5).map(|b| format!("{b:02x}")).collect()
}

/// The revision name `<set>-<hash>`.
pub fn revision_name(set: &str, data: &Value, collision_count: i32) -> String {
    format!("{set}-{}", revision_hash(data, collision_count))
}

/// What to do to obtain the update revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpdateRevision {
    /// An existing revision has the same data and is the newest: use it.
    Existing {
        /// Its name.
        name: String,
    },
    /// An existing, older revision has the same data (a rollback): reuse it, raising its number
    /// to `number` so it is the newest again.
    Reuse {
        /// Its name.
        name: String,
        /// The new revision number.
        number: i64,
    },
    /// No revision has this data: create one.
    Create {
        /// The name.
        name: String,
        /// The revision number (one above the highest).
        number: i64,
    },
}

impl UpdateRevision {
    /// The revision's name.
    pub fn name(&self) -> &str {
        match self {
            Self::Existing { name } | Self::Reuse { name, .. } | Self::Create { name, .. } => name,
        }
    }
}

/// Chooses the update revision for `data` among `existing`, and returns it with the collision
/// count to store in the status (raised past any name taken by other data).
pub fn choose_update_revision(
    set: &str,
    data: &Value,
    existing: &[RevisionInfo],
    collision_count: i32,
) -> (UpdateRevision, i32) {
    let max = existing.iter().map(|r| r.number).max().unwrap_or(0);
    if let Some(same) = existing
        .iter()
        .filter(|r| &r.data == data)
        .max_by_key(|r| r.number)
    {
        let choice = if same.number == max {
            UpdateRevision::Existing {
                name: same.name.clone(),
            }
        } else {
            UpdateRevision::Reuse {
                name: same.name.clone(),
                number: max + 1,
            }
        };
        return (choice, collision_count);
    }
    let taken: BTreeSet<&str> = existing.iter().map(|r| r.name.as_str()).collect();
    let mut count = collision_count.max(0);
    loop {
        let name = revision_name(set, data, count);
        if !taken.contains(name.as_str()) {
            return (
                UpdateRevision::Create {
                    name,
                    number: max + 1,
                },
                count,
            );
        }
        count = count.saturating_add(1);
    }
}

/// The current revision: the one named in `status.currentRevision` if it still exists,
/// otherwise the update revision (a new AppSet, or a lost history).
pub fn current_revision(
    status_current: Option<&str>,
    existing: &[RevisionInfo],
    update: &str,
) -> String {
    status_current
        .filter(|c| *c == update || existing.iter().any(|r| r.name == *c))
        .unwrap_or(update)
        .to_string()
}

/// The revisions to delete so that at most `limit` revisions remain besides the ones in use
/// (`live`: the current and update revisions and every revision a pod still runs), oldest
/// first, like StatefulSet's `revisionHistoryLimit`.
pub fn revisions_to_prune(
    existing: &[RevisionInfo],
    live: &BTreeSet<String>,
    limit: i32,
) -> Vec<String> {
    let mut history: Vec<&RevisionInfo> = existing
        .iter()
        .filter(|r| !live.contains(&r.name))
        .collect();
    let excess = history.len().saturating_sub(limit.max(0) as usize);
    history.sort_by_key(|r| r.number);
    history
        .into_iter()
        .take(excess)
        .map(|r| r.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec};
    use kube::api::ObjectMeta;

    fn template(image: &str) -> PodTemplateSpec {
        PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some([("app".to_string(), "web".to_string())].into()),
                ..Default::default()
            }),
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "main".into(),
                    image: Some(image.into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
        }
    }

    fn rev(name: &str, number: i64, image: &str) -> RevisionInfo {
        RevisionInfo {
            name: name.into(),
            number,
            data: revision_data(&template(image)),
        }
    }

    #[test]
    fn the_hash_is_stable_and_depends_on_data_and_collisions() {
        let a = revision_data(&template("nginx:1"));
        let b = revision_data(&template("nginx:2"));
        assert_eq!(revision_hash(&a, 0), revision_hash(&a.clone(), 0));
        assert_eq!(revision_hash(&a, 0).len(), 10);
        assert_ne!(revision_hash(&a, 0), revision_hash(&b, 0));
        assert_ne!(revision_hash(&a, 0), revision_hash(&a, 1));
        assert!(revision_name("web", &a, 0).starts_with("web-"));
    }

    #[test]
    fn the_config_hash_is_part_of_the_revision() {
        let t = template("nginx:1");
        let one = revision_data(&effective_template(&t, Some("aaa"), None));
        let two = revision_data(&effective_template(&t, Some("bbb"), None));
        let none = revision_data(&effective_template(&t, None, None));
        assert_ne!(revision_hash(&one, 0), revision_hash(&two, 0));
        assert_ne!(revision_hash(&one, 0), revision_hash(&none, 0));
        let back = template_of(&one).expect("template");
        assert_eq!(
            back.metadata
                .and_then(|m| m.annotations)
                .and_then(|a| a.get(keys::CONFIG_HASH).cloned()),
            Some("aaa".to_string())
        );
        assert_eq!(template_of(&none), Some(t));
    }

    #[test]
    fn a_new_template_creates_a_revision_numbered_after_the_highest() {
        let existing = vec![rev("web-a", 1, "nginx:1"), rev("web-b", 4, "nginx:2")];
        let data = revision_data(&template("nginx:3"));
        let (choice, cc) = choose_update_revision("web", &data, &existing, 0);
        assert_eq!(
            choice,
            UpdateRevision::Create {
                name: revision_name("web", &data, 0),
                number: 5
            }
        );
        assert_eq!(cc, 0);
        let (first, _) = choose_update_revision("web", &data, &[], 0);
        assert!(matches!(first, UpdateRevision::Create { number: 1, .. }));
    }

    #[test]
    fn the_newest_matching_revision_is_used_as_is() {
        let existing = vec![rev("web-a", 1, "nginx:1"), rev("web-b", 2, "nginx:2")];
        let data = revision_data(&template("nginx:2"));
        let (choice, _) = choose_update_revision("web", &data, &existing, 0);
        assert_eq!(
            choice,
            UpdateRevision::Existing {
                name: "web-b".into()
            }
        );
    }

    #[test]
    fn rollback_reuses_the_old_revision_and_makes_it_newest() {
        let existing = vec![rev("web-a", 1, "nginx:1"), rev("web-b", 2, "nginx:2")];
        let data = revision_data(&template("nginx:1"));
        let (choice, _) = choose_update_revision("web", &data, &existing, 0);
        assert_eq!(
            choice,
            UpdateRevision::Reuse {
                name: "web-a".into(),
                number: 3
            }
        );
        assert_eq!(choice.name(), "web-a");
    }

    #[test]
    fn a_name_collision_raises_the_collision_count() {
        let data = revision_data(&template("nginx:9"));
        let taken = revision_name("web", &data, 0);
        let existing = vec![RevisionInfo {
            name: taken.clone(),
            number: 1,
            data: json!({"something": "else"}),
        }];
        let (choice, cc) = choose_update_revision("web", &data, &existing, 0);
        assert_eq!(cc, 1);
        assert_eq!(choice.name(), revision_name("web", &data, 1));
        assert_ne!(choice.name(), taken);
        // A stored collision count is kept.
        let (choice, cc) = choose_update_revision("web", &data, &[], 3);
        assert_eq!(cc, 3);
        assert_eq!(choice.name(), revision_name("web", &data, 3));
    }

    #[test]
    fn the_current_revision_falls_back_to_the_update_revision() {
        let existing = vec![rev("web-a", 1, "nginx:1")];
        assert_eq!(current_revision(Some("web-a"), &existing, "web-b"), "web-a");
        assert_eq!(current_revision(Some("web-x"), &existing, "web-b"), "web-b");
        assert_eq!(current_revision(None, &existing, "web-b"), "web-b");
    }

    #[test]
    fn history_keeps_the_limit_and_everything_in_use() {
        let existing: Vec<RevisionInfo> = (1..=6)
            .map(|n| rev(&format!("web-{n}"), n, &format!("nginx:{n}")))
            .collect();
        let live: BTreeSet<String> = ["web-6".to_string(), "web-2".to_string()].into();
        assert_eq!(
            revisions_to_prune(&existing, &live, 2),
            vec!["web-1".to_string(), "web-3".to_string()]
        );
        assert_eq!(
            revisions_to_prune(&existing, &live, 10),
            Vec::<String>::new()
        );
        assert_eq!(revisions_to_prune(&existing, &live, 0).len(), 4);
    }
}
