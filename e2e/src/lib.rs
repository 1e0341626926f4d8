//! The end-to-end harness: connects to the cluster in `KUBECONFIG` (the local control plane that
//! `e2e/run.sh` brings up when none is given), gives every test its own namespace, and waits for
//! conditions with a deadline, reporting what it last saw when the deadline passes.
//!
//! * [`harness`]: test namespaces, the client, `wait_for`;
//! * [`runners`]: the AppSet controller, config rollout and the webhook run in-process, each
//!   returned once ready;
//! * [`fixtures`]: the manifests (AppSet, StatefulSet, Deployment, ConfigMap, Secret) and small
//!   object helpers the tests and benchmarks share;
//! * [`fleet`]: several webhook replicas behind a load balancer, and a steady stream of pod
//!   creations to count failed admissions;
//! * [`disruption`]: watches that record replicas down and claims deleted during a fault test;
//! * [`cluster`]: a control plane of a test's own, for fault tests that restart its parts;
//! * [`process`]: child processes (the real binaries, helm, kubectl) and scratch files.
//!
//! ```ignore
//! let ns = TestNamespace::new("rollout").await?;          // namespace rollout-<random>
//! let pods: Api<Pod> = ns.api();
//! let ready = wait_for("3 ready pods", Duration::from_secs(60), || async {
//!     let n = pods.list(&Default::default()).await?.items.len();
//!     Ok(if n == 3 { Ok(n) } else { Err(format!("{n} pods")) })
//! }).await?;
//! ns.cleanup().await;
//! ```

pub mod cluster;
pub mod disruption;
pub mod fixtures;
pub mod fleet;
pub mod harness;
pub mod process;
pub mod runners;

pub use harness::{TestNamespace, client, repo_root, wait_for};
