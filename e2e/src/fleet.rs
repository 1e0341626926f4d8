//! Several webhook replicas behind one address, as a Service gives them in a cluster, and a
//! steady stream of pod creations to measure what a rollout or a CA rotation costs.
//!
//! * [`Balancer`]: a TCP load balancer on `127.0.0.1:<free port>` that hands each new connection
//!   to the next ready replica, round robin, as kube-proxy does for a Service's ready endpoints.
//!   Readiness is the replica's `/readyz`, checked every [`HEALTH_PERIOD`] (a kubelet probe and
//!   the endpoints update, compressed); a replica that fails it gets no new connections, while
//!   connections it already holds stay with it. There is no retry: a connection the balancer
//!   cannot place is closed, and the API server sees the failure.
//! * [`Fleet`]: `n` in-process replicas of the webhook sharing one certificate Secret and one
//!   MutatingWebhookConfiguration (its `url` is the balancer), and [`Fleet::restart`], which
//!   stops one replica as SIGTERM does (drain included) and starts it again on the same port.
//! * [`PodStream`]: creates pods at a fixed rate, each creation in its own task, and reports how
//!   many were admitted, which failed and why.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use appset_webhook::probe::Probe;
use appset_webhook::tls::manager::TlsConfig;
use appset_webhook::tls::material::Policy;
use hyper::{Method, StatusCode};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::runners::{READY_DEADLINE, WEBHOOK_CERT_SECRET};
use crate::{TestNamespace, wait_for};

/// How often the balancer checks each replica's `/readyz`.
pub const HEALTH_PERIOD: Duration = Duration::from_millis(250);

struct Backend {
    addr: SocketAddr,
    ready: AtomicBool,
    connections: AtomicU64,
}

/// A round-robin TCP balancer over the replicas that answer `/readyz` with 200.
pub struct Balancer {
    addr: SocketAddr,
    backends: Arc<Vec<Backend>>,
    unplaced: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Balancer {
    /// Starts the balancer over `backends`; `/readyz` is checked over TLS trusting the bundle
    /// that the configuration `config` (in `configs`) holds at the time of the check.
    async fn start(
        backends: Vec<SocketAddr>,
        configs: Api<MutatingWebhookConfiguration>,
        config: String,
    ) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let backends: Arc<Vec<Backend>> = Arc::new(
            backends
                .into_iter()
                .map(|addr| Backend {
                    addr,
                    ready: AtomicBool::new(false),
                    connections: AtomicU64::new(0),
                })
                .collect(),
        );
        let unplaced = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicUsize::new(0));
        let (b, u) = (backends.clone(), unplaced.clone());
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let n = b.len();
                let start = next.fetch_add(1, Ordering::Relaxed);
                let Some(backend) = (0..n)
                    .map(|k| (start + k) % n)
                    .find(|&i| b[i].ready.load(Ordering::Acquire))
                else {
                    u.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let (b, u) = (b.clone(), u.clone());
                tokio::spawn(async move {
                    let target = &b[backend];
                    match TcpStream::connect(target.addr).await {
                        Ok(mut outbound) => {
                            target.connections.fetch_add(1, Ordering::Relaxed);
                            let mut inbound = inbound;
                            let _ = inbound.set_nodelay(true);
                            let _ = outbound.set_nodelay(true);
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                        Err(_) => {
                            u.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        let b = backends.clone();
        let health = tokio::spawn(async move {
            loop {
                let bundle = match configs.get(&config).await {
                    Ok(c) => c
                        .webhooks
                        .into_iter()
                        .flatten()
                        .find_map(|w| w.client_config.ca_bundle)
                        .map(|b| String::from_utf8_lossy(&b.0).into_owned()),
                    Err(_) => None,
                };
                for backend in b.iter() {
                    let ready = match &bundle {
                        Some(bundle) => ready(backend.addr, bundle).await,
                        None => false,
                    };
                    backend.ready.store(ready, Ordering::Release);
                }
                tokio::time::sleep(HEALTH_PERIOD).await;
            }
        });
        Ok(Self {
            addr,
            backends,
            unplaced,
            tasks: vec![accept, health],
        })
    }

    /// Whether the balancer currently sends new connections to replica `i`.
    pub fn is_ready(&self, i: usize) -> bool {
        self.backends[i].ready.load(Ordering::Acquire)
    }

    /// Connections handed to replica `i` so far.
    pub fn connections(&self, i: usize) -> u64 {
        self.backends[i].connections.load(Ordering::Relaxed)
    }

    /// Connections that found no ready replica, or whose replica refused them.
    pub fn unplaced(&self) -> u64 {
        self.unplaced.load(Ordering::Relaxed)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn ready(addr: SocketAddr, bundle: &str) -> bool {
    let check = async {
        let mut conn = Probe::new(addr, "127.0.0.1", bundle)
            .ok()?
            .connect()
            .await
            .ok()?;
        let (status, _) = conn
            .send(Method::GET, "/readyz", Default::default())
            .await
            .ok()?;
        Some(status == StatusCode::OK)
    };
    tokio::time::timeout(Duration::from_secs(1), check)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

struct Replica {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), appset_webhook::Error>>,
}

/// `n` webhook replicas behind a [`Balancer`], sharing one certificate Secret and one
/// MutatingWebhookConfiguration that selects only the test namespace.
pub struct Fleet {
    client: Client,
    namespace: String,
    configs: Api<MutatingWebhookConfiguration>,
    /// The configuration's name.
    pub name: String,
    /// The balancer in front of the replicas.
    pub balancer: Balancer,
    addrs: Vec<SocketAddr>,
    replicas: Vec<Option<Replica>>,
    policy: Policy,
    check_interval: Duration,
    drain: Duration,
}

impl Fleet {
    /// Creates the configuration and starts `n` replicas with the given certificate policy and
    /// drain period; returns once the balancer sees every replica ready.
    pub async fn start(
        ns: &TestNamespace,
        n: usize,
        policy: Policy,
        check_interval: Duration,
        drain: Duration,
    ) -> Result<Self> {
        let mut listeners = Vec::new();
        for _ in 0..n {
            listeners.push(TcpListener::bind("127.0.0.1:0").await?);
        }
        let addrs = listeners
            .iter()
            .map(TcpListener::local_addr)
            .collect::<std::io::Result<Vec<_>>>()?;
        let name = format!("appset-webhook-{}", ns.name);
        let configs: Api<MutatingWebhookConfiguration> = Api::all(ns.client.clone());
        // The balancer's port is known only once it listens; the configuration needs it.
        let balancer = Balancer::start(addrs.clone(), configs.clone(), name.clone()).await?;
        let mwc =
            crate::runners::webhook_configuration(&name, &ns.name, balancer.addr.port(), false)?;
        configs
            .create(&PostParams::default(), &mwc)
            .await
            .context("create the MutatingWebhookConfiguration")?;
        let mut fleet = Self {
            client: ns.client.clone(),
            namespace: ns.name.clone(),
            configs,
            name,
            balancer,
            addrs,
            replicas: Vec::new(),
            policy,
            check_interval,
            drain,
        };
        for listener in listeners {
            let replica = fleet.spawn(listener);
            fleet.replicas.push(Some(replica));
        }
        for i in 0..n {
            fleet.wait_ready(i).await?;
        }
        Ok(fleet)
    }

    fn spawn(&self, listener: TcpListener) -> Replica {
        let config = appset_webhook::Config {
            listen: listener
                .local_addr()
                .unwrap_or_else(|_| ([127, 0, 0, 1], 0).into()),
            tls: TlsConfig {
                secret_namespace: self.namespace.clone(),
                secret_name: WEBHOOK_CERT_SECRET.into(),
                webhook_configuration: Some(self.name.clone()),
                policy: self.policy.clone(),
                check_interval: self.check_interval,
            },
            watch_namespace: Some(self.namespace.clone()),
            namespace_cache: true,
            client_ca_file: None,
            limits: appset_webhook::server::Limits {
                drain: self.drain,
                ..Default::default()
            },
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(appset_webhook::serve_on(
            listener,
            config,
            self.client.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        Replica { stop, task }
    }

    /// Waits until the balancer sends new connections to replica `i`.
    pub async fn wait_ready(&self, i: usize) -> Result<()> {
        wait_for(
            &format!("replica {i} to be ready behind the balancer"),
            READY_DEADLINE,
            || async {
                Ok(if self.balancer.is_ready(i) {
                    Ok(())
                } else {
                    Err("not ready".to_string())
                })
            },
        )
        .await
    }

    /// Stops replica `i` as SIGTERM does (readiness fails, it serves on for the drain period,
    /// then closes), waits for it to end, and starts it again on the same port; returns once the
    /// balancer sees it ready again.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        let replica = self.replicas[i]
            .take()
            .with_context(|| format!("replica {i} is not running"))?;
        let _ = replica.stop.send(());
        tokio::time::timeout(self.drain + Duration::from_secs(20), replica.task)
            .await
            .with_context(|| format!("replica {i} did not stop"))?
            .with_context(|| format!("replica {i} panicked"))?
            .with_context(|| format!("replica {i} failed"))?;
        let listener = TcpListener::bind(self.addrs[i])
            .await
            .with_context(|| format!("bind {} again", self.addrs[i]))?;
        let replica = self.spawn(listener);
        self.replicas[i] = Some(replica);
        self.wait_ready(i).await
    }

    /// Replica `i`'s `/metrics` text.
    pub async fn metrics(&self, i: usize) -> Result<String> {
        let cfg = self.configs.get(&self.name).await?;
        let bundle = cfg
            .webhooks
            .into_iter()
            .flatten()
            .find_map(|w| w.client_config.ca_bundle)
            .context("no caBundle")?;
        let probe = Probe::new(
            self.addrs[i],
            "127.0.0.1",
            &String::from_utf8_lossy(&bundle.0),
        )?;
        crate::runners::metrics_of(&probe)
            .await
            .with_context(|| format!("replica {i}"))
    }

    /// Stops every replica and deletes the configuration.
    pub async fn stop(mut self) -> Result<()> {
        if let Err(e) = self
            .configs
            .delete(&self.name, &DeleteParams::default())
            .await
        {
            eprintln!("cannot delete {}: {e}", self.name);
        }
        for (i, replica) in self.replicas.iter_mut().enumerate() {
            if let Some(r) = replica.take() {
                let _ = r.stop.send(());
                tokio::time::timeout(self.drain + Duration::from_secs(20), r.task)
                    .await
                    .with_context(|| format!("replica {i} did not stop"))???;
            }
        }
        Ok(())
    }
}

/// What a [`PodStream`] saw.
#[derive(Debug, Default)]
pub struct StreamReport {
    /// Pods the API server admitted and that passed the check.
    pub admitted: usize,
    /// Creations that failed, or admitted pods that failed the check: pod name and reason.
    pub failed: Vec<(String, String)>,
    /// How long the stream ran.
    pub elapsed: Duration,
}

impl StreamReport {
    /// Attempts made.
    pub fn attempts(&self) -> usize {
        self.admitted + self.failed.len()
    }
}

/// Creates pods at a fixed rate until stopped.
pub struct PodStream {
    stop: oneshot::Sender<()>,
    task: JoinHandle<StreamReport>,
}

/// Checks one admitted pod; `Err` names what is wrong with it.
pub type PodCheck = fn(&Pod) -> std::result::Result<(), String>;

impl PodStream {
    /// Starts creating `pod(i)` in `pods` every `every`, each creation in its own task; each
    /// admitted pod goes through `check`.
    pub fn start(
        pods: Api<Pod>,
        every: Duration,
        pod: impl Fn(usize) -> Pod + Send + 'static,
        check: PodCheck,
    ) -> Self {
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let report = Arc::new(Mutex::new(StreamReport::default()));
            let start = Instant::now();
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut creations = tokio::task::JoinSet::new();
            for i in 0.. {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tick.tick() => {}
                }
                let p = pod(i);
                let name = p.metadata.name.clone().unwrap_or_default();
                let (pods, report) = (pods.clone(), report.clone());
                creations.spawn(async move {
                    let outcome = match pods.create(&PostParams::default(), &p).await {
                        Ok(created) => check(&created),
                        Err(e) => Err(e.to_string()),
                    };
                    if let Ok(mut r) = report.lock() {
                        match outcome {
                            Ok(()) => r.admitted += 1,
                            Err(why) => r.failed.push((name, why)),
                        }
                    }
                });
                while creations.try_join_next().is_some() {}
            }
            while creations.join_next().await.is_some() {}
            let mut out = report
                .lock()
                .map(|mut r| std::mem::take(&mut *r))
                .unwrap_or_default();
            out.elapsed = start.elapsed();
            out
        });
        Self { stop, task }
    }

    /// Stops creating, waits for the creations in flight, and reports.
    pub async fn stop(self) -> Result<StreamReport> {
        let _ = self.stop.send(());
        self.task.await.context("the pod stream panicked")
    }
}
