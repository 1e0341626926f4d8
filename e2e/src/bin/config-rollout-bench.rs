//! Benchmark of config rollout on the local control plane: the operator's peak memory with many
//! large Secrets, and the latency from a ConfigMap update to the Deployment's template change.
//!
//! It creates its own namespace, fills it with N Secrets of S bytes, M ConfigMaps and K opted-in
//! Deployments (replicas 0, so only ReplicaSets are created), starts the real `appset-operator`
//! binary as a child process scoped to that namespace, waits until every Deployment is adopted,
//! then updates U ConfigMaps one at a time and times each until the Deployment that uses it has
//! a new `appset.dev/config-hash` in its pod template. It prints the figures, stops the operator
//! and deletes the namespace.
//!
//! ```text
//! KUBECONFIG=.cluster/kubeconfig cargo run --release -p appset-e2e --bin config-rollout-bench -- \
//!     --secrets 5000 --configmaps 2000 --deployments 1000 --updates 200
//! ```
//!
//! Flags (or environment): `--secrets` (BENCH_SECRETS, 5000), `--secret-size` (BENCH_SECRET_SIZE,
//! 16384), `--configmaps` (BENCH_CONFIGMAPS, 2000), `--deployments` (BENCH_DEPLOYMENTS, 1000),
//! `--updates` (BENCH_UPDATES, 200), `--window` (BENCH_WINDOW, `0s`: the operator's coalescing
//! window, added to every latency), `--operator` (BENCH_OPERATOR, default: `appset-operator`
//! beside this binary).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use appset_crds::keys;
use appset_e2e::fixtures::template_hash;
use appset_e2e::process::memory_kib;
use appset_e2e::{TestNamespace, wait_for};
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
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
        let args = Self {
            secrets: number("secrets", "BENCH_SECRETS", 5000)?,
            secret_size: number("secret-size", "BENCH_SECRET_SIZE", 16 * 1024)?,
            configmaps: number("configmaps", "BENCH_CONFIGMAPS", 2000)?,
            deployments: number("deployments", "BENCH_DEPLOYMENTS", 1000)?,
            updates: number("updates", "BENCH_UPDATES", 200)?,
            window: arg("window", "BENCH_WINDOW", "0s"),
            operator: PathBuf::from(arg("operator", "BENCH_OPERATOR", &beside.to_string_lossy())),
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
        "metadata": {"name": name, "annotations": {keys::CONFIG_ROLLOUT: keys::CONFIG_ROLLOUT_AUTO}},
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
    eprintln!("created {n} {what} in {:.1?}", start.elapsed());
    Ok(())
}

/// Deployment name → (template hash, when the watch first showed it).
type Seen = Arc<Mutex<BTreeMap<String, (Option<String>, Instant)>>>;

/// The operator process; stopped with SIGTERM (then killed) when dropped.
struct Child(std::process::Child);

impl Child {
    fn stop(&mut self) {
        if matches!(self.0.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..100 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse()?;
    let ns = TestNamespace::new("bench-config").await?;
    let result = run(&a, &ns).await;
    ns.cleanup().await;
    result
}

async fn run(a: &Args, ns: &TestNamespace) -> Result<()> {
    eprintln!(
        "namespace {}: {} Secrets of {} B, {} ConfigMaps, {} Deployments, {} updates",
        ns.name, a.secrets, a.secret_size, a.configmaps, a.deployments, a.updates
    );
    let secrets: Api<Secret> = ns.api();
    let cms: Api<ConfigMap> = ns.api();
    let deploys: Api<Deployment> = ns.api();
    let size = a.secret_size;
    let api = secrets.clone();
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
    let api = cms.clone();
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
    let api = deploys.clone();
    let objects: Arc<Vec<Deployment>> =
        Arc::new((0..a.deployments).map(|i| deployment(i, a)).collect());
    create_all("Deployments", a.deployments, move |i| {
        let api = api.clone();
        let objects = objects.clone();
        Box::pin(async move { Ok(api.create(&PostParams::default(), &objects[i]).await?) })
    })
    .await?;

    // The operator, as its own process, watching only this namespace.
    let child = std::process::Command::new(&a.operator)
        .args(["--namespaces", &ns.name, "--operator-namespace", &ns.name])
        .args([
            "--listen",
            "127.0.0.1:0",
            "--coalesce-window",
            &a.window,
            "--min-rollout-interval",
            "0s",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("start {}", a.operator.display()))?;
    let mut child = Child(child);
    let pid = child.0.id();
    let started = Instant::now();
    let adopted = wait_for(
        "every Deployment adopted",
        Duration::from_secs(900),
        || async {
            let list = deploys.list_metadata(&ListParams::default()).await?;
            let n = list
                .items
                .iter()
                .filter(|d| d.annotations().contains_key(keys::CONFIG_HASH_OBSERVED))
                .count();
            Ok(if n == a.deployments {
                Ok(n)
            } else {
                Err(format!("{n} adopted"))
            })
        },
    )
    .await;
    let adopted = adopted?;
    let adoption = started.elapsed();
    let rss_after_adoption = memory_kib(pid, "VmRSS:").unwrap_or_default();
    eprintln!(
        "adopted {adopted} Deployments in {adoption:.1?}; operator RSS {rss_after_adoption} KiB"
    );

    // Template hashes as the watch sees them, with the time each was seen.
    let seen: Seen = Arc::default();
    let sink = seen.clone();
    let watch = tokio::spawn(
        watcher(deploys.clone(), watcher::Config::default())
            .applied_objects()
            .for_each(move |d| {
                let sink = sink.clone();
                async move {
                    if let Ok(d) = d {
                        let mut map = sink.lock().await;
                        let hash = template_hash(&d);
                        let changed = map
                            .get(&d.name_any())
                            .map(|(h, _)| h != &hash)
                            .unwrap_or(true);
                        if changed {
                            map.insert(d.name_any(), (hash, Instant::now()));
                        }
                    }
                }
            }),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut latencies = Vec::with_capacity(a.updates);
    let stride = (a.deployments / a.updates.max(1)).max(1);
    for u in 0..a.updates {
        let d = (u * stride) % a.deployments;
        let name = format!("app-{d}");
        let cm = format!("config-{}", (d * 2) % a.configmaps);
        let before = seen.lock().await.get(&name).and_then(|(h, _)| h.clone());
        let sent = Instant::now();
        cms.patch(
            &cm,
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"setting": format!("value-{d}-{}", u + 1)}})),
        )
        .await
        .with_context(|| format!("update {cm}"))?;
        let at = wait_for(
            &format!("{name} to roll after {cm} changed"),
            Duration::from_secs(120),
            || async {
                Ok(match seen.lock().await.get(&name) {
                    Some((h, t)) if *h != before && h.is_some() => Ok(*t),
                    _ => Err("template unchanged".to_string()),
                })
            },
        )
        .await?;
        latencies.push(at.saturating_duration_since(sent));
    }
    watch.abort();

    let peak = memory_kib(pid, "VmHWM:").unwrap_or_default();
    let rss = memory_kib(pid, "VmRSS:").unwrap_or_default();
    child.stop();

    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let data_mib = (a.secrets * a.secret_size) as f64 / (1024.0 * 1024.0);
    println!("config rollout benchmark");
    println!(
        "  objects: {} Secrets x {} B ({data_mib:.0} MiB), {} ConfigMaps, {} opted-in Deployments",
        a.secrets, a.secret_size, a.configmaps, a.deployments
    );
    println!("  adoption of every Deployment: {adoption:.1?} (no rollout)");
    println!(
        "  operator memory: peak RSS {:.1} MiB, RSS at end {:.1} MiB, after adoption {:.1} MiB",
        peak as f64 / 1024.0,
        rss as f64 / 1024.0,
        rss_after_adoption as f64 / 1024.0
    );
    println!(
        "  ConfigMap update -> Deployment template change over {} updates (coalescing window {}): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        latencies.len(),
        a.window,
        ms(percentile(&latencies, 50.0)),
        ms(percentile(&latencies, 99.0)),
        ms(latencies.last().copied().unwrap_or_default())
    );
    Ok(())
}
