//! The small API-server helpers both controllers use, so that neither spells them twice: which
//! namespaces a controller works in ([`Scope`]), the request parameters that carry appset's one
//! field manager, status-code checks, bounded concurrency, ownership checks, readiness on a
//! watch's first sync, and Event publishing that never fails a reconcile.

use std::fmt::Debug;
use std::future::Future;

use appset_crds::keys;
use appset_process::readiness::ReadyHandle;
use futures::{Stream, StreamExt, stream};
use k8s_openapi::NamespaceResourceScope;
use kube::api::{ObjectMeta, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::utils::ResetTimerBackoff;
use kube::runtime::watcher::{self, ExponentialBackoff};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tracing::warn;

/// A namespaced Kubernetes type a controller can list and watch: what `watcher` and the
/// reflector stores ask of a type, in one name.
pub trait Namespaced:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + DeserializeOwned
    + Debug
    + Send
    + Sync
    + 'static
{
}

impl<K> Namespaced for K where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static
{
}

/// The namespaces a controller works in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Scope {
    /// Every namespace (cluster-wide watches).
    #[default]
    All,
    /// Only these (one set of watches each).
    Namespaces(Vec<String>),
}

impl Scope {
    /// From a list as flags give it: names are trimmed, empty ones dropped, and an empty list
    /// means every namespace.
    pub fn from_list<S: AsRef<str>>(list: &[S]) -> Self {
        let names: Vec<String> = list
            .iter()
            .map(|s| s.as_ref().trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if names.is_empty() {
            Self::All
        } else {
            Self::Namespaces(names)
        }
    }

    /// One namespace.
    pub fn namespace(name: impl Into<String>) -> Self {
        Self::Namespaces(vec![name.into()])
    }

    /// Each set of watches to run: `None` for one cluster-wide set, else one per namespace.
    pub fn parts(&self) -> Vec<Option<String>> {
        match self {
            Self::All => vec![None],
            Self::Namespaces(list) => list.iter().cloned().map(Some).collect(),
        }
    }

    /// Whether `namespace` is in scope.
    pub fn contains(&self, namespace: &str) -> bool {
        match self {
            Self::All => true,
            Self::Namespaces(list) => list.iter().any(|n| n == namespace),
        }
    }
}

/// An `Api` over one namespace, or over all of them for `None`.
pub fn api_in<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Parameters of a merge or JSON patch under appset's field manager.
pub fn merge_params() -> PatchParams {
    PatchParams {
        field_manager: Some(keys::FIELD_MANAGER.to_string()),
        ..Default::default()
    }
}

/// Parameters of a server-side apply under appset's field manager, taking over conflicts.
pub fn apply_params() -> PatchParams {
    PatchParams::apply(keys::FIELD_MANAGER).force()
}

/// Parameters of a create under appset's field manager.
pub fn post_params() -> PostParams {
    PostParams {
        field_manager: Some(keys::FIELD_MANAGER.to_string()),
        ..Default::default()
    }
}

/// Whether the API server answered with this HTTP status code.
pub fn is_status(err: &kube::Error, code: u16) -> bool {
    matches!(err, kube::Error::Api(s) if s.code == code)
}

/// Whether the object was not found (404).
pub fn is_not_found(err: &kube::Error) -> bool {
    is_status(err, 404)
}

/// Whether the request conflicted: the object exists, or a precondition failed (409).
pub fn is_conflict(err: &kube::Error) -> bool {
    is_status(err, 409)
}

/// Whether the request failed because the API server could not be reached or was not able to
/// answer (no connection, a broken stream, 429, 5xx): retrying soon is right, and nothing about
/// the object being reconciled is wrong.
pub fn is_transient(err: &kube::Error) -> bool {
    match err {
        kube::Error::Api(status) => status.code == 429 || status.code >= 500,
        kube::Error::Service(_) | kube::Error::HyperError(_) => true,
        _ => false,
    }
}

/// The retry delay after `failures` reconciles of one object failed in a row: 1 s doubling to
/// 5 min, but at most [`TRANSIENT_RETRY_MAX`] when the last failure was `transient` (the API
/// server went away): an outage must not leave objects waiting minutes after it ended.
pub fn retry_delay(failures: u32, transient: bool) -> std::time::Duration {
    let exp = std::time::Duration::from_secs(1u64 << failures.saturating_sub(1).min(9))
        .min(std::time::Duration::from_secs(300));
    if transient {
        exp.min(TRANSIENT_RETRY_MAX)
    } else {
        exp
    }
}

/// The longest retry delay after a transient failure (see [`retry_delay`]).
pub const TRANSIENT_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs `jobs` with at most `limit` in flight, and returns the first error once all finished.
pub async fn bounded<F, E>(jobs: Vec<F>, limit: usize) -> Result<(), E>
where
    F: Future<Output = Result<(), E>>,
{
    let results: Vec<Result<(), E>> = stream::iter(jobs)
        .buffer_unordered(limit.max(1))
        .collect()
        .await;
    results.into_iter().collect()
}

/// Runs `jobs` in slow-start batches, as the StatefulSet and ReplicaSet controllers create
/// pods: 1 job, then 2, 4, … up to `max_batch` at once, each batch once the previous one fully
/// succeeded. The first failing batch stops it: later jobs are never started, nor even built
/// (`job` makes each one's future when its batch starts), so the memory and the API load of one call
/// are bounded by `max_batch` whatever the number of jobs, and a quota or webhook that refuses
/// every create costs one request, not thousands. Returns how many jobs succeeded.
pub async fn slow_start<'a, T, F, Fut, E>(
    items: &'a [T],
    max_batch: usize,
    job: F,
) -> Result<usize, E>
where
    F: Fn(&'a T) -> Fut,
    Fut: Future<Output = Result<(), E>>,
{
    let mut next = 0;
    let mut size = 1;
    while next < items.len() {
        let end = next.saturating_add(size).min(items.len());
        futures::future::join_all(items[next..end].iter().map(&job))
            .await
            .into_iter()
            .collect::<Result<Vec<()>, E>>()?;
        next = end;
        size = size.saturating_mul(2).min(max_batch.max(1));
    }
    Ok(next)
}

/// How long one reconcile may take before it is abandoned and retried. A request to an API
/// server whose etcd went away can hang until the client's read timeout (minutes); kube runs
/// one reconcile per object at a time, so without a deadline that object would wait as long.
/// Every reconcile step is idempotent and guarded, so abandoning one half-way is safe: the next
/// one observes what was done.
pub const RECONCILE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(20);

/// Runs `reconcile` within [`RECONCILE_DEADLINE`]; past it, `timed_out()` is the error.
pub async fn within_deadline<T, E>(
    reconcile: impl Future<Output = Result<T, E>>,
    timed_out: impl FnOnce() -> E,
) -> Result<T, E> {
    tokio::time::timeout(RECONCILE_DEADLINE, reconcile)
        .await
        .unwrap_or_else(|_| Err(timed_out()))
}

/// Whether the object's controller owner reference names `uid`: `None` when it has no
/// controller at all (an orphan that may be adopted).
pub fn is_controlled_by(meta: &ObjectMeta, uid: &str) -> Option<bool> {
    let controller = meta
        .owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true))?;
    Some(controller.uid == uid)
}

/// The backoff of every watch the controllers run: 0.5 s doubling to 5 s, with jitter, back to
/// 0.5 s after a minute without errors. kube's default grows to 30 s; after an API server
/// restart, when every watch fails a few times in a row, that kept a controller blind to pod
/// events for half a minute.
pub fn watch_backoff() -> ResetTimerBackoff<ExponentialBackoff> {
    let builder = backon::ExponentialBuilder::default()
        .with_min_delay(std::time::Duration::from_millis(500))
        .with_max_delay(std::time::Duration::from_secs(5))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times();
    ResetTimerBackoff::new(
        ExponentialBackoff::from(builder),
        std::time::Duration::from_secs(60),
    )
}

/// Passes a watch stream through and releases `ready` at its first `InitDone` (the end of its
/// first complete list), so that readiness reflects every watch a controller runs.
pub fn release_on_sync<K, S>(stream: S, ready: ReadyHandle) -> impl Stream<Item = S::Item>
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let mut ready = Some(ready);
    stream.inspect(move |ev| {
        if let Ok(watcher::Event::InitDone) = ev
            && let Some(handle) = ready.take()
        {
            handle.ready();
        }
    })
}

/// Publishes one Event about `obj`. A failure is logged, never returned: an Event is a report,
/// and failing to send one must not fail the work it reports on.
pub async fn publish<K>(
    recorder: &Recorder,
    obj: &K,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) where
    K: Resource<DynamicType = ()>,
{
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: action.to_string(),
        secondary: None,
    };
    if let Err(err) = recorder.publish(&event, &obj.object_ref(&())).await {
        warn!(error = %err, reason, "cannot publish an Event");
    }
}

#[cfg(test)]
mod slow_start_tests {
    use super::slow_start;
    use std::sync::atomic::{AtomicUsize, Ordering};

    async fn run(
        total: usize,
        fail_at: Option<usize>,
        max_batch: usize,
    ) -> (Result<usize, usize>, usize) {
        let started = AtomicUsize::new(0);
        let built = AtomicUsize::new(0);
        let items: Vec<usize> = (0..total).collect();
        let result = slow_start(&items, max_batch, |n| {
            built.fetch_add(1, Ordering::SeqCst);
            let started = &started;
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                if Some(*n) == fail_at { Err(*n) } else { Ok(()) }
            }
        })
        .await;
        assert_eq!(built.load(Ordering::SeqCst), started.load(Ordering::SeqCst));
        (result, started.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn batches_double_up_to_the_limit() {
        assert_eq!(run(0, None, 4).await, (Ok(0), 0));
        assert_eq!(run(20, None, 4).await, (Ok(20), 20));
        assert_eq!(run(5, None, 0).await, (Ok(5), 5));
    }

    #[tokio::test]
    async fn a_failure_stops_the_later_batches_unbuilt() {
        // Batches of 1, 2, 4: job 3 fails in the third batch, which runs to its end (jobs 3..7);
        // nothing after it is built or started.
        assert_eq!(run(1000, Some(3), 32).await, (Err(3), 7));
        // A create refused from the start costs one request.
        assert_eq!(run(5000, Some(0), 32).await, (Err(0), 1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    #[test]
    fn scope_from_flags() {
        assert_eq!(Scope::from_list::<&str>(&[]), Scope::All);
        assert_eq!(Scope::from_list(&["", " "]), Scope::All);
        let s = Scope::from_list(&["a", " b", ""]);
        assert_eq!(s, Scope::Namespaces(vec!["a".into(), "b".into()]));
        assert_eq!(
            s.parts(),
            vec![Some("a".to_string()), Some("b".to_string())]
        );
        assert!(s.contains("b") && !s.contains("c"));
        assert_eq!(Scope::All.parts(), vec![None]);
        assert!(Scope::All.contains("anything"));
    }

    #[test]
    fn transient_failures_retry_within_seconds() {
        let status = |code| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                ..Default::default()
            }))
        };
        assert!(is_transient(&status(503)) && is_transient(&status(429)));
        assert!(!is_transient(&status(422)) && !is_transient(&status(404)));
        let down = kube::Error::Service("connection refused".into());
        assert!(is_transient(&down));
        assert_eq!(retry_delay(1, false), std::time::Duration::from_secs(1));
        assert_eq!(retry_delay(4, false), std::time::Duration::from_secs(8));
        assert_eq!(retry_delay(40, false), std::time::Duration::from_secs(300));
        for n in 1..64 {
            assert!(retry_delay(n, true) <= TRANSIENT_RETRY_MAX);
            assert!(retry_delay(n, true) <= retry_delay(n, false));
        }
    }

    #[test]
    fn controller_ownership() {
        let owner = |uid: &str, controller: Option<bool>| OwnerReference {
            api_version: "appset.dev/v1alpha1".into(),
            kind: "AppSet".into(),
            name: "web".into(),
            uid: uid.into(),
            controller,
            block_owner_deletion: None,
        };
        let meta = |refs: Vec<OwnerReference>| ObjectMeta {
            owner_references: Some(refs),
            ..Default::default()
        };
        assert_eq!(
            is_controlled_by(&meta(vec![owner("a", Some(true))]), "a"),
            Some(true)
        );
        assert_eq!(
            is_controlled_by(&meta(vec![owner("b", Some(true))]), "a"),
            Some(false)
        );
        assert_eq!(is_controlled_by(&meta(vec![owner("a", None)]), "a"), None);
        assert_eq!(is_controlled_by(&ObjectMeta::default(), "a"), None);
    }

    #[tokio::test]
    async fn bounded_runs_everything_and_returns_the_first_error() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let ran = AtomicUsize::new(0);
        let jobs: Vec<_> = (0..10)
            .map(|i| {
                let ran = &ran;
                async move {
                    ran.fetch_add(1, Ordering::SeqCst);
                    if i == 3 {
                        Err(format!("job {i}"))
                    } else {
                        Ok(())
                    }
                }
            })
            .collect();
        let r = bounded(jobs, 4).await;
        assert_eq!(r, Err("job 3".to_string()));
        assert_eq!(ran.load(Ordering::SeqCst), 10);
    }
}
