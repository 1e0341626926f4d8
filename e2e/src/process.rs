//! Running the real binaries and tools from e2e tests: `helm` and `kubectl` (from the pinned
//! control plane build on `PATH`), the `appset-operator` and `appset-webhook` binaries as child
//! processes (killed when their guard drops), and kubeconfigs for ServiceAccount tokens minted
//! through the TokenRequest API, so that a process has exactly the RBAC of its account.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

/// Output of a finished command: success and the combined stdout and stderr.
pub struct Output {
    /// Whether the command exited with status 0.
    pub ok: bool,
    /// stdout followed by stderr.
    pub text: String,
}

/// Runs a command to completion.
pub fn run(program: &str, args: &[&str]) -> Result<Output> {
    let out = Command::new(program).args(args).output().with_context(|| {
        format!("cannot run {program} (is the control plane's bin directory on PATH?)")
    })?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(Output {
        ok: out.status.success(),
        text,
    })
}

/// Runs a command and fails with its output unless it succeeds.
pub fn run_ok(program: &str, args: &[&str]) -> Result<String> {
    let out = run(program, args)?;
    if !out.ok {
        bail!("{program} {} failed:\n{}", args.join(" "), out.text);
    }
    Ok(out.text)
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS:`, `VmHWM:`), when the process exists.
pub fn memory_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// The CPU time (user + system) the process `pid` has used so far, in seconds, when it exists
/// (`/proc/<pid>/stat`, in clock ticks of 1/100 s).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it start past its `)`.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, so 11 and 12 after `)`.
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    Some((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

/// The one-minute load average (`/proc/loadavg`), or "unknown".
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// The load averages over 1, 5 and 15 minutes (`/proc/loadavg`), or "unknown".
pub fn load_averages() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Appends `rows` (Markdown table rows) to the file `$BENCH_TABLE` names, when it is set: how
/// each benchmark binary hands its figures to `e2e/bench.sh`, which prints them as one table.
pub fn append_bench_rows(rows: &[String]) -> Result<()> {
    use std::io::Write;
    let Ok(path) = std::env::var("BENCH_TABLE") else {
        return Ok(());
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("open {path}"))?;
    for row in rows {
        writeln!(file, "{row}")?;
    }
    Ok(())
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The path of a workspace binary: `$APPSET_<NAME>_BIN` (set by `e2e/run.sh`), else
/// `target/debug/<name>`.
pub fn binary(name: &str) -> Result<PathBuf> {
    let var = format!(
        "APPSET_{}_BIN",
        name.trim_start_matches("appset-").to_uppercase()
    );
    let path = std::env::var_os(&var)
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join("target/debug").join(name));
    if !path.exists() {
        bail!(
            "{} not found; build it with `cargo build -p {name}` or run the suite through `make e2e`",
            path.display()
        );
    }
    Ok(path)
}

/// A child process that is killed when dropped. Its output goes to a log file.
pub struct Process {
    child: Child,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

impl Process {
    /// Starts `program` with `args` and extra environment, logging to `log`.
    pub fn start(
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log: PathBuf,
    ) -> Result<Self> {
        let file =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let err = file.try_clone()?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(file).stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("start {}", program.display()))?;
        Ok(Self { child, log })
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` (`STOP`, `CONT`, `TERM`, ...) to the process.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let pid = self.child.id().to_string();
        run_ok("kill", &[&format!("-{signal}"), &pid]).map(|_| ())
    }

    /// Waits up to `timeout` for the process to exit; its exit status when it did.
    pub fn wait_exit(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let start = std::time::Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }

    /// Its process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last lines of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes a kubeconfig that authenticates as `namespace/service_account` with a token from the
/// TokenRequest API, against the cluster of the current `KUBECONFIG`, and returns its path.
pub fn service_account_kubeconfig(
    namespace: &str,
    service_account: &str,
    dir: &Path,
) -> Result<PathBuf> {
    let token = run_ok(
        "kubectl",
        &[
            "-n",
            namespace,
            "create",
            "token",
            service_account,
            "--duration",
            "1h",
        ],
    )?;
    let server = run_ok(
        "kubectl",
        &[
            "config",
            "view",
            "--raw",
            "--minify",
            "-o",
            "jsonpath={.clusters[0].cluster.server}",
        ],
    )?;
    let ca = run_ok(
        "kubectl",
        &[
            "config",
            "view",
            "--raw",
            "--minify",
            "-o",
            "jsonpath={.clusters[0].cluster.certificate-authority}",
        ],
    )?;
    let cluster = if ca.trim().is_empty() {
        let data = run_ok(
            "kubectl",
            &[
                "config",
                "view",
                "--raw",
                "--minify",
                "-o",
                "jsonpath={.clusters[0].cluster.certificate-authority-data}",
            ],
        )?;
        serde_json::json!({"server": server.trim(), "certificate-authority-data": data.trim()})
    } else {
        serde_json::json!({"server": server.trim(), "certificate-authority": ca.trim()})
    };
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": service_account, "user": {"token": token.trim()}}],
        "contexts": [{"name": "sa", "context": {"cluster": "local", "user": service_account, "namespace": namespace}}],
        "current-context": "sa"
    });
    let path = dir.join(format!("{namespace}-{service_account}.kubeconfig"));
    std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
    Ok(path)
}

/// A scratch directory for logs and kubeconfigs of one test.
pub fn scratch_dir(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("appset-e2e-{name}"));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
