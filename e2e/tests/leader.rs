//! Fault tests of leader election: two real `appset-operator` processes share one Lease, and
//! the tests try to make both write at once. Each prints what it measured.
//!
//! * SIGTERM of the leader: the Lease is released and the standby leads in under 2 s.
//! * SIGSTOP of the leader in the middle of a rollout: the standby leads within lease duration
//!   plus retry period; after SIGCONT the old leader sends no write at all (checked in the API
//!   server's audit log, where each replica's requests carry its identity in the User-Agent)
//!   and exits.
//! * SIGSTOP of kube-apiserver for longer than the lease: the leader stops (its fence closes at
//!   the renew deadline) and, after SIGCONT, exactly one replica leads and rolls the set. The
//!   standby's `/healthz` fails while its Lease loop hangs (liveness timeout 2 s) and passes
//!   again after; its `appset_leader` gauge reads 0 while it stands by and 1 once it leads. This one stops a shared component, so it brings up a control plane of its own
//!   (`.cluster-leader`, ports from 16940).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use appset_crds::AppSet;
use appset_e2e::cluster::OwnCluster;
use appset_e2e::fixtures::{appset, wait_settled};
use appset_e2e::process::{Process, binary, free_port, scratch_dir};
use appset_e2e::{TestNamespace, wait_for};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

const LEASE: &str = "appset-leader-e2e";
/// Short timings, so the tests take seconds: lease 6 s, renew deadline 4 s, retry 1 s.
const TIMING: [&str; 6] = [
    "--lease-duration",
    "6s",
    "--renew-deadline",
    "4s",
    "--retry-period",
    "1s",
];

/// Starts replica `id` of the operator, leader-elected, its Lease in `home`, watching `watched`.
fn replica(kubeconfig: &Path, home: &str, watched: &str, id: &str, dir: &Path) -> Result<Process> {
    replica_with(kubeconfig, home, watched, id, dir, free_port()?, &[])
}

/// [`replica`] listening on `port`, with `extra` flags.
fn replica_with(
    kubeconfig: &Path,
    home: &str,
    watched: &str,
    id: &str,
    dir: &Path,
    port: u16,
    extra: &[&str],
) -> Result<Process> {
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "--namespaces",
        watched,
        "--listen",
        &listen,
        "--leader-elect",
        "--lease-name",
        LEASE,
        "--log-format",
        "text",
    ];
    args.extend(TIMING);
    args.extend(extra);
    Process::start(
        &binary("appset-operator")?,
        &args,
        &[
            ("KUBECONFIG", &kubeconfig.to_string_lossy()),
            ("POD_NAMESPACE", home),
            ("POD_NAME", id),
            ("RUST_LOG", "info"),
        ],
        dir.join(format!("{id}.log")),
    )
}

async fn holder(leases: &Api<Lease>) -> Result<(String, Option<Timestamp>)> {
    let spec = leases
        .get_opt(LEASE)
        .await?
        .and_then(|l| l.spec)
        .unwrap_or_default();
    Ok((
        spec.holder_identity.unwrap_or_default(),
        spec.acquire_time.map(|t| t.0),
    ))
}

async fn wait_holder(leases: &Api<Lease>, id: &str, deadline: Duration) -> Result<Timestamp> {
    wait_for(&format!("{id} to lead"), deadline, || async {
        let (h, at) = holder(leases).await?;
        Ok(match at {
            Some(at) if h == id => Ok(at),
            _ => Err(format!("holder {h:?}")),
        })
    })
    .await
}

/// The write requests (create/update/patch/delete) the audit log of the cluster in `dir`
/// records from replica `id` received after `after`.
fn writes_after(cluster_dir: &Path, id: &str, after: Timestamp) -> Result<Vec<String>> {
    let path = cluster_dir.join("logs/audit.log");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("read {} (does up.sh enable auditing?)", path.display()))?;
    let agent = format!("({id})");
    let mut found = Vec::new();
    for line in text.lines() {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let ua = event["userAgent"].as_str().unwrap_or_default();
        if !ua.starts_with("appset-operator/") || !ua.ends_with(&agent) {
            continue;
        }
        let received: Option<Timestamp> = event["requestReceivedTimestamp"]
            .as_str()
            .and_then(|t| t.parse().ok());
        if received.is_some_and(|r| r > after) {
            found.push(format!(
                "{} {} {}",
                event["requestReceivedTimestamp"]
                    .as_str()
                    .unwrap_or_default(),
                event["verb"].as_str().unwrap_or_default(),
                event["requestURI"].as_str().unwrap_or_default()
            ));
        }
    }
    Ok(found)
}

/// How many write requests of replica `id` the audit log records in all (to show the check
/// sees this replica's writes at all).
fn writes_total(cluster_dir: &Path, id: &str) -> Result<usize> {
    writes_after(cluster_dir, id, Timestamp::UNIX_EPOCH).map(|w| w.len())
}

/// Waits up to `timeout` for `p` to exit, off the async threads; the process and its status.
async fn exit_within(
    mut p: Process,
    timeout: Duration,
) -> Result<(Process, Option<std::process::ExitStatus>)> {
    Ok(tokio::task::spawn_blocking(move || {
        let status = p.wait_exit(timeout);
        (p, status)
    })
    .await?)
}

fn shared_cluster_dir() -> Result<PathBuf> {
    Ok(std::env::var_os("APPSET_CLUSTER_DIR")
        .context("APPSET_CLUSTER_DIR; run the suite through `make e2e`")?
        .into())
}

fn kubeconfig_from_env() -> Result<PathBuf> {
    Ok(std::env::var_os("KUBECONFIG")
        .context("KUBECONFIG; run the suite through `make e2e`")?
        .into())
}

/// Patches the template of AppSet `name`: a rolling update that needs writes.
async fn roll(sets: &Api<AppSet>, name: &str, release: &str) -> Result<()> {
    sets.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"template": {"metadata": {"labels": {"app": name, "release": release}}}}})),
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn sigterm_hands_the_lease_over_in_under_two_seconds() -> Result<()> {
    let home = TestNamespace::new("lease-term").await?;
    let dir = scratch_dir(&home.name)?;
    let kubeconfig = kubeconfig_from_env()?;
    let leases = home.api::<Lease>();
    let a = replica(&kubeconfig, &home.name, &home.name, "term-a", &dir)?;
    wait_holder(&leases, "term-a", Duration::from_secs(30)).await?;
    let mut b = replica(&kubeconfig, &home.name, &home.name, "term-b", &dir)?;
    // The standby is up and looking at the Lease.
    wait_for("the standby to wait", Duration::from_secs(30), || async {
        let log = std::fs::read_to_string(dir.join("term-b.log")).unwrap_or_default();
        Ok(if log.contains("serving /metrics") {
            Ok(())
        } else {
            Err("not started".to_string())
        })
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent = Instant::now();
    a.signal("TERM")?;
    wait_holder(&leases, "term-b", Duration::from_secs(30)).await?;
    let handover = sent.elapsed();
    let status = exit_within(a, Duration::from_secs(20)).await?;
    let (a, exit) = status;
    println!(
        "leader hand-over on SIGTERM: {:.2}s (lease duration 6s); old leader exited: {:?}",
        handover.as_secs_f64(),
        exit
    );
    ensure!(
        exit.is_some_and(|s| s.success()),
        "the old leader did not exit cleanly: {exit:?}\n{}",
        a.log_tail()
    );
    ensure!(
        std::fs::read_to_string(&a.log)
            .unwrap_or_default()
            .contains("released the leader Lease"),
        "no release in the old leader's log:\n{}",
        a.log_tail()
    );
    assert!(
        handover < Duration::from_secs(2),
        "the hand-over took {handover:?}"
    );
    ensure!(b.running(), "the new leader exited:\n{}", b.log_tail());
    drop(b);
    home.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_paused_leader_writes_nothing_after_the_standby_took_over() -> Result<()> {
    let home = TestNamespace::new("lease-stop").await?;
    let dir = scratch_dir(&home.name)?;
    let kubeconfig = kubeconfig_from_env()?;
    let cluster_dir = shared_cluster_dir()?;
    let leases = home.api::<Lease>();
    let sets = home.api::<AppSet>();
    let a = replica(
        &kubeconfig,
        &home.name,
        &home.name,
        &format!("{}-a", home.name),
        &dir,
    )?;
    let a_id = format!("{}-a", home.name);
    let b_id = format!("{}-b", home.name);
    wait_holder(&leases, &a_id, Duration::from_secs(30)).await?;
    let mut b = replica(&kubeconfig, &home.name, &home.name, &b_id, &dir)?;
    sets.create(&PostParams::default(), &appset("db", 3, json!({}))?)
        .await?;
    wait_settled(&home.client, &home.name, "db", 3, Duration::from_secs(120))
        .await
        .with_context(|| a.log_tail())?;
    let before = writes_total(&cluster_dir, &a_id)?;
    ensure!(before > 0, "the audit log shows no write of the leader");

    // Pause the leader, then change the template: the old leader's watches hold the change for
    // it, so on waking it has a rollout to act on at once.
    let stopped = Instant::now();
    a.signal("STOP")?;
    roll(&sets, "db", "2").await?;
    let took_over = wait_holder(&leases, &b_id, Duration::from_secs(60)).await?;
    let takeover = stopped.elapsed();
    wait_settled(&home.client, &home.name, "db", 3, Duration::from_secs(120))
        .await
        .with_context(|| b.log_tail())?;
    a.signal("CONT")?;
    let (mut a, exit) = exit_within(a, Duration::from_secs(20)).await?;
    // Give anything the old leader might still send time to reach the audit log.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let late = writes_after(&cluster_dir, &a_id, took_over)?;
    let refused = std::fs::read_to_string(&a.log)
        .unwrap_or_default()
        .matches("does not hold the leader Lease")
        .count();
    println!(
        "SIGSTOP of the leader: the standby led after {:.1}s (lease 6s + retry 1s); the old leader's writes before: {before}, after the take-over: {}; requests its fence refused after SIGCONT: {refused}; it exited: {exit:?}",
        takeover.as_secs_f64(),
        late.len()
    );
    ensure!(
        late.is_empty(),
        "the old leader wrote after the take-over: {late:#?}"
    );
    ensure!(
        takeover <= Duration::from_secs(6 + 1 + 3),
        "the take-over took {takeover:?}"
    );
    ensure!(
        exit.is_some_and(|s| !s.success()),
        "the old leader did not stop on waking: {exit:?}\n{}",
        a.log_tail()
    );
    ensure!(!a.running());
    ensure!(b.running(), "the new leader exited:\n{}", b.log_tail());
    drop(b);
    home.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_api_server_stops_the_leader_and_one_replica_resumes() -> Result<()> {
    let cluster = tokio::task::spawn_blocking(|| OwnCluster::up("leader", 16940)).await??;
    let client: Client = cluster.client().await?;
    let ns = TestNamespace::on(client.clone(), "lease-hung", &[]).await?;
    let dir = scratch_dir(&ns.name)?;
    let leases = ns.api::<Lease>();
    let sets = ns.api::<AppSet>();
    let a = replica(&cluster.kubeconfig, &ns.name, &ns.name, "hung-a", &dir)?;
    wait_holder(&leases, "hung-a", Duration::from_secs(30)).await?;
    // The standby's /healthz is watched through the freeze: with a liveness timeout of 2 s,
    // its Lease loop (each attempt waits up to the 4 s renew deadline) shows as stalled.
    let b_port = free_port()?;
    let mut b = replica_with(
        &cluster.kubeconfig,
        &ns.name,
        &ns.name,
        "hung-b",
        &dir,
        b_port,
        &["--liveness-timeout", "2s"],
    )?;
    let healthz = move || {
        std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("http://127.0.0.1:{b_port}/healthz"))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default()
    };
    let leader_gauge = move || {
        std::process::Command::new("curl")
            .args(["-s"])
            .arg(format!("http://127.0.0.1:{b_port}/metrics"))
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .find_map(|l| l.strip_prefix("appset_leader ").map(str::to_string))
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    };
    sets.create(&PostParams::default(), &appset("db", 3, json!({}))?)
        .await?;
    wait_settled(&client, &ns.name, "db", 3, Duration::from_secs(120))
        .await
        .with_context(|| a.log_tail())?;
    let standby_gauge = leader_gauge();
    ensure!(
        standby_gauge == "0",
        "the standby's appset_leader is {standby_gauge:?}, not 0"
    );
    // Freeze the API server for longer than the lease: connections stay open, nothing answers.
    let apiserver = std::fs::read_to_string(cluster.dir.join("pids/kube-apiserver"))?
        .trim()
        .to_string();
    let signal = |sig: &str| -> Result<()> {
        let ok = std::process::Command::new("kill")
            .args([format!("-{sig}"), apiserver.clone()])
            .status()?
            .success();
        if !ok {
            bail!("kill -{sig} {apiserver} failed");
        }
        Ok(())
    };
    let frozen = Instant::now();
    signal("STOP")?;
    let (a, a_exit) = exit_within(a, Duration::from_secs(12)).await?;
    let a_stopped = frozen.elapsed();
    let mut unhealthy = false;
    while frozen.elapsed() < Duration::from_secs(8) {
        unhealthy |= healthz() == "503";
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    signal("CONT")?;
    let resumed = Instant::now();
    // Exactly one replica resumes: the standby takes the Lease (the old leader exited, as a
    // pod it would restart as a standby) and completes the rollout.
    let took_over = wait_holder(&leases, "hung-b", Duration::from_secs(60)).await?;
    let lead_after = resumed.elapsed();
    roll(&sets, "db", "2").await?;
    wait_settled(&client, &ns.name, "db", 3, Duration::from_secs(180))
        .await
        .with_context(|| b.log_tail())?;
    let settled = resumed.elapsed();
    let healthy_again = wait_for(
        "the standby healthy again",
        Duration::from_secs(30),
        || async {
            let code = healthz();
            Ok(if code == "200" { Ok(()) } else { Err(code) })
        },
    )
    .await
    .is_ok();
    let late = writes_after(&cluster.dir, "hung-a", took_over)?;
    println!(
        "kube-apiserver stopped for 8s: the leader stopped itself after {:.1}s (renew deadline 4s) with {:?}; after SIGCONT the standby led within {:.1}s and a rolling update made then settled {:.1}s after SIGCONT; old leader's writes after the take-over: {}; the standby's /healthz failed during the freeze: {unhealthy}, and passed after: {healthy_again}",
        a_stopped.as_secs_f64(),
        a_exit,
        lead_after.as_secs_f64(),
        settled.as_secs_f64(),
        late.len()
    );
    ensure!(
        a_exit.is_some_and(|s| !s.success()),
        "the leader kept running with a frozen API server:\n{}",
        a.log_tail()
    );
    ensure!(
        a_stopped < Duration::from_secs(4 + 1 + 2),
        "the leader stopped only after {a_stopped:?}"
    );
    ensure!(
        late.is_empty(),
        "the old leader wrote after the take-over: {late:#?}"
    );
    ensure!(
        unhealthy,
        "the standby's /healthz never failed while its Lease loop hung"
    );
    ensure!(healthy_again, "the standby's /healthz did not pass again");
    let leading_gauge = leader_gauge();
    ensure!(
        leading_gauge == "1",
        "the new leader's appset_leader is {leading_gauge:?}, not 1"
    );
    ensure!(b.running(), "the standby exited:\n{}", b.log_tail());
    drop(b);
    drop(cluster);
    Ok(())
}
