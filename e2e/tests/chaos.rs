//! Fault tests of the AppSet controller, each printing what it saw.
//!
//! * kill -9 of the real `appset-operator` binary at ten random points of a 20-replica rolling
//!   update (OrderedReady, then Parallel with `maxUnavailable: 3`), restarting it each time: the
//!   rollout completes, no claim is deleted, and a watch never sees more replicas missing or
//!   terminating at once than `maxUnavailable` allows. These run on the shared cluster: they
//!   kill only their own operator process.
//! * kube-apiserver, then etcd (durable, fsyncing), killed (SIGKILL) and restarted in the
//!   middle of a rollout: the operator recovers
//!   without a restart of its own and the rollout completes. This one stops shared components,
//!   so it brings up a control plane of its own (`.cluster-chaos`, ports from 16840).
//!
//! The random kill points come from a seed printed at the start (`APPSET_CHAOS_SEED` replays
//! one).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use appset_crds::AppSet;
use appset_e2e::cluster::OwnCluster;
use appset_e2e::disruption::{Seen, watch};
use appset_e2e::fixtures::{appset, wait_settled};
use appset_e2e::process::{Process, binary, free_port, scratch_dir};
use appset_e2e::{TestNamespace, wait_for};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(300);

/// Starts the operator binary for `ns` against `kubeconfig`.
fn operator(kubeconfig: &Path, ns: &str, log: &Path) -> Result<Process> {
    Process::start(
        &binary("appset-operator")?,
        &[
            "--namespaces",
            ns,
            "--listen",
            &format!("127.0.0.1:{}", free_port()?),
            "--log-format",
            "text",
        ],
        &[
            ("KUBECONFIG", &kubeconfig.to_string_lossy()),
            ("POD_NAMESPACE", ns),
            ("RUST_LOG", "info"),
        ],
        log.to_path_buf(),
    )
}

fn kubeconfig_from_env() -> Result<std::path::PathBuf> {
    Ok(std::env::var_os("KUBECONFIG")
        .context("KUBECONFIG; run the suite through `make e2e`")?
        .into())
}

/// A small deterministic generator for the kill points (SplitMix64).
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let seed = std::env::var("APPSET_CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(42)
            });
        println!("chaos seed {seed} (APPSET_CHAOS_SEED={seed} replays it)");
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A duration between `lo` and `hi` milliseconds.
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo).max(1))
    }
}

/// A 20-replica rolling update with the operator killed (SIGKILL) and restarted at ten random
/// points. Returns (rollout seconds, what the watches saw).
async fn rollout_under_kill_9(
    prefix: &str,
    policy: &str,
    max_unavailable: i32,
) -> Result<(f64, Seen)> {
    let ns = TestNamespace::new(prefix).await?;
    let kubeconfig = kubeconfig_from_env()?;
    let dir = scratch_dir(&ns.name)?;
    let replicas = 20;
    let mut op = operator(&kubeconfig, &ns.name, &dir.join("operator-0.log"))?;
    let extra = json!({"podManagementPolicy": policy,
        "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": max_unavailable}}});
    ns.api::<AppSet>()
        .create(&PostParams::default(), &appset("db", replicas, extra)?)
        .await?;
    wait_settled(&ns.client, &ns.name, "db", replicas, DEADLINE)
        .await
        .with_context(|| op.log_tail())?;
    let (seen, tasks) = watch(&ns.client, &ns.name, replicas as usize);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut rng = Rng::seeded();
    let start = Instant::now();
    ns.api::<AppSet>()
        .patch(
            "db",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"template": {"metadata": {"labels": {"app": "db", "release": "2"}}}}})),
        )
        .await?;
    for k in 1..=10 {
        tokio::time::sleep(rng.millis(200, 2500)).await;
        ensure!(
            op.running(),
            "the operator exited on its own: {}",
            op.log_tail()
        );
        op.kill();
        op = operator(
            &kubeconfig,
            &ns.name,
            &dir.join(format!("operator-{k}.log")),
        )?;
    }
    wait_settled(&ns.client, &ns.name, "db", replicas, DEADLINE)
        .await
        .with_context(|| op.log_tail())?;
    let took = start.elapsed().as_secs_f64();
    for t in tasks {
        t.abort();
    }
    let seen = seen
        .lock()
        .map(|mut s| std::mem::take(&mut *s))
        .unwrap_or_default();
    drop(op);
    ns.cleanup().await;
    Ok((took, seen))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_an_ordered_ready_rollout_loses_nothing() -> Result<()> {
    let (took, seen) = rollout_under_kill_9("chaos-ordered", "OrderedReady", 1).await?;
    println!(
        "chaos OrderedReady, 20 replicas, 10 x kill -9: rollout {took:.1}s, max replicas down {}, claims deleted {}, same-ordinal overlaps {}",
        seen.max_down,
        seen.claims_deleted.len(),
        seen.same_ordinal
    );
    assert!(seen.max_down <= 1, "{seen:?}");
    assert!(seen.claims_deleted.is_empty(), "{seen:?}");
    assert_eq!(seen.same_ordinal, 0, "{seen:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_parallel_rollout_keeps_the_budget() -> Result<()> {
    let (took, seen) = rollout_under_kill_9("chaos-parallel", "Parallel", 3).await?;
    println!(
        "chaos Parallel maxUnavailable 3, 20 replicas, 10 x kill -9: rollout {took:.1}s, max replicas down {}, claims deleted {}, same-ordinal overlaps {}",
        seen.max_down,
        seen.claims_deleted.len(),
        seen.same_ordinal
    );
    assert!(seen.max_down <= 3, "{seen:?}");
    assert!(seen.claims_deleted.is_empty(), "{seen:?}");
    assert_eq!(seen.same_ordinal, 0, "{seen:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_rides_out_an_api_server_and_an_etcd_restart() -> Result<()> {
    let cluster = tokio::task::spawn_blocking(|| OwnCluster::up("chaos", 16840)).await??;
    let client = cluster.client().await?;
    let ns = TestNamespace::on(client.clone(), "chaos-restart", &[]).await?;
    let dir = scratch_dir(&ns.name)?;
    let mut op = operator(&cluster.kubeconfig, &ns.name, &dir.join("operator.log"))?;
    let replicas = 6;
    ns.api::<AppSet>()
        .create(
            &PostParams::default(),
            &appset(
                "db",
                replicas,
                json!({"podManagementPolicy": "OrderedReady"}),
            )?,
        )
        .await?;
    wait_settled(&client, &ns.name, "db", replicas, DEADLINE)
        .await
        .with_context(|| op.log_tail())?;
    let (seen, tasks) = watch(&client, &ns.name, replicas as usize);
    let sets = ns.api::<AppSet>();
    let start = Instant::now();
    sets.patch(
        "db",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"spec": {"template": {"metadata": {"labels": {"app": "db", "release": "2"}}}}}),
        ),
    )
    .await?;
    wait_for("the rollout under way", DEADLINE, || async {
        let st = sets.get("db").await?.status.unwrap_or_default();
        Ok(if st.updated_replicas >= 1 {
            Ok(())
        } else {
            Err(format!("{} updated", st.updated_replicas))
        })
    })
    .await?;
    let restart = |component: &'static str, signal: &'static str| {
        let dir = cluster.dir.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                appset_e2e::cluster::restart(&dir, component, signal, Duration::from_secs(3))
            })
            .await?
        }
    };
    // Both are killed outright; this cluster's etcd fsyncs, so it keeps what it acknowledged.
    restart("kube-apiserver", "KILL").await?;
    wait_for("the API server back", DEADLINE, || async {
        Ok(match sets.get("db").await {
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        })
    })
    .await?;
    let api_back = Instant::now();
    restart("etcd", "KILL").await?;
    let etcd_back = Instant::now();
    // From now on, a component that dies of the faults (kube-scheduler has crashed on a cache it found
    // corrupted after the restarts) is started again, as a kubelet restarts a control plane's
    // static pods; what was revived is printed.
    let cmdlines = appset_e2e::cluster::command_lines(&cluster.dir)?;
    let revived = Arc::new(Mutex::new(Vec::<String>::new()));
    let supervisor = {
        let (dir, revived) = (cluster.dir.clone(), revived.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let (dir, cmdlines) = (dir.clone(), cmdlines.clone());
                let r = tokio::task::spawn_blocking(move || {
                    appset_e2e::cluster::revive(&dir, &cmdlines)
                })
                .await;
                if let (Ok(Ok(names)), Ok(mut all)) = (r, revived.lock()) {
                    all.extend(names);
                }
            }
        })
    };
    // Recovered: the rollout moves again (one more pod updated, as a fresh list shows).
    let updated_before = wait_for("the AppSet readable", DEADLINE, || async {
        Ok(match sets.get("db").await {
            Ok(s) => Ok(s.status.unwrap_or_default().updated_replicas),
            Err(e) => Err(e.to_string()),
        })
    })
    .await?;
    let pods = ns.api::<Pod>();
    let revision = |p: &Pod| {
        p.labels()
            .get("controller-revision-hash")
            .cloned()
            .unwrap_or_default()
    };
    wait_for("the rollout moving again", DEADLINE, || async {
        let update = sets
            .get("db")
            .await?
            .status
            .and_then(|s| s.update_revision)
            .unwrap_or_default();
        let list = pods.list(&Default::default()).await?;
        let updated = list
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none() && revision(p) == update)
            .count() as i32;
        Ok(if updated > updated_before || updated == replicas {
            Ok(())
        } else {
            Err(format!("{updated} pods at {update}"))
        })
    })
    .await?;
    let recovered = etcd_back.elapsed().as_secs_f64();
    wait_settled(&client, &ns.name, "db", replicas, DEADLINE)
        .await
        .with_context(|| op.log_tail())?;
    let completed = etcd_back.elapsed().as_secs_f64();
    supervisor.abort();
    let revived = revived.lock().map(|r| r.clone()).unwrap_or_default();
    for t in tasks {
        t.abort();
    }
    let seen = seen
        .lock()
        .map(|mut s| std::mem::take(&mut *s))
        .unwrap_or_default();
    println!(
        "chaos restarts: kube-apiserver killed, down 3s (back after {:.1}s), etcd killed, down 3s; the rollout moved again {recovered:.1}s after etcd came back and completed after {completed:.1}s, {:.1}s in all; operator process still running (never restarted): {}; control plane components revived: {:?}; max replicas down {}, claims deleted {}",
        api_back.duration_since(start).as_secs_f64(),
        start.elapsed().as_secs_f64(),
        op.running(),
        revived,
        seen.max_down,
        seen.claims_deleted.len()
    );
    ensure!(op.running(), "the operator exited: {}", op.log_tail());
    assert!(
        recovered <= 30.0,
        "the rollout moved again only {recovered:.1}s after etcd came back"
    );
    assert!(seen.claims_deleted.is_empty(), "{seen:?}");
    assert!(seen.max_down <= 1, "{seen:?}");
    drop(op);
    drop(cluster);
    Ok(())
}
