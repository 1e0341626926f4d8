//! Benchmark of config rollout on the local control plane, for appset and, side by side in the
//! same run, for any other controller given on the command line (the peer it replaces).
//!
//! Each controller gets a namespace of its own holding the same objects: N Secrets of S bytes,
//! M ConfigMaps, K Deployments (replicas 0, so only ReplicaSets are created), each referencing 5
//! Secrets and 2 ConfigMaps and annotated `reloader.stakater.com/auto: "true"` (appset runs with
//! `--reloader-compat`, so both controllers read the same annotation). The controller runs as
//! a child process scoped to that namespace, and every figure is measured from outside it:
//!
//! 1. **start-up**: from the process start until it is settled, i.e. its CPU time grows by
//!    less than 20 ms over one second (`/proc/<pid>/stat`); for appset also the time until every
//!    Deployment carries its baseline label. What the start-up wrote: Deployment `generation`
//!    bumps, Deployments and ReplicaSets whose `resourceVersion` changed, pod templates changed.
//! 2. **latency**: U ConfigMap updates one at a time, each timed until the Deployment that uses
//!    it shows a changed pod template in a watch (any change of `spec.template`, so it measures
//!    any controller's way of rolling); p50, p95, p99.
//! 3. **burst**: 5 updates of one ConfigMap 50 ms apart; the template changes that follow, counted
//!    until 3 s (plus the coalescing window) after the last update.
//! 4. **restart with nothing changed**: the process is stopped and started again; the
//!    Deployments written and pod templates changed until it settles.
//! 5. **a change made while stopped**: the process is stopped, a ConfigMap updated, the process
//!    started again; whether (and how soon after the start) the Deployment's template changes.
//!
//! Peak RSS (`VmHWM`, the largest of the process's runs) and CPU time (summed over its runs)
//! close the figures. With `--peer`, the same scenario runs against the peer and every figure
//! is printed with the ratio appset ÷ peer; with `BENCH_TABLE` set, the rows are also appended
//! to that file as a Markdown table (`e2e/bench.sh` prints them as one table).
//!
//! ```text
//! KUBECONFIG=.cluster/kubeconfig cargo run --release -p appset-e2e --bin config-rollout-bench -- \
//!     --secrets 5000 --configmaps 2000 --deployments 1000 --updates 200 \
//!     --peer 'reloader --namespace-selector= --resources-to-ignore= ...' --peer-name Reloader
//! ```
//!
//! Flags (or environment): `--secrets` (BENCH_SECRETS, 5000), `--secret-size`
//! (BENCH_SECRET_SIZE, 16384), `--configmaps` (BENCH_CONFIGMAPS, 2000), `--deployments`
//! (BENCH_DEPLOYMENTS, 1000), `--updates` (BENCH_UPDATES, 200), `--window` (BENCH_WINDOW, `0s`:
//! appset's coalescing window, added to every latency), `--operator` (BENCH_OPERATOR, default:
//! `appset-operator` beside this binary), `--peer` (BENCH_PEER: a shell command line that runs
//! the other controller in the foreground; `{namespace}` in it is replaced by the benchmark's
//! namespace, and it gets the same `KUBECONFIG`), `--peer-name` (BENCH_PEER_NAME, "peer").

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use appset_crds::keys;
use appset_e2e::process::{append_bench_rows, cpu_seconds, load_average, memory_kib};
use appset_e2e::{TestNamespace, wait_for};
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio::sync::Mutex;

struct Args {
    secrets: usize,
    secret_size: usize,
    configmaps: usize,
    deployments: usize,
    updates: usize,
    window: String,
    operator: PathBuf,
    peer: Option<String>,
    peer_name: String,
}

fn arg(name: &str, env: &str, default: &str) -> String {
    let flag = format!("--{name}");
    let argv: Vec<String> = std::env::args().collect();
    argv.iter()
        .position(|a| *a == flag)
        .and_then(|i| argv.get(i + 1).cloned())
        .or_else(|| std::env::var(env).ok())
        .unwrap_or_else(|| default.to_string())
}

fn number(name: &str, env: &str, default: usize) -> Result<usize> {
    let v = arg(name, env, &default.to_string());
    v.parse()
        .with_context(|| format!("--{name} {v:?} is not a number"))
}

impl Args {
    fn parse() -> Result<Self> {
        let beside = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("appset-operator")))
            .unwrap_or_else(|| PathBuf::from("appset-operator"));
        let peer = arg("peer", "BENCH_PEER", "");
        let args = Self {
            secrets: number("secrets", "BENCH_SECRETS", 5000)?,
            secret_size: number("secret-size", "BENCH_SECRET_SIZE", 16 * 1024)?,
            configmaps: number("configmaps", "BENCH_CONFIGMAPS", 2000)?,
            deployments: number("deployments", "BENCH_DEPLOYMENTS", 1000)?,
            updates: number("updates", "BENCH_UPDATES", 200)?,
            window: arg("window", "BENCH_WINDOW", "0s"),
            operator: PathBuf::from(arg("operator", "BENCH_OPERATOR", &beside.to_string_lossy())),
            peer: (!peer.trim().is_empty()).then_some(peer),
            peer_name: arg("peer-name", "BENCH_PEER_NAME", "peer"),
        };
        if args.deployments == 0 || args.configmaps == 0 || args.secrets == 0 {
            bail!("--secrets, --configmaps and --deployments must be at least 1");
        }
        if !args.operator.exists() {
            bail!(
                "operator binary {} not found: build it with `cargo build --release -p appset-operator` or pass --operator",
                args.operator.display()
            );
        }
        Ok(args)
    }

    fn window(&self) -> Duration {
        appset_operator::runtime::duration::parse(&self.window).unwrap_or_default()
    }
}

/// Bytes that do not compress, from a small xorshift generator.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x & 0xff) as u8
        })
        .collect()
}

/// The sources Deployment `i` uses: 5 Secrets and 2 ConfigMaps, spread so every source is used.
fn uses(i: usize, a: &Args) -> (Vec<usize>, Vec<usize>) {
    let secrets = (0..5).map(|k| (i * 5 + k) % a.secrets).collect();
    let cms = (0..2).map(|k| (i * 2 + k) % a.configmaps).collect();
    (secrets, cms)
}

fn deployment(i: usize, a: &Args) -> Deployment {
    let name = format!("app-{i}");
    let (secrets, cms) = uses(i, a);
    let env_from: Vec<_> = secrets
        .iter()
        .take(3)
        .map(|s| json!({"secretRef": {"name": format!("secret-{s}")}}))
        .chain(
            cms.iter()
                .map(|c| json!({"configMapRef": {"name": format!("config-{c}")}})),
        )
        .collect();
    let volumes: Vec<_> = secrets
        .iter()
        .skip(3)
        .enumerate()
        .map(|(k, s)| json!({"name": format!("s{k}"), "secret": {"secretName": format!("secret-{s}")}}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": {keys::RELOADER_AUTO: "true"}},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1", "envFrom": env_from}],
                         "volumes": volumes}
            }
        }
    }))
    .unwrap_or_default()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn create_all<T, F>(what: &str, n: usize, make: F) -> Result<()>
where
    F: Fn(usize) -> futures::future::BoxFuture<'static, Result<T>>,
{
    let start = Instant::now();
    stream::iter(0..n)
        .map(&make)
        .buffer_unordered(32)
        .try_for_each(|_| async { Ok(()) })
        .await
        .with_context(|| format!("create {what}"))?;
    eprintln!("  created {n} {what} in {:.1?}", start.elapsed());
    Ok(())
}

async fn create_objects(a: &Args, ns: &TestNamespace) -> Result<()> {
    let size = a.secret_size;
    let api: Api<Secret> = ns.api();
    create_all("Secrets", a.secrets, move |i| {
        let api = api.clone();
        Box::pin(async move {
            let s = Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some(format!("secret-{i}")),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([(
                    "payload".to_string(),
                    ByteString(noise(i as u64, size)),
                )])),
                ..Default::default()
            };
            Ok(api.create(&PostParams::default(), &s).await?)
        })
    })
    .await?;
    let api: Api<ConfigMap> = ns.api();
    create_all("ConfigMaps", a.configmaps, move |i| {
        let api = api.clone();
        Box::pin(async move {
            let c = ConfigMap {
                metadata: kube::api::ObjectMeta {
                    name: Some(format!("config-{i}")),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([(
                    "setting".to_string(),
                    format!("value-{i}-0"),
                )])),
                ..Default::default()
            };
            Ok(api.create(&PostParams::default(), &c).await?)
        })
    })
    .await?;
    let api: Api<Deployment> = ns.api();
    let objects: Arc<Vec<Deployment>> =
        Arc::new((0..a.deployments).map(|i| deployment(i, a)).collect());
    create_all("Deployments", a.deployments, move |i| {
        let api = api.clone();
        let objects = objects.clone();
        Box::pin(async move { Ok(api.create(&PostParams::default(), &objects[i]).await?) })
    })
    .await?;
    // Wait for kube-controller-manager to create every ReplicaSet, so that its writes are not
    // counted as the controller's.
    let rs: Api<ReplicaSet> = ns.api();
    let n = a.deployments;
    wait_for("every ReplicaSet", Duration::from_secs(600), || async {
        let have = rs.list_metadata(&ListParams::default()).await?.items.len();
        Ok(if have >= n {
            Ok(())
        } else {
            Err(format!("{have} ReplicaSets"))
        })
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    Ok(())
}

/// Which controller runs.
#[derive(Clone)]
enum Controller {
    Appset { binary: PathBuf, window: String },
    Peer { command: String },
}

/// One run of the controller process; stopped with SIGTERM (then killed) when dropped.
struct Child {
    process: std::process::Child,
    started: Instant,
}

impl Controller {
    fn start(&self, ns: &str) -> Result<Child> {
        let mut cmd = match self {
            Controller::Appset { binary, window } => {
                let mut cmd = std::process::Command::new(binary);
                cmd.args(["--namespaces", ns, "--operator-namespace", ns])
                    .args(["--listen", "127.0.0.1:0", "--reloader-compat"])
                    .args(["--coalesce-window", window, "--min-rollout-interval", "0s"])
                    .env("RUST_LOG", "warn");
                cmd
            }
            Controller::Peer { command } => {
                let mut cmd = std::process::Command::new("sh");
                cmd.args([
                    "-c",
                    &format!("exec {}", command.replace("{namespace}", ns)),
                ]);
                cmd
            }
        };
        let process = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start the controller")?;
        Ok(Child {
            process,
            started: Instant::now(),
        })
    }
}

impl Child {
    fn pid(&self) -> u32 {
        self.process.id()
    }

    fn stop(&mut self) {
        if matches!(self.process.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.process.id().to_string()])
            .status();
        for _ in 0..100 {
            if matches!(self.process.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.process.kill();
        let _ = self.process.wait();
    }

    /// Waits until the process's CPU time grows by less than 20 ms in one second; returns the
    /// time from its start to the beginning of that quiet second.
    async fn settle(&mut self, deadline: Duration) -> Result<Duration> {
        let pid = self.pid();
        let mut samples: Vec<(Instant, f64)> = Vec::new();
        loop {
            if let Ok(Some(status)) = self.process.try_wait() {
                bail!("the controller exited while starting: {status}");
            }
            let now = Instant::now();
            let cpu = cpu_seconds(pid).context("the controller's /proc/<pid>/stat")?;
            samples.push((now, cpu));
            if let Some(&(t, c)) = samples
                .iter()
                .find(|(t, _)| now.duration_since(*t) <= Duration::from_secs(1))
                && now.duration_since(t) >= Duration::from_millis(900)
                && cpu - c < 0.02
            {
                return Ok(t.duration_since(self.started));
            }
            if self.started.elapsed() > deadline {
                bail!("the controller did not settle within {deadline:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn peak_kib(&self) -> u64 {
        memory_kib(self.pid(), "VmHWM:").unwrap_or_default()
    }

    fn cpu(&self) -> f64 {
        cpu_seconds(self.pid()).unwrap_or_default()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `resourceVersion` and `generation` of every object of a kind, and the Deployments' templates.
#[derive(Default)]
struct Versions {
    rv: HashMap<String, String>,
    generation: HashMap<String, i64>,
    template: HashMap<String, String>,
}

async fn deployment_versions(api: &Api<Deployment>) -> Result<Versions> {
    let mut v = Versions::default();
    for d in api.list(&ListParams::default()).await?.items {
        let name = d.name_any();
        v.rv.insert(name.clone(), d.resource_version().unwrap_or_default());
        v.generation
            .insert(name.clone(), d.metadata.generation.unwrap_or_default());
        v.template.insert(name, template_of(&d));
    }
    Ok(v)
}

async fn replica_set_versions(api: &Api<ReplicaSet>) -> Result<HashMap<String, String>> {
    Ok(api
        .list_metadata(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|r| (r.name_any(), r.resource_version().unwrap_or_default()))
        .collect())
}

fn changed(before: &HashMap<String, String>, after: &HashMap<String, String>) -> usize {
    after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .count()
}

/// The pod template as JSON: any change of it is a rollout, whatever the controller wrote.
fn template_of(d: &Deployment) -> String {
    serde_json::to_string(&d.spec.template).unwrap_or_default()
}

/// What the start-up (or a restart) of the controller did.
struct Startup {
    settled: Duration,
    /// appset only: until every Deployment carries its baseline label.
    baselines: Option<Duration>,
    generation_bumps: i64,
    deployments_written: usize,
    replica_sets_written: usize,
    templates_changed: usize,
}

/// Reads every version, then starts the controller and observes it until it settles.
async fn start_and_observe(
    ns: &TestNamespace,
    controller: &Controller,
    deployments: usize,
) -> Result<(Child, Startup)> {
    let appset = matches!(controller, Controller::Appset { .. });
    let deploys: Api<Deployment> = ns.api();
    let replica_sets: Api<ReplicaSet> = ns.api();
    // kube-controller-manager may still be working through earlier rollouts: its writes are
    // not the controller's, so the versions are read once nothing has changed for 3 s.
    let quiet_since = Instant::now();
    let (before, rs_before) = loop {
        let d = deployment_versions(&deploys).await?;
        let r = replica_set_versions(&replica_sets).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let d2 = deployment_versions(&deploys).await?;
        let r2 = replica_set_versions(&replica_sets).await?;
        if (changed(&d.rv, &d2.rv) == 0 && changed(&r, &r2) == 0)
            || quiet_since.elapsed() > Duration::from_secs(180)
        {
            break (d2, r2);
        }
    };
    let mut child = controller.start(&ns.name)?;
    let baselines = if appset {
        let started = child.started;
        wait_for(
            "every Deployment's baseline",
            Duration::from_secs(900),
            || async {
                let list = deploys.list_metadata(&ListParams::default()).await?;
                let n = list
                    .items
                    .iter()
                    .filter(|d| d.labels().contains_key(keys::CONFIG_BASELINE))
                    .count();
                Ok(if n >= deployments {
                    Ok(())
                } else {
                    Err(format!("{n} baselines"))
                })
            },
        )
        .await?;
        Some(started.elapsed())
    } else {
        None
    };
    let settled = child.settle(Duration::from_secs(900)).await?;
    // Writes the controller made reach the watch caches of other controllers within moments.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = deployment_versions(&deploys).await?;
    let rs_after = replica_set_versions(&replica_sets).await?;
    let generation_bumps = after
        .generation
        .iter()
        .map(|(k, g)| g - before.generation.get(k).copied().unwrap_or(*g))
        .sum();
    let startup = Startup {
        settled,
        baselines,
        generation_bumps,
        deployments_written: changed(&before.rv, &after.rv),
        replica_sets_written: changed(&rs_before, &rs_after),
        templates_changed: changed(&before.template, &after.template),
    };
    Ok((child, startup))
}

/// Pod templates as the watch sees them: Deployment name → (template, when first seen).
type Seen = Arc<Mutex<BTreeMap<String, (String, Instant)>>>;

/// Follows every Deployment's pod template, and counts each change.
struct TemplateWatch {
    seen: Seen,
    changes: Arc<Mutex<HashMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TemplateWatch {
    async fn start(api: Api<Deployment>) -> Self {
        let seen: Seen = Arc::default();
        let changes: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let (sink, counts) = (seen.clone(), changes.clone());
        let task = tokio::spawn(
            watcher(api, watcher::Config::default())
                .applied_objects()
                .for_each(move |d| {
                    let (sink, counts) = (sink.clone(), counts.clone());
                    async move {
                        let Ok(d) = d else { return };
                        let template = template_of(&d);
                        let mut map = sink.lock().await;
                        match map.get(&d.name_any()) {
                            Some((t, _)) if *t == template => {}
                            Some(_) => {
                                *counts.lock().await.entry(d.name_any()).or_default() += 1;
                                map.insert(d.name_any(), (template, Instant::now()));
                            }
                            None => {
                                map.insert(d.name_any(), (template, Instant::now()));
                            }
                        }
                    }
                }),
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        Self {
            seen,
            changes,
            task,
        }
    }

    async fn template(&self, name: &str) -> Option<String> {
        self.seen.lock().await.get(name).map(|(t, _)| t.clone())
    }

    async fn changes(&self, name: &str) -> usize {
        self.changes.lock().await.get(name).copied().unwrap_or(0)
    }

    /// Waits until `name`'s template differs from `before`; returns when it was first seen.
    async fn changed_from(&self, name: &str, before: &str, deadline: Duration) -> Result<Instant> {
        wait_for(
            &format!("{name}'s pod template to change"),
            deadline,
            || async {
                Ok(match self.seen.lock().await.get(name) {
                    Some((t, at)) if t != before => Ok(*at),
                    _ => Err("template unchanged".to_string()),
                })
            },
        )
        .await
    }
}

impl Drop for TemplateWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn update(cms: &Api<ConfigMap>, name: &str, value: String) -> Result<()> {
    cms.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"setting": value}})),
    )
    .await
    .with_context(|| format!("update {name}"))?;
    Ok(())
}

/// Every figure of one controller's run.
struct Figures {
    startup: Startup,
    latencies: Vec<Duration>,
    burst_updates: usize,
    burst_changes: usize,
    restart: Startup,
    stopped_change: Option<Duration>,
    peak_kib: u64,
    cpu: f64,
    load_before: String,
    load_after: String,
}

async fn scenario(a: &Args, controller: &Controller, label: &str) -> Result<Figures> {
    let ns = TestNamespace::new("bench-config").await?;
    let result = scenario_in(a, controller, label, &ns).await;
    ns.cleanup().await;
    result
}

async fn scenario_in(
    a: &Args,
    controller: &Controller,
    label: &str,
    ns: &TestNamespace,
) -> Result<Figures> {
    eprintln!("{label}: namespace {}", ns.name);
    create_objects(a, ns).await?;
    let cms: Api<ConfigMap> = ns.api();
    let deploys: Api<Deployment> = ns.api();
    let load_before = load_average();

    // 1. Start-up.
    let (mut child, startup) = start_and_observe(ns, controller, a.deployments).await?;
    eprintln!(
        "  settled {:.1?} after the start; {} Deployments written, {} generation bumps, {} ReplicaSets written, {} templates changed",
        startup.settled,
        startup.deployments_written,
        startup.generation_bumps,
        startup.replica_sets_written,
        startup.templates_changed
    );

    // 2. Latency.
    let watch = TemplateWatch::start(deploys.clone()).await;
    let mut latencies = Vec::with_capacity(a.updates);
    let stride = (a.deployments / a.updates.max(1)).max(1);
    for u in 0..a.updates {
        let d = (u * stride) % a.deployments;
        let name = format!("app-{d}");
        let cm = format!("config-{}", (d * 2) % a.configmaps);
        let before = watch.template(&name).await.unwrap_or_default();
        let sent = Instant::now();
        update(&cms, &cm, format!("value-{d}-{}", u + 1)).await?;
        let at = watch
            .changed_from(&name, &before, Duration::from_secs(120))
            .await?;
        latencies.push(at.saturating_duration_since(sent));
    }
    latencies.sort();

    // 3. A burst of updates of one ConfigMap.
    let burst_target = a.deployments - 1;
    let burst_name = format!("app-{burst_target}");
    let burst_cm = format!("config-{}", (burst_target * 2) % a.configmaps);
    let burst_updates = 5;
    let changes_before = watch.changes(&burst_name).await;
    for k in 0..burst_updates {
        update(&cms, &burst_cm, format!("burst-{k}")).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(3) + a.window()).await;
    let burst_changes = watch.changes(&burst_name).await - changes_before;
    let mut peak_kib = child.peak_kib();
    let mut cpu = child.cpu();
    child.stop();
    drop(child);

    // 4. Restart with nothing changed.
    let (mut child, restart) = start_and_observe(ns, controller, a.deployments).await?;
    peak_kib = peak_kib.max(child.peak_kib());
    cpu += child.cpu();
    child.stop();
    drop(child);

    // 5. A change made while the controller is stopped.
    let target = format!("app-{}", a.deployments / 2);
    let target_cm = format!("config-{}", (a.deployments / 2 * 2) % a.configmaps);
    let before = watch.template(&target).await.unwrap_or_default();
    update(&cms, &target_cm, "changed-while-stopped".into()).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut child = controller.start(&ns.name)?;
    let started = child.started;
    let stopped_change = watch
        .changed_from(&target, &before, Duration::from_secs(60))
        .await
        .ok()
        .map(|at| at.saturating_duration_since(started));
    if stopped_change.is_none() {
        // Let the start-up finish so that its CPU and memory count fully.
        let _ = child.settle(Duration::from_secs(300)).await;
    }
    peak_kib = peak_kib.max(child.peak_kib());
    cpu += child.cpu();
    child.stop();
    drop(watch);

    Ok(Figures {
        startup,
        latencies,
        burst_updates,
        burst_changes,
        restart,
        stopped_change,
        peak_kib,
        cpu,
        load_before,
        load_after: load_average(),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn latency_text(f: &Figures) -> String {
    format!(
        "{:.0} / {:.0} / {:.0} ms",
        ms(percentile(&f.latencies, 50.0)),
        ms(percentile(&f.latencies, 95.0)),
        ms(percentile(&f.latencies, 99.0))
    )
}

fn stopped_text(f: &Figures) -> String {
    match f.stopped_change {
        Some(d) => format!("rolled {:.1} s after the start", d.as_secs_f64()),
        None => "not rolled within 60 s".into(),
    }
}

/// One Markdown row: `| scenario | measure | appset | reference | ratio | goal |`.
struct Row {
    measure: String,
    appset: String,
    reference: String,
    ratio: Option<f64>,
    goal: String,
}

fn verdict(ratio: Option<f64>, bound: f64, at_most: bool) -> String {
    let sign = if at_most { "≤" } else { "≥" };
    match ratio {
        None => format!("{sign} {bound:.2} (needs --peer)"),
        Some(r) if (at_most && r <= bound) || (!at_most && r >= bound) => {
            format!("{sign} {bound:.2}: met")
        }
        Some(_) => format!("{sign} {bound:.2}: not met"),
    }
}

fn rows(a: &Args, mine: &Figures, peer: Option<&Figures>) -> Vec<Row> {
    let name = &a.peer_name;
    let reference = |text: &dyn Fn(&Figures) -> String| {
        peer.map(|p| format!("{name} {}", text(p)))
            .unwrap_or_else(|| "no peer run".into())
    };
    let ratio = |value: &dyn Fn(&Figures) -> f64| peer.map(|p| value(mine) / value(p).max(1e-9));
    let mib = |f: &Figures| f.peak_kib as f64 / 1024.0;
    let settled = |f: &Figures| f.startup.settled.as_secs_f64();
    let p99 = |f: &Figures| ms(percentile(&f.latencies, 99.0));
    let mut out = vec![
        Row {
            measure: "peak RSS".into(),
            appset: format!("{:.1} MiB", mib(mine)),
            reference: reference(&|f| format!("{:.1} MiB", mib(f))),
            ratio: ratio(&mib),
            goal: verdict(ratio(&mib), 0.10, true),
        },
        Row {
            measure: "start-up until settled (CPU quiet)".into(),
            appset: format!("{:.1} s", settled(mine)),
            reference: reference(&|f| format!("{:.1} s", settled(f))),
            ratio: ratio(&settled),
            goal: verdict(ratio(&settled), 0.50, true),
        },
        Row {
            measure: "controller CPU over the run".into(),
            appset: format!("{:.1} s", mine.cpu),
            reference: reference(&|f| format!("{:.1} s", f.cpu)),
            ratio: ratio(&|f| f.cpu),
            goal: String::new(),
        },
        Row {
            measure: format!(
                "ConfigMap update → template changed, p50 / p95 / p99 ({} updates)",
                mine.latencies.len()
            ),
            appset: latency_text(mine),
            reference: reference(&|f| latency_text(f)),
            ratio: ratio(&p99),
            goal: format!("p99 {}", verdict(ratio(&p99), 0.25, true)),
        },
    ];
    let writes = |s: &Startup| {
        format!(
            "{} generation bumps, {} Deployments and {} ReplicaSets written, {} templates changed",
            s.generation_bumps, s.deployments_written, s.replica_sets_written, s.templates_changed
        )
    };
    let quiet_adoption = mine.startup.generation_bumps == 0
        && mine.startup.replica_sets_written == 0
        && mine.startup.templates_changed == 0;
    out.push(Row {
        measure: format!("what the start-up wrote ({} workloads)", a.deployments),
        appset: writes(&mine.startup),
        reference: reference(&|f| writes(&f.startup)),
        ratio: None,
        goal: format!(
            "no generation bump, no ReplicaSet write, no rollout: {}",
            if quiet_adoption { "met" } else { "not met" }
        ),
    });
    if let Some(b) = mine.startup.baselines {
        out.push(Row {
            measure: "start-up until every baseline is recorded".into(),
            appset: format!("{:.1} s", b.as_secs_f64()),
            reference: String::new(),
            ratio: None,
            goal: String::new(),
        });
    }
    let quiet_restart =
        mine.restart.deployments_written == 0 && mine.restart.templates_changed == 0;
    out.push(Row {
        measure: "restart with nothing changed: what it wrote".into(),
        appset: writes(&mine.restart),
        reference: reference(&|f| writes(&f.restart)),
        ratio: None,
        goal: format!(
            "no write at all: {}",
            if quiet_restart { "met" } else { "not met" }
        ),
    });
    out.push(Row {
        measure: "restart with nothing changed: until settled".into(),
        appset: format!("{:.1} s", mine.restart.settled.as_secs_f64()),
        reference: reference(&|f| format!("{:.1} s", f.restart.settled.as_secs_f64())),
        ratio: ratio(&|f| f.restart.settled.as_secs_f64()),
        goal: String::new(),
    });
    out.push(Row {
        measure: format!(
            "template changes after a burst of {} updates of one ConfigMap, 50 ms apart (window {})",
            mine.burst_updates, a.window
        ),
        appset: mine.burst_changes.to_string(),
        reference: reference(&|f| f.burst_changes.to_string()),
        ratio: None,
        goal: String::new(),
    });
    out.push(Row {
        measure: "a ConfigMap changed while the controller was stopped".into(),
        appset: stopped_text(mine),
        reference: reference(&|f| stopped_text(f)),
        ratio: None,
        goal: format!(
            "rolled: {}",
            if mine.stopped_change.is_some() {
                "met"
            } else {
                "not met"
            }
        ),
    });
    out.push(Row {
        measure: "load average before / after".into(),
        appset: format!("{} / {}", mine.load_before, mine.load_after),
        reference: peer
            .map(|p| format!("{name} {} / {}", p.load_before, p.load_after))
            .unwrap_or_default(),
        ratio: None,
        goal: String::new(),
    });
    out
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse()?;
    let data_mib = (a.secrets * a.secret_size) as f64 / (1024.0 * 1024.0);
    let scenario_name = format!(
        "config rollout: {} Secrets × {} KiB ({data_mib:.0} MiB), {} ConfigMaps, {} Deployments",
        a.secrets,
        a.secret_size / 1024,
        a.configmaps,
        a.deployments
    );
    eprintln!("{scenario_name}, {} updates", a.updates);
    let appset = Controller::Appset {
        binary: a.operator.clone(),
        window: a.window.clone(),
    };
    let mine = scenario(&a, &appset, "appset").await?;
    let peer = match &a.peer {
        Some(command) => Some(
            scenario(
                &a,
                &Controller::Peer {
                    command: command.clone(),
                },
                &a.peer_name,
            )
            .await?,
        ),
        None => None,
    };
    let rows = rows(&a, &mine, peer.as_ref());
    println!("{scenario_name}");
    for r in &rows {
        let ratio = r
            .ratio
            .map(|x| format!(" (ratio {x:.2})"))
            .unwrap_or_default();
        println!(
            "  {}: appset {}; {}{ratio} {}",
            r.measure, r.appset, r.reference, r.goal
        );
    }
    let table: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "| {scenario_name} | {} | {} | {} | {} | {} |",
                r.measure,
                r.appset,
                r.reference,
                r.ratio.map(|x| format!("{x:.2}")).unwrap_or_default(),
                r.goal
            )
        })
        .collect();
    append_bench_rows(&table)?;
    Ok(())
}
