//! The reverse index from a source (ConfigMap or Secret) to the workloads that use it.
//!
//! The controller watches only the metadata of ConfigMaps and Secrets. When one of them changes,
//! this index says which workloads to reconcile; the workloads themselves are the only place the
//! bodies are read, and then only to hash them. The index holds names only, so its size grows
//! with the number of references, never with the size of the data.
//!
//! Updated by every reconcile ([`ReverseIndex::set`]) and on workload deletion or opt-out
//! ([`ReverseIndex::remove`]). Pure: no I/O.

use std::collections::{BTreeSet, HashMap};

use crate::confighash::discovery::{SourceKind, SourceName};

/// The three native workload kinds the controller handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WorkloadKind {
    /// `apps/v1 Deployment`.
    Deployment,
    /// `apps/v1 StatefulSet`.
    StatefulSet,
    /// `apps/v1 DaemonSet`.
    DaemonSet,
}

impl WorkloadKind {
    /// The kind name.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::DaemonSet => "DaemonSet",
        }
    }
}

/// A workload by kind, namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadRef {
    /// Its kind.
    pub kind: WorkloadKind,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// A source by kind, namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceRef {
    /// ConfigMap or Secret.
    pub kind: SourceKind,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl SourceRef {
    /// A source named in a workload's namespace.
    pub fn new(namespace: &str, name: &SourceName) -> Self {
        Self {
            kind: name.kind,
            namespace: namespace.to_string(),
            name: name.name.clone(),
        }
    }
}

/// Source → workloads, and workload → sources (to undo a workload's entries).
#[derive(Debug, Default)]
pub struct ReverseIndex {
    by_source: HashMap<SourceRef, BTreeSet<WorkloadRef>>,
    by_workload: HashMap<WorkloadRef, BTreeSet<SourceRef>>,
}

impl ReverseIndex {
    /// Replaces the sources `workload` uses.
    pub fn set(&mut self, workload: &WorkloadRef, sources: BTreeSet<SourceRef>) {
        if self.by_workload.get(workload) == Some(&sources) {
            return;
        }
        self.remove(workload);
        if sources.is_empty() {
            return;
        }
        for source in &sources {
            self.by_source
                .entry(source.clone())
                .or_default()
                .insert(workload.clone());
        }
        self.by_workload.insert(workload.clone(), sources);
    }

    /// Forgets `workload`.
    pub fn remove(&mut self, workload: &WorkloadRef) {
        let Some(sources) = self.by_workload.remove(workload) else {
            return;
        };
        for source in sources {
            if let Some(set) = self.by_source.get_mut(&source) {
                set.remove(workload);
                if set.is_empty() {
                    self.by_source.remove(&source);
                }
            }
        }
    }

    /// Keeps only the workloads `keep` accepts; returns those it dropped.
    pub fn retain(&mut self, mut keep: impl FnMut(&WorkloadRef) -> bool) -> Vec<WorkloadRef> {
        let gone: Vec<WorkloadRef> = self
            .by_workload
            .keys()
            .filter(|w| !keep(w))
            .cloned()
            .collect();
        for w in &gone {
            self.remove(w);
        }
        gone
    }

    /// The workloads that use `source`, sorted.
    pub fn workloads(&self, source: &SourceRef) -> Vec<WorkloadRef> {
        self.by_source
            .get(source)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// How many sources are indexed.
    pub fn sources(&self) -> usize {
        self.by_source.len()
    }

    /// How many workloads are indexed.
    pub fn len(&self) -> usize {
        self.by_workload.len()
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.by_workload.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(kind: WorkloadKind, name: &str) -> WorkloadRef {
        WorkloadRef {
            kind,
            namespace: "ns".into(),
            name: name.into(),
        }
    }

    fn cm(name: &str) -> SourceRef {
        SourceRef::new("ns", &SourceName::config_map(name))
    }

    fn secret(name: &str) -> SourceRef {
        SourceRef::new("ns", &SourceName::secret(name))
    }

    #[test]
    fn maps_sources_to_workloads_and_follows_changes() {
        let mut idx = ReverseIndex::default();
        let web = w(WorkloadKind::Deployment, "web");
        let db = w(WorkloadKind::StatefulSet, "db");
        idx.set(&web, BTreeSet::from([cm("shared"), secret("web")]));
        idx.set(&db, BTreeSet::from([cm("shared")]));
        assert_eq!(idx.workloads(&cm("shared")), vec![web.clone(), db.clone()]);
        assert_eq!(idx.workloads(&secret("web")), vec![web.clone()]);
        // A Secret and a ConfigMap of the same name are different sources.
        assert!(idx.workloads(&secret("shared")).is_empty());

        // web stops using the Secret.
        idx.set(&web, BTreeSet::from([cm("shared")]));
        assert!(idx.workloads(&secret("web")).is_empty());
        assert_eq!(idx.sources(), 1);

        idx.remove(&web);
        assert_eq!(idx.workloads(&cm("shared")), vec![db.clone()]);
        idx.set(&db, BTreeSet::new());
        assert!(idx.is_empty());
        assert_eq!(idx.sources(), 0);
    }

    #[test]
    fn namespaces_are_kept_apart() {
        let mut idx = ReverseIndex::default();
        idx.set(
            &w(WorkloadKind::DaemonSet, "agent"),
            BTreeSet::from([cm("c")]),
        );
        let other = SourceRef::new("elsewhere", &SourceName::config_map("c"));
        assert!(idx.workloads(&other).is_empty());
        assert_eq!(idx.len(), 1);
    }
}
