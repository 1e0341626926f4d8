//! The operator's memory with one huge AppSet: the real `appset-operator` binary, scoped to a
//! fresh namespace, is given one `Parallel` AppSet of N replicas (5,000 by default; no claim
//! templates, so that the figure is the controller's, not the volume provisioner's). It prints
//! the operator's resident memory before the AppSet exists, its peak (`VmHWM`) until the status
//! counts N pods, the time that took, and the load average before and after.
//!
//! Pods are created in slow-start batches of at most `burst` and at most 256 per reconcile, so
//! the peak should not grow with N. KWOK's two fake nodes hold 1,000 pods: the rest stay
//! Pending, which changes nothing for the controller.
//!
//! Usage: `KUBECONFIG=.cluster/kubeconfig cargo run --release -p appset-e2e --bin
//! appset-scale-bench -- [replicas]` (`e2e/bench.sh` runs it). With `BENCH_TABLE` set, the
//! figures are also appended to that file as Markdown table rows.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use appset_crds::AppSet;
use appset_e2e::TestNamespace;
use appset_e2e::fixtures::appset_with_spec;
use appset_e2e::process::{
    Process, append_bench_rows, free_port, load_averages, memory_kib, scratch_dir,
};
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use kube::api::PostParams;
use serde_json::json;

/// `GET /readyz` on the operator's admin port: whether it answers 200.
async fn ready(port: u16) -> bool {
    let Ok(stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    else {
        return false;
    };
    tokio::spawn(conn);
    let Ok(req) = hyper::Request::get("/readyz")
        .header("host", "127.0.0.1")
        .body(Empty::<Bytes>::new())
    else {
        return false;
    };
    matches!(sender.send_request(req).await, Ok(r) if r.status() == 200)
}

fn operator_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("APPSET_OPERATOR_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    let beside = exe
        .parent()
        .context("the bench binary's directory")?
        .join("appset-operator");
    if !beside.exists() {
        bail!(
            "{} not found; build it with `cargo build --release -p appset-operator`",
            beside.display()
        );
    }
    Ok(beside)
}

#[tokio::main]
async fn main() -> Result<()> {
    let replicas: i32 = match std::env::args().nth(1) {
        Some(a) => a.parse().context("replicas must be an integer")?,
        None => 5000,
    };
    let kubeconfig = std::env::var("KUBECONFIG").context("KUBECONFIG")?;
    let ns = TestNamespace::new("bench-scale").await?;
    let dir = scratch_dir(&ns.name)?;
    let port = free_port()?;
    let op = Process::start(
        &operator_binary()?,
        &[
            "--namespaces",
            &ns.name,
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--log-format",
            "text",
        ],
        &[("KUBECONFIG", &kubeconfig), ("POD_NAMESPACE", &ns.name)],
        dir.join("operator.log"),
    )?;
    let pid = op.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready(port).await {
        if Instant::now() > deadline {
            bail!("the operator is not ready: {}", op.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = memory_kib(pid, "VmRSS:").unwrap_or_default();
    let load_before = load_averages();
    let set = appset_with_spec(
        "big",
        json!({
            "replicas": replicas,
            "serviceName": "big",
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"app": "big"}},
            "template": {"metadata": {"labels": {"app": "big"}},
                         "spec": {"containers": [{"name": "main", "image": "nginx:1.27"}]}}
        }),
    )?;
    let sets = ns.api::<AppSet>();
    let start = Instant::now();
    sets.create(&PostParams::default(), &set).await?;
    let deadline = Duration::from_secs(1800);
    let mut last_print = Instant::now();
    loop {
        let seen = sets
            .get("big")
            .await?
            .status
            .map(|s| s.replicas)
            .unwrap_or(0);
        if seen >= replicas {
            break;
        }
        if start.elapsed() > deadline {
            bail!("only {seen} of {replicas} pods after {deadline:?}");
        }
        if last_print.elapsed() > Duration::from_secs(15) {
            eprintln!(
                "  {seen} of {replicas} pods after {:.0}s",
                start.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let took = start.elapsed();
    let peak = memory_kib(pid, "VmHWM:").unwrap_or_default();
    let now = memory_kib(pid, "VmRSS:").unwrap_or_default();
    println!("one AppSet of {replicas} replicas (Parallel, no claims), the operator binary:");
    println!(
        "  pods created and counted in the status  {:>8.1} s",
        took.as_secs_f64()
    );
    println!(
        "  operator RSS before the AppSet          {:>8.1} MiB",
        idle as f64 / 1024.0
    );
    println!(
        "  operator peak RSS (VmHWM)               {:>8.1} MiB",
        peak as f64 / 1024.0
    );
    println!(
        "  operator RSS at the end                 {:>8.1} MiB",
        now as f64 / 1024.0
    );
    let load_after = load_averages();
    println!("  load average (1/5/15 min) before        {load_before}");
    println!("  load average (1/5/15 min) after         {load_after}");
    let scenario = format!("one AppSet of {replicas} replicas (Parallel, no claims)");
    append_bench_rows(&[
        format!(
            "| {scenario} | pods created and counted in the status | {:.1} s | | | |",
            took.as_secs_f64()
        ),
        format!(
            "| {scenario} | operator RSS before / peak (VmHWM) / at the end | {:.1} / {:.1} / {:.1} MiB | | | |",
            idle as f64 / 1024.0,
            peak as f64 / 1024.0,
            now as f64 / 1024.0
        ),
        format!(
            "| {scenario} | load average (1/5/15 min) before / after | {load_before} / {load_after} | | | |"
        ),
    ])?;
    drop(op);
    ns.cleanup().await;
    Ok(())
}
