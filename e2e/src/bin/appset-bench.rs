//! AppSet versus StatefulSet: time to fully Ready on the local control plane.
//!
//! For each scenario (100 replicas `Parallel`, then 20 replicas `OrderedReady`; one 1Gi
//! volumeClaimTemplate each) it creates a StatefulSet, run by the cluster's own
//! kube-controller-manager, and an AppSet of the same spec, run by the AppSet controller
//! in-process, each in a fresh namespace, and measures the time from the create request until
//! every pod is Running and Ready and every claim is Bound. Before the next run starts, each
//! namespace is deleted and waited for, and so are the PersistentVolumes of its claims: the
//! controller-manager's PersistentVolume controller reclaims them (`reclaimPolicy: Delete`)
//! under the same client rate limit it provisions and binds with, so a run started while the
//! previous run's volumes are still being deleted would wait for that. Each measurement then
//! starts [`SETTLE`] later, so that this client's rate limiter has its burst back whichever side
//! runs first. It prints both times, their ratio and the load average before and after. With
//! `BENCH_TABLE` set to a file, it also appends one Markdown table row per scenario
//! (`| scenario | measure | appset | reference | ratio | goal |`, ratio = StatefulSet time /
//! AppSet time, goal ≥ 1.00) and one row of the load averages.
//!
//! Usage: `KUBECONFIG=.cluster/kubeconfig cargo run --release -p appset-e2e --bin appset-bench`
//! (optionally `-- <parallel replicas> <ordered replicas>`). Caveats: KWOK marks pods Ready at
//! once, so the figures measure the controllers and the API server, not image pulls; the
//! controller-manager throttles its client (its default `--kube-api-qps`), the in-process AppSet
//! controller does not.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use appset_crds::AppSet;
use appset_e2e::TestNamespace;
use appset_e2e::fixtures::{claimed_set_spec, is_ready, merge};
use appset_e2e::process::{append_bench_rows, load_averages};
use appset_e2e::runners::AppSetController;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::{Value, json};

/// The spec both sets are created with: `replicas` nginx pods with one claim each.
fn spec(replicas: i32, policy: &str) -> Value {
    let mut spec = claimed_set_spec("bench", replicas, "nginx:1.27");
    merge(&mut spec, json!({"podManagementPolicy": policy}));
    spec
}

/// Polls until `n` pods are Running and Ready and `n` claims are Bound in the namespace.
async fn wait_all_ready(ns: &TestNamespace, n: usize, deadline: Duration) -> Result<Duration> {
    let start = Instant::now();
    let pods = ns.api::<Pod>();
    let claims = ns.api::<PersistentVolumeClaim>();
    let mut last_print = Instant::now();
    loop {
        let ready = pods
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|p| is_ready(p))
            .count();
        let bound = claims
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|c| c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"))
            .count();
        if ready >= n && bound >= n {
            return Ok(start.elapsed());
        }
        if verbose() && last_print.elapsed() >= Duration::from_secs(2) {
            last_print = Instant::now();
            eprintln!(
                "  {:>6.1}s: {ready}/{n} pods Ready, {bound}/{n} claims Bound",
                start.elapsed().as_secs_f64()
            );
        }
        if start.elapsed() > deadline {
            bail!("not ready after {deadline:?}: {ready}/{n} pods Ready, {bound}/{n} claims Bound");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `APPSET_BENCH_VERBOSE=1` prints progress every two seconds (on stderr).
fn verbose() -> bool {
    std::env::var_os("APPSET_BENCH_VERBOSE").is_some()
}

async fn time_statefulset(replicas: i32, policy: &str) -> Result<Duration> {
    let ns = TestNamespace::new("bench-sts").await?;
    let sts: StatefulSet = serde_json::from_value(
        json!({"metadata": {"name": "bench"}, "spec": spec(replicas, policy)}),
    )?;
    let start = Instant::now();
    ns.api::<StatefulSet>()
        .create(&PostParams::default(), &sts)
        .await?;
    wait_all_ready(&ns, replicas as usize, Duration::from_secs(900)).await?;
    let took = start.elapsed();
    finish(ns).await?;
    Ok(took)
}

async fn time_appset(replicas: i32, policy: &str) -> Result<Duration> {
    let ns = TestNamespace::new("bench-aps").await?;
    // Started and ready (every watch listed) before the clock starts.
    let controller = AppSetController::start(&ns).await?;
    let set: AppSet = serde_json::from_value(json!({
        "apiVersion": "appset.dev/v1alpha1", "kind": "AppSet",
        "metadata": {"name": "bench"}, "spec": spec(replicas, policy)
    }))?;
    let start = Instant::now();
    ns.api::<AppSet>()
        .create(&PostParams::default(), &set)
        .await?;
    let result = wait_all_ready(&ns, replicas as usize, Duration::from_secs(900)).await;
    let took = start.elapsed();
    if let Err(err) = controller.stop().await {
        eprintln!("AppSet controller: {err:#}");
    }
    finish(ns).await?;
    result?;
    Ok(took)
}

/// Deletes the namespace and waits until it is gone and so are the PersistentVolumes bound to
/// its claims, so that the garbage collection of one run (pods, claims, and the volumes the
/// controller-manager reclaims with the same rate-limited client it provisions and binds with)
/// does not compete with the next measurement.
async fn finish(ns: TestNamespace) -> Result<()> {
    let client = ns.client.clone();
    let name = ns.name.clone();
    ns.cleanup().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let volumes: Api<PersistentVolume> = Api::all(client);
    let start = Instant::now();
    loop {
        let gone = namespaces.get_opt(&name).await?.is_none();
        let left = volumes
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|v| {
                v.spec
                    .as_ref()
                    .and_then(|s| s.claim_ref.as_ref())
                    .and_then(|r| r.namespace.as_deref())
                    == Some(name.as_str())
            })
            .count();
        if gone && left == 0 {
            if verbose() {
                eprintln!(
                    "  namespace {name} and its volumes gone after {:.1}s",
                    start.elapsed().as_secs_f64()
                );
            }
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(600) {
            bail!(
                "namespace {name} (gone: {gone}) or {left} of its volumes still there after 10 minutes"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How long each measurement waits before it starts, after the previous run's cleanup: the
/// controller-manager's client (`--kube-api-qps` 20, burst 30) refills its burst in 1.5 s, so
/// a run started at once after the previous run's volumes were reclaimed would have fewer
/// requests at hand than one started on an idle cluster.
const SETTLE: Duration = Duration::from_secs(5);

/// One scenario's figures.
struct Figures {
    measure: String,
    statefulset: Duration,
    appset: Duration,
}

impl Figures {
    /// StatefulSet time / AppSet time: at least 1 when the AppSet is as fast or faster.
    fn ratio(&self) -> f64 {
        self.statefulset.as_secs_f64() / self.appset.as_secs_f64().max(1e-9)
    }
}

/// The Markdown table rows of `figures` and of the load averages.
fn table_rows(figures: &[Figures], before: &str, after: &str) -> Vec<String> {
    let mut rows: Vec<String> = figures
        .iter()
        .map(|f| {
            let ratio = f.ratio();
            // Compared as printed, so that the verdict agrees with the ratio in the row.
            let met = (ratio * 100.0).round() >= 100.0;
            format!(
                "| AppSet vs StatefulSet | {} | {:.1} s | StatefulSet {:.1} s | {ratio:.2} | ≥ 1.00: {} |",
                f.measure,
                f.appset.as_secs_f64(),
                f.statefulset.as_secs_f64(),
                if met { "met" } else { "not met" }
            )
        })
        .collect();
    rows.push(format!(
        "| AppSet vs StatefulSet | load average before / after | {before} / {after} | | | |"
    ));
    rows
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<i32> = std::env::args()
        .skip(1)
        .map(|a| a.parse::<i32>().context("replica counts must be integers"))
        .collect::<Result<_>>()?;
    let parallel = args.first().copied().unwrap_or(100);
    let ordered = args.get(1).copied().unwrap_or(20);
    let before = load_averages();
    println!("load average before: {before}");
    println!("scenario                      statefulset    appset   ratio (sts/appset)");
    let mut figures = vec![];
    for (replicas, policy) in [(parallel, "Parallel"), (ordered, "OrderedReady")] {
        tokio::time::sleep(SETTLE).await;
        let sts = time_statefulset(replicas, policy).await?;
        tokio::time::sleep(SETTLE).await;
        let aps = time_appset(replicas, policy).await?;
        let f = Figures {
            measure: format!("{replicas} replicas {policy}, 1 claim each: all Ready and Bound"),
            statefulset: sts,
            appset: aps,
        };
        println!(
            "{:<28} {:>9.2}s {:>8.2}s   {:>5.2}",
            format!("{replicas} replicas, {policy}"),
            sts.as_secs_f64(),
            aps.as_secs_f64(),
            f.ratio()
        );
        figures.push(f);
    }
    let after = load_averages();
    println!("load average after: {after}");
    append_bench_rows(&table_rows(&figures, &before, &after))?;
    Ok(())
}
