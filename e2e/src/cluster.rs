//! A control plane of a test's own, for fault tests that stop or restart a shared component
//! (kube-apiserver, etcd) and so must not disturb the other tests.
//!
//! [`OwnCluster::up`] runs `e2e/cluster/up.sh` with a state directory `.cluster-<name>` and a
//! port base of its own; [`OwnCluster::restart`] stops one component with a signal, keeps it
//! down for a while, and starts it again with the command line it had (read from
//! `/proc/<pid>/cmdline`), recording the new pid where `down.sh` finds it; dropping the
//! cluster runs `e2e/cluster/down.sh`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

/// A local control plane started for one test.
pub struct OwnCluster {
    /// The state directory.
    pub dir: PathBuf,
    /// Its admin kubeconfig.
    pub kubeconfig: PathBuf,
}

impl OwnCluster {
    /// Brings up a control plane in `.cluster-<name>` on ports from `port_base`, with an etcd
    /// that fsyncs (the shared one does not, for speed, and loses its last writes when killed).
    pub fn up(name: &str, port_base: u16) -> Result<Self> {
        Self::up_with(name, port_base, &[])
    }

    /// [`Self::up`] with more environment for `up.sh` (e.g. `APPSET_SKIP_CRDS=1`).
    pub fn up_with(name: &str, port_base: u16, env: &[(&str, &str)]) -> Result<Self> {
        let root = crate::repo_root();
        let dir = root.join(format!(".cluster-{name}"));
        let out = Command::new(root.join("e2e/cluster/up.sh"))
            .envs(env.iter().copied())
            .env("APPSET_CLUSTER_DIR", &dir)
            .env("APPSET_PORT_BASE", port_base.to_string())
            // etcd is killed in these tests: it must keep what it acknowledged, as a real one.
            .env("APPSET_ETCD_DURABLE", "1")
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .output()
            .context("run e2e/cluster/up.sh")?;
        let cluster = Self {
            kubeconfig: dir.join("kubeconfig"),
            dir,
        };
        if !out.status.success() {
            bail!(
                "up.sh failed: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .rev()
                    .take(15)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        Ok(cluster)
    }

    /// An admin client of this cluster.
    pub async fn client(&self) -> Result<Client> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
    }

    /// Stops `component` (`kube-apiserver`, `etcd`, …) with `signal` (`KILL`, `TERM`), waits
    /// `down_for`, and starts it again with the same command line. Blocks for `down_for` and
    /// more.
    pub fn restart(&self, component: &str, signal: &str, down_for: Duration) -> Result<()> {
        restart(&self.dir, component, signal, down_for)
    }
}

/// The command line of each running component of the cluster in `dir` (from
/// `/proc/<pid>/cmdline`), to start one again after it died (see [`revive`]).
pub fn command_lines(dir: &Path) -> Result<BTreeMap<String, Vec<String>>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir.join("pids"))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = std::fs::read_to_string(entry.path())?.trim().to_string();
        if let Some(args) = command_line(&pid) {
            out.insert(name, args);
        }
    }
    Ok(out)
}

fn command_line(pid: &str) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    // NUL-separated and NUL-terminated; empty arguments (`--listen-metrics-urls ""`) are
    // arguments too.
    let raw = raw.strip_suffix(&[0]).unwrap_or(&raw);
    if raw.is_empty() {
        return None; // a zombie
    }
    Some(
        raw.split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

fn alive(pid: &str) -> bool {
    command_line(pid).is_some()
}

/// Starts `component` with `args` in its own session, appending to its log, and records its
/// pid where `down.sh` finds it.
fn spawn_component(dir: &Path, component: &str, args: &[String]) -> Result<()> {
    let Some((program, rest)) = args.split_first() else {
        bail!("{component} has an empty command line");
    };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("logs").join(format!("{component}.log")))?;
    let child = Command::new("setsid")
        .arg(program)
        .args(rest)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("start {component}"))?;
    std::fs::write(dir.join("pids").join(component), child.id().to_string())?;
    Ok(())
}

/// Starts again every component of `cmdlines` whose process is gone, as the kubelet restarts a
/// control plane's static pods; returns the names it started.
pub fn revive(dir: &Path, cmdlines: &BTreeMap<String, Vec<String>>) -> Result<Vec<String>> {
    let mut revived = Vec::new();
    for (name, args) in cmdlines {
        let pid = std::fs::read_to_string(dir.join("pids").join(name)).unwrap_or_default();
        if !alive(pid.trim()) {
            spawn_component(dir, name, args)?;
            revived.push(name.clone());
        }
    }
    Ok(revived)
}

/// [`OwnCluster::restart`] for the cluster in the state directory `dir` (to run on a blocking
/// thread).
pub fn restart(dir: &Path, component: &str, signal: &str, down_for: Duration) -> Result<()> {
    let pid_file = dir.join("pids").join(component);
    let pid = std::fs::read_to_string(&pid_file)
        .with_context(|| format!("read {}", pid_file.display()))?
        .trim()
        .to_string();
    let args =
        command_line(&pid).with_context(|| format!("{component} (pid {pid}) is not running"))?;
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .status()?;
    if !status.success() {
        bail!("kill -{signal} {component} ({pid}) failed");
    }
    // Wait until it is really gone (or a zombie) before the clock of its absence starts.
    for _ in 0..200 {
        if !alive(&pid) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(down_for);
    spawn_component(dir, component, &args)
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = Command::new(crate::repo_root().join("e2e/cluster/down.sh"))
            .env("APPSET_CLUSTER_DIR", &self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
