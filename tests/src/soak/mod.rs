//! The soak and chaos run behind `cargo xtask soak`: a two-node cluster carrying
//! thousands of long-lived echo connections for minutes, with churn (new connections,
//! config writes, short-lived pods, certificates rotating at a short TTL) and one
//! fault after another (see [`timeline`]). It samples the agents' descriptors and
//! memory, checks every long-lived connection's bytes end to end, and judges the run
//! ([`verdict`]).
pub mod procfs;
pub mod timeline;
pub mod verdict;

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::IpAddr,
    path::PathBuf,
    process::{Child, ChildStdout},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{Cluster, Pod, yaml};
use procfs::Usage;
use timeline::Event;
use verdict::{Failure, Window};

/// What to run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub minutes: u64,
    /// Long-lived connections, half across nodes and half on one node.
    pub connections: usize,
    /// Each long-lived connection sends `chunk` bytes every `every_ms` and checks the echo.
    pub every_ms: u64,
    pub chunk: usize,
    /// Workload certificate lifetime (renewed at half of it).
    pub cert_ttl: String,
    #[serde(skip)]
    pub agent_bin: PathBuf,
    #[serde(skip)]
    pub testpod_bin: PathBuf,
}

const PORT: u16 = 8080;
/// Three nodes, so that no agent holds more than a third of the connections at each
/// end: these machines cap a process at 20,000 descriptors (no CAP_SYS_RESOURCE to
/// raise it), and an agent with two ends of 10,000 connections would need more.
const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];
/// Client pods per node; each streams to its own node's Service and the next node's.
const CLIENTS: usize = 2;
/// Server pods per node, behind that node's Service.
const SERVERS: usize = 3;
/// Its agent is replaced (a hitless restart); short-lived pods come and go on it.
const RESTARTED: &str = "node-1";
/// Its agent is stopped for a while (SIGSTOP).
const FROZEN: &str = "node-2";
/// New connections: one every this often from each prober to each Service.
const PROBE_EVERY_MS: u64 = 200;
/// A new connection may wait this long (through a stopped agent) before it fails.
const PROBE_TIMEOUT_MS: u64 = 10_000;
/// The agent's longest back-off between certificate requests, plus a margin.
const CA_RETRY_MS: u64 = 31_000;
const CONFIG_EVERY: Duration = Duration::from_secs(3);
const POD_EVERY: Duration = Duration::from_secs(40);
/// How long a short-lived pod lives (it dials a Service all along).
const POD_LIFE: Duration = Duration::from_secs(15);
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// After the load: how long the agents get to close pools and settle.
const SETTLE: Duration = Duration::from_secs(90);
/// Pooled tunnel connections idle out after this (an agent flag); short, so the
/// settle after the run is short.
const TUNNEL_IDLE: &str = "10s";

fn vip(last: u8) -> IpAddr {
    IpAddr::from([10, 96, 0, last])
}

/// The Service served by the pods of node `i` (0-based): its VIP, port and node.
fn service_of(i: usize) -> (IpAddr, u16, &'static str) {
    (vip(80 + i as u8), 80, NODES[i])
}

/// `total` split into `parts` counts that differ by at most one.
fn split(total: usize, parts: usize) -> Vec<usize> {
    (0..parts)
        .map(|i| total / parts + usize::from(i < total % parts))
        .collect()
}

/// One resource sample of one node's agents (the running one and, during a
/// handover, the one draining), summed.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Sample {
    pub t_ms: u64,
    pub node: String,
    pub agents: usize,
    #[serde(flatten)]
    pub usage: Usage,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Injected {
    pub at_ms: u64,
    pub event: Event,
    pub outcome: String,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Streams {
    pub opened: usize,
    pub intact: usize,
    pub failed: usize,
    pub bytes_echoed: u64,
    pub errors_by_kind: BTreeMap<String, u64>,
    /// The first few failures, verbatim.
    pub errors: Vec<String>,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct NewConnections {
    pub attempted: u64,
    pub answered: u64,
    /// Failed while an agent they needed was stopped (SIGSTOP): expected.
    pub excused: u64,
    pub excused_by_kind: BTreeMap<String, u64>,
    pub failed: u64,
    pub errors_by_kind: BTreeMap<String, u64>,
    pub errors: Vec<Failure>,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Churn {
    pub config_writes: u64,
    pub pods_added: u64,
    pub pods_removed: u64,
    pub certificates_issued: u64,
    pub config_rejections_logged: u64,
    /// Connections the agents refused or reset, by the reason they logged.
    pub refusals_by_reason: BTreeMap<String, u64>,
}

#[derive(Debug, serde::Serialize)]
pub struct Leak {
    pub node: String,
    pub before: Usage,
    pub after: Usage,
    /// The running agent's descriptors, spare sockets apart, before and after.
    pub held_before: verdict::Held,
    pub held_after: verdict::Held,
    /// At most this many spare sockets: 8 per address family per pod of the node.
    pub spare_bound: u64,
    /// The running agent's descriptors by kind, before the load and after it.
    pub kinds_before: BTreeMap<String, u64>,
    pub kinds_after: BTreeMap<String, u64>,
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub plan: Plan,
    pub run_ms: u64,
    pub samples: Vec<Sample>,
    pub injections: Vec<Injected>,
    pub stopped_windows: Vec<Window>,
    pub streams: Streams,
    pub new_connections: NewConnections,
    pub churn: Churn,
    pub leaks: Vec<Leak>,
    pub failures: Vec<String>,
    pub passed: bool,
}

/// A `mesh-testpod streams` process and where its connections go.
struct StreamSet {
    child: Child,
    out: BufReader<ChildStdout>,
    /// `pod -> address`, for the report.
    route: String,
    /// When its connections were all open.
    opened_at: Instant,
}

/// A `mesh-testpod probe` process: new connections from `from_node` to a Service
/// served on `to_node`, started `started_ms` into the run.
struct Prober {
    child: Child,
    from_node: String,
    to_node: String,
    started_ms: u64,
    /// Its pod started while the CA was down.
    born_without_ca: bool,
}

/// The short-lived pod of the moment.
struct Ephemeral {
    pod: Pod,
    prober: Option<Prober>,
    born: Instant,
    /// Its netns was deleted under the agent (the fault), not by its removal.
    netns_deleted: bool,
}

struct Soak {
    c: Cluster,
    plan: Plan,
    t0: Instant,
    report: Report,
    probers: Vec<Prober>,
    ephemeral: Option<Ephemeral>,
    delete_next_netns: bool,
    pods_made: u64,
    config_flip: u64,
}

/// Runs the soak and judges it. An error means the run could not be carried out; a
/// run that was carried out and failed returns a report with `passed: false`.
pub fn run(plan: Plan) -> anyhow::Result<Report> {
    let run = Duration::from_secs(plan.minutes * 60);
    anyhow::ensure!(
        run >= timeline::SHORTEST_RUN,
        "a soak runs at least {} minutes (its faults would overlap)",
        timeline::SHORTEST_RUN.as_secs() / 60
    );
    anyhow::ensure!(
        plan.connections >= 2 * CLIENTS * NODES.len(),
        "--connections must be at least {}",
        2 * CLIENTS * NODES.len()
    );
    let mut c = Cluster::new(&NODES, &plan.agent_bin, &plan.testpod_bin)?;
    c.cert_ttl = plan.cert_ttl.clone();
    // The agent's own default, not the tests' short one.
    c.connect_timeout = "5s".to_owned();
    // Long-lived connections outlive a handover only for the drain deadline: give the
    // drain the whole run (on Kubernetes it is the grace period minus a margin).
    c.agent_args = vec![
        "--drain-timeout".into(),
        format!("{}s", run.as_secs() + 600),
        "--tunnel-idle-timeout".into(),
        TUNNEL_IDLE.into(),
    ];
    let mut soak = Soak {
        c,
        plan: plan.clone(),
        t0: Instant::now(),
        report: Report {
            plan,
            run_ms: run.as_millis() as u64,
            samples: Vec::new(),
            injections: Vec::new(),
            stopped_windows: Vec::new(),
            streams: Streams::default(),
            new_connections: NewConnections::default(),
            churn: Churn::default(),
            leaks: Vec::new(),
            failures: Vec::new(),
            passed: false,
        },
        probers: Vec::new(),
        ephemeral: None,
        delete_next_netns: false,
        pods_made: 0,
        config_flip: 0,
    };
    let clients = soak.setup()?;
    // Idle, before any connection: what each node's agent holds with no load.
    std::thread::sleep(Duration::from_secs(2));
    let before: Vec<(String, Usage)> = NODES
        .iter()
        .map(|n| Ok(((*n).to_owned(), soak.node_usage(n).0)))
        .collect::<anyhow::Result<_>>()?;
    let kinds_before: Vec<BTreeMap<String, u64>> = NODES
        .iter()
        .map(|n| {
            soak.c
                .agent_pid(n)
                .map(procfs::fd_kinds)
                .unwrap_or_default()
        })
        .collect();
    let held_before: Vec<verdict::Held> = NODES.iter().map(|n| soak.held(n)).collect();
    eprintln!("soak: idle agents: {before:?}");
    let sets = soak.open_streams(&clients)?;
    eprintln!(
        "soak: {} long-lived connections open; running {} min",
        soak.plan.connections, soak.plan.minutes
    );
    soak.t0 = Instant::now();
    soak.start_probers(run)?;
    soak.drive(run)?;
    soak.finish_streams(sets)?;
    soak.finish_probers()?;
    soak.settle(&before, kinds_before, held_before)?;
    soak.count_log_lines();
    let mut report = soak.report;
    for node in NODES {
        let samples: Vec<(u64, Usage)> = report
            .samples
            .iter()
            .filter(|s| s.node == node && s.t_ms <= report.run_ms)
            .map(|s| (s.t_ms, s.usage))
            .collect();
        if let Some(f) = verdict::memory_growth(node, &samples, report.run_ms) {
            report.failures.push(f);
        }
    }
    for l in &report.leaks {
        if let Some(f) = verdict::fd_leak(&l.node, l.held_before, l.held_after, l.spare_bound) {
            report.failures.push(f);
        }
    }
    if report.streams.failed > 0 || report.streams.intact != report.streams.opened {
        report.failures.push(format!(
            "{} of {} long-lived connections failed or lost bytes",
            report.streams.opened - report.streams.intact,
            report.streams.opened
        ));
    }
    if report.new_connections.failed > 0 {
        report.failures.push(format!(
            "{} new connections failed outside any stopped-agent window",
            report.new_connections.failed
        ));
    }
    report.passed = report.failures.is_empty();
    Ok(report)
}

impl Soak {
    fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    fn ca_window(&mut self) -> Option<&mut Window> {
        self.report
            .stopped_windows
            .iter_mut()
            .rfind(|w| w.node == verdict::CA)
    }

    /// Pods, Services and agents. Returns the client pods, by node.
    fn setup(&mut self) -> anyhow::Result<Vec<Vec<Pod>>> {
        let c = &mut self.c;
        let mut clients = Vec::new();
        let mut config = String::new();
        for (i, node) in NODES.iter().enumerate() {
            let mut on_node = Vec::new();
            for k in 1..=CLIENTS {
                let p = c.add_pod(node, &format!("client-{}-{k}", i + 1))?;
                config += &c.pod_yaml(&p, true);
                on_node.push(p);
            }
            clients.push(on_node);
            let mut servers = Vec::new();
            for k in 1..=SERVERS {
                let s = c.add_pod(node, &format!("server-{}-{k}", i + 1))?;
                c.start_server(&s, PORT)?;
                config += &c.pod_yaml(&s, true);
                servers.push(s.ip);
            }
            let name = format!("svc-{}", i + 1);
            let (ip, port, _) = service_of(i);
            config += &yaml::service(&name, ip, port, PORT);
            config += &yaml::endpoint_slice(&name, PORT, &servers);
            let p = c.add_pod(node, &format!("prober-{}", i + 1))?;
            config += &c.pod_yaml(&p, true);
        }
        config += &yaml::peer_authentication("STRICT");
        c.write_config("cluster.yaml", &config)?;
        for node in NODES {
            c.start_agent(node)?;
        }
        Ok(clients)
    }

    /// The node's agents' usage, summed, and how many there are.
    fn node_usage(&mut self, node: &str) -> (Usage, usize) {
        let pids = [self.c.agent_pid(node), self.c.previous_agent_pid(node)];
        pids.iter()
            .flatten()
            .filter_map(|p| procfs::usage(*p))
            .fold((Usage::default(), 0), |(sum, n), u| (sum + u, n + 1))
    }

    fn sample(&mut self) {
        let t_ms = self.now_ms();
        for node in NODES {
            let (usage, agents) = self.node_usage(node);
            self.report.samples.push(Sample {
                t_ms,
                node: node.to_owned(),
                agents,
                usage,
            });
        }
    }

    /// Each client pod streams to its own node's Service and to the next node's, so
    /// half of the connections stay on a node and half cross to another; waits until
    /// all are open.
    fn open_streams(&mut self, clients: &[Vec<Pod>]) -> anyhow::Result<Vec<StreamSet>> {
        let every = self.plan.every_ms.to_string();
        let chunk = self.plan.chunk.to_string();
        let mut counts = split(self.plan.connections, NODES.len() * CLIENTS * 2).into_iter();
        let mut sets = Vec::new();
        for (i, pods) in clients.iter().enumerate() {
            for pod in pods {
                for target in [i, (i + 1) % NODES.len()] {
                    let (ip, port, _) = service_of(target);
                    let addr = std::net::SocketAddr::new(ip, port).to_string();
                    let count = counts.next().unwrap_or(0).to_string();
                    let mut child = self.c.spawn(
                        pod,
                        &[
                            "streams",
                            "--addr",
                            &addr,
                            "--count",
                            &count,
                            "--chunk",
                            &chunk,
                            "--every-ms",
                            &every,
                        ],
                    )?;
                    let mut out = BufReader::new(child.stdout.take().context("streams stdout")?);
                    // One set at a time, as clients ramp up: each connection's
                    // upstream is set up by the agent after the client's connect
                    // returns, and 10,000 at once on two cores would be a test of
                    // the connect timeout, not of the soak.
                    let mut line = String::new();
                    out.read_line(&mut line)?;
                    let v: serde_json::Value = serde_json::from_str(line.trim())
                        .with_context(|| format!("streams did not open: {line:?}"))?;
                    self.report.streams.opened += v["ready"].as_u64().unwrap_or(0) as usize;
                    sets.push(StreamSet {
                        child,
                        out,
                        route: format!("{} -> {addr} ({})", pod.name, NODES[target]),
                        opened_at: Instant::now(),
                    });
                }
            }
        }
        anyhow::ensure!(
            self.report.streams.opened == self.plan.connections,
            "only {} of {} long-lived connections opened",
            self.report.streams.opened,
            self.plan.connections
        );
        Ok(sets)
    }

    fn spawn_prober(
        &mut self,
        pod: &Pod,
        service: (IpAddr, u16, &str),
        secs: u64,
    ) -> anyhow::Result<Prober> {
        let addr = std::net::SocketAddr::new(service.0, service.1).to_string();
        let child = self.c.spawn(
            pod,
            &[
                "probe",
                "--addr",
                &addr,
                "--secs",
                &secs.to_string(),
                "--every-ms",
                &PROBE_EVERY_MS.to_string(),
                "--timeout-ms",
                &PROBE_TIMEOUT_MS.to_string(),
            ],
        )?;
        Ok(Prober {
            child,
            from_node: pod.node.clone(),
            to_node: service.2.to_owned(),
            started_ms: self.now_ms(),
            born_without_ca: false,
        })
    }

    /// New connections all along: from a pod on each node to its own node's Service
    /// and the next node's.
    fn start_probers(&mut self, run: Duration) -> anyhow::Result<()> {
        for i in 0..NODES.len() {
            let pod = self.c.pod(&format!("prober-{}", i + 1));
            for target in [i, (i + 1) % NODES.len()] {
                let p = self.spawn_prober(&pod, service_of(target), run.as_secs())?;
                self.probers.push(p);
            }
        }
        Ok(())
    }

    /// The run: faults on schedule, churn and samples in between.
    fn drive(&mut self, run: Duration) -> anyhow::Result<()> {
        let mut events = timeline::schedule(run).into_iter().peekable();
        let (mut next_sample, mut next_config, mut next_pod) =
            (Duration::ZERO, CONFIG_EVERY, Duration::from_secs(5));
        while self.t0.elapsed() < run {
            let now = self.t0.elapsed();
            if now >= next_sample {
                self.sample();
                next_sample += SAMPLE_EVERY;
            }
            while let Some((_, e)) = events.next_if(|(at, _)| *at <= now) {
                let at_ms = self.now_ms();
                eprintln!("soak: {:>6.1}s {e:?}", at_ms as f64 / 1000.0);
                let outcome = match self.inject(e) {
                    Ok(o) => o,
                    Err(err) => {
                        let msg = format!("{e:?} could not be carried out: {err:#}");
                        self.report.failures.push(msg.clone());
                        msg
                    }
                };
                self.report.injections.push(Injected {
                    at_ms,
                    event: e,
                    outcome,
                });
            }
            if now >= next_config {
                self.flip_config()?;
                next_config += CONFIG_EVERY;
            }
            self.tend_ephemeral(false)?;
            if now >= next_pod && self.ephemeral.is_none() && now + POD_LIFE < run {
                self.add_ephemeral()?;
                next_pod = now + POD_EVERY;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.sample();
        // A short-lived pod still alive at the end is removed as usual.
        self.tend_ephemeral(true)?;
        Ok(())
    }

    fn inject(&mut self, e: Event) -> anyhow::Result<String> {
        Ok(match e {
            Event::RestartClientNodeAgent => {
                let started = Instant::now();
                self.c.upgrade_agent(RESTARTED, Duration::from_secs(60))?;
                format!(
                    "a new agent took over in {} ms; the old one drains",
                    started.elapsed().as_millis()
                )
            }
            Event::CaDown => {
                self.c.stop_ca()?;
                self.report.stopped_windows.push(Window {
                    node: verdict::CA.to_owned(),
                    from_ms: self.now_ms(),
                    to_ms: u64::MAX,
                });
                "CA stopped".into()
            }
            Event::CaUp => {
                self.c.start_ca()?;
                // A request that failed during the outage is retried after at most
                // the agent's longest back-off (30 s).
                let to_ms = self.now_ms() + CA_RETRY_MS;
                if let Some(w) = self.ca_window() {
                    w.to_ms = to_ms;
                }
                "CA serving again".into()
            }
            Event::FreezePeerAgent => {
                let pid = self.c.agent_pid(FROZEN).context("no agent")?;
                kill(Pid::from_raw(pid as i32), Signal::SIGSTOP)?;
                // Open until the thaw. A connection that began a moment before (a
                // probe takes milliseconds) may be caught by it too.
                self.report.stopped_windows.push(Window {
                    node: FROZEN.to_owned(),
                    from_ms: self.now_ms().saturating_sub(1_000),
                    to_ms: u64::MAX,
                });
                format!("SIGSTOP to pid {pid}")
            }
            Event::ThawPeerAgent => {
                let pid = self.c.agent_pid(FROZEN).context("no agent")?;
                kill(Pid::from_raw(pid as i32), Signal::SIGCONT)?;
                // A connection that began while it was stopped may still fail as it
                // times out after the thaw.
                let to_ms = self.now_ms() + PROBE_TIMEOUT_MS;
                if let Some(w) = self
                    .report
                    .stopped_windows
                    .iter_mut()
                    .rfind(|w| w.node == FROZEN)
                {
                    w.to_ms = to_ms;
                }
                format!("SIGCONT to pid {pid}")
            }
            Event::DeleteNetns => {
                self.delete_next_netns = true;
                if self.ephemeral.as_ref().is_some_and(|e| e.prober.is_some()) {
                    self.delete_ephemeral_netns()?
                } else {
                    "the next short-lived pod's netns will be deleted under the agent".into()
                }
            }
            Event::BreakConfig => {
                self.c.write_config(
                    "zz-broken.yaml",
                    "apiVersion: v1\nkind: Service\nmetadata: {name: broken, namespace: default}\n\
                     spec:\n  clusterIP: 10.96.0.99\n  ports:\n  - {port: 99999}\n",
                )?;
                std::thread::sleep(Duration::from_secs(2));
                let ready = NODES.map(|n| self.c.readiness(n).map(|(code, _)| code).unwrap_or(0));
                anyhow::ensure!(
                    ready.iter().all(|c| *c == 200),
                    "an agent stopped being ready over a broken file: {ready:?}"
                );
                "a broken file in the config directory; every agent still ready".into()
            }
            Event::FixConfig => {
                self.c.remove_config("zz-broken.yaml")?;
                "the broken file removed".into()
            }
        })
    }

    /// Adds or removes a Service (one of eight, in turn): a config change every few
    /// seconds that every agent applies.
    fn flip_config(&mut self) -> anyhow::Result<()> {
        let k = self.config_flip % 8;
        // Eight writes adding one Service each, then eight removing one each.
        let adding = (self.config_flip / 8).is_multiple_of(2);
        self.config_flip += 1;
        let mut config = String::new();
        for i in 0..8u64 {
            if (adding && i <= k) || (!adding && i > k) {
                let name = format!("churn-{i}");
                config += &yaml::service(&name, vip(100 + i as u8), 80, PORT);
                config += &yaml::endpoint_slice(&name, PORT, &[self.c.pod_ip("server-2-1")]);
            }
        }
        self.c.write_config("churn.yaml", &config)?;
        self.report.churn.config_writes += 1;
        Ok(())
    }

    /// A new pod on the restarted node, enrolled, dialling the next node's Service
    /// for its life.
    fn add_ephemeral(&mut self) -> anyhow::Result<()> {
        self.pods_made += 1;
        let name = format!("short-{}", self.pods_made);
        let pod = self.c.add_pod(RESTARTED, &name)?;
        self.c
            .write_config("short.yaml", &self.c.pod_yaml(&pod, true))?;
        // Its connections are captured only once the agent has enrolled it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.enrolled(&name) {
            anyhow::ensure!(Instant::now() < deadline, "{name} not enrolled in 10 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        let secs = POD_LIFE.as_secs() - 3;
        let mut prober = self.spawn_prober(&pod, service_of(1), secs)?;
        prober.born_without_ca = self.ca_window().is_some_and(|w| w.to_ms == u64::MAX);
        self.report.churn.pods_added += 1;
        self.ephemeral = Some(Ephemeral {
            pod,
            prober: Some(prober),
            born: Instant::now(),
            netns_deleted: false,
        });
        if std::mem::take(&mut self.delete_next_netns) {
            std::thread::sleep(Duration::from_secs(3));
            let outcome = self.delete_ephemeral_netns()?;
            eprintln!("soak: {outcome}");
        }
        Ok(())
    }

    /// The restarted node's agent logged the pod's enrollment.
    fn enrolled(&self, pod: &str) -> bool {
        let field = format!("pod=default/{pod} ");
        self.c
            .agent_log(RESTARTED)
            .lines()
            .any(|l| l.contains("pod enrolled") && l.contains(&field))
    }

    /// The fault: the short-lived pod's processes die and its netns is deleted while
    /// the config still lists the pod (a runtime that tore the sandbox down before
    /// the API caught up).
    fn delete_ephemeral_netns(&mut self) -> anyhow::Result<String> {
        self.delete_next_netns = false;
        let e = self.ephemeral.as_mut().context("no short-lived pod")?;
        if let Some(mut p) = e.prober.take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        e.netns_deleted = true;
        let name = e.pod.name.clone();
        self.c.remove_pod(&name)?;
        Ok(format!(
            "{name}'s netns deleted while the config still lists it"
        ))
    }

    /// Ends the short-lived pod once it has lived its life: its connections must all
    /// have been answered; then it leaves the config and the node.
    fn tend_ephemeral(&mut self, now: bool) -> anyhow::Result<()> {
        if !self
            .ephemeral
            .as_ref()
            .is_some_and(|e| now || e.born.elapsed() >= POD_LIFE)
        {
            return Ok(());
        }
        let Some(e) = self.ephemeral.take() else {
            return Ok(());
        };
        if let Some(p) = e.prober {
            self.collect(p)?;
        }
        self.c.remove_config("short.yaml")?;
        if !e.netns_deleted {
            self.c.remove_pod(&e.pod.name)?;
        } else {
            // The agent kept serving everyone else while it held a dead pod.
            let ready = self.c.readiness(RESTARTED).map(|(c, _)| c).unwrap_or(0);
            if ready != 200 {
                self.report
                    .failures
                    .push(format!("readiness {ready} after a pod's netns was deleted"));
            }
        }
        self.report.churn.pods_removed += 1;
        Ok(())
    }

    /// Reads a prober's result into the new-connection counts.
    fn collect(&mut self, p: Prober) -> anyhow::Result<()> {
        let out = p.child.wait_with_output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "a prober printed no result: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        let nc = &mut self.report.new_connections;
        nc.attempted += v["sent"].as_u64().unwrap_or(0);
        nc.answered += v["answered"].as_u64().unwrap_or(0);
        let failures = v["failures"].as_array().cloned().unwrap_or_default();
        let unaccounted = v["sent"]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(v["answered"].as_u64().unwrap_or(0))
            .saturating_sub(failures.len() as u64);
        for f in failures {
            let failure = Failure {
                at_ms: p.started_ms + f["at_ms"].as_u64().unwrap_or(0),
                from_node: p.from_node.clone(),
                to_node: p.to_node.clone(),
                error: f["error"].as_str().unwrap_or("").to_owned(),
                pod_born_without_ca: p.born_without_ca,
            };
            let kind = verdict::kind(&failure.error).to_owned();
            if verdict::excused(&failure, &self.report.stopped_windows) {
                nc.excused += 1;
                *nc.excused_by_kind.entry(kind).or_insert(0) += 1;
            } else {
                nc.failed += 1;
                *nc.errors_by_kind.entry(kind).or_insert(0) += 1;
                if nc.errors.len() < 20 {
                    nc.errors.push(failure);
                }
            }
        }
        // Beyond the prober's bounded list: counted, never excused.
        nc.failed += unaccounted;
        Ok(())
    }

    /// Tells every stream set to stop, then reads what each connection sent and got.
    fn finish_streams(&mut self, mut sets: Vec<StreamSet>) -> anyhow::Result<()> {
        for set in &mut sets {
            if let Some(stdin) = set.child.stdin.as_mut() {
                stdin.write_all(b"stop\n")?;
            }
        }
        for mut set in sets {
            let mut line = String::new();
            set.out.read_line(&mut line)?;
            let _ = set.child.wait();
            let v: serde_json::Value = serde_json::from_str(line.trim())
                .with_context(|| format!("streams printed no result: {line:?}"))?;
            // Their clock starts when all were open; the run's at t0.
            let offset = set.opened_at.saturating_duration_since(self.t0).as_millis() as i64
                - self.t0.saturating_duration_since(set.opened_at).as_millis() as i64;
            let s = &mut self.report.streams;
            for r in v["streams"].as_array().cloned().unwrap_or_default() {
                let bytes = r["bytes"].as_u64().unwrap_or(0);
                s.bytes_echoed += bytes;
                match r["error"].as_str() {
                    Some(e) => {
                        s.failed += 1;
                        *s.errors_by_kind
                            .entry(verdict::kind(e).to_owned())
                            .or_insert(0) += 1;
                        if s.errors.len() < 20 {
                            let at = offset + r["failed_at_ms"].as_i64().unwrap_or(0);
                            s.errors.push(format!(
                                "{}: {e} (at {:.1} s)",
                                set.route,
                                at as f64 / 1000.0
                            ));
                        }
                    }
                    None if bytes > 0 && r["sent_sha"] == r["got_sha"] => s.intact += 1,
                    None => {
                        s.failed += 1;
                        *s.errors_by_kind.entry("nothing echoed".into()).or_insert(0) += 1;
                    }
                }
            }
        }
        Ok(())
    }

    fn finish_probers(&mut self) -> anyhow::Result<()> {
        for p in std::mem::take(&mut self.probers) {
            self.collect(p)?;
        }
        Ok(())
    }

    /// With the load gone: the drained agent exits, pools idle out, and each node's
    /// agent should be back to what it held before the load.
    /// The running agent's descriptors of `node`, spare sockets apart.
    fn held(&self, node: &str) -> verdict::Held {
        let pid = self.c.agent_pid(node);
        verdict::Held {
            fds: pid.and_then(procfs::usage).map_or(0, |u| u.fds),
            spare_sockets: pid.map_or(0, procfs::spare_sockets),
        }
    }

    fn settle(
        &mut self,
        before: &[(String, Usage)],
        kinds_before: Vec<BTreeMap<String, u64>>,
        held_before: Vec<verdict::Held>,
    ) -> anyhow::Result<()> {
        match self
            .c
            .wait_previous_agent(RESTARTED, Duration::from_secs(60))
        {
            Ok(status) if status.success() => {}
            Ok(status) => self
                .report
                .failures
                .push(format!("the drained agent exited with {status}")),
            Err(e) => self.report.failures.push(format!("{e:#}")),
        }
        let deadline = Instant::now() + SETTLE;
        loop {
            self.sample();
            let settled = before.iter().zip(&held_before).all(|((node, _), b)| {
                let a = self.held(node);
                a.fds.saturating_sub(a.spare_sockets) <= b.fds.saturating_sub(b.spare_sockets)
            });
            if settled || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        // For a person looking into a leak: the cluster stays up this long.
        if let Some(secs) = std::env::var("MESH_SOAK_PAUSE")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            eprintln!("soak: paused {secs} s before teardown (MESH_SOAK_PAUSE)");
            std::thread::sleep(Duration::from_secs(secs));
        }
        for (((node, b), kinds_before), held_before) in
            before.iter().zip(kinds_before).zip(held_before)
        {
            let after = self.node_usage(node).0;
            let held_after = self.held(node);
            let pods = self.c.pods_on(node) as u64;
            let kinds_after = self
                .c
                .agent_pid(node)
                .map(procfs::fd_kinds)
                .unwrap_or_default();
            self.report.leaks.push(Leak {
                node: node.clone(),
                before: *b,
                after,
                held_before,
                held_after,
                spare_bound: pods * 2 * 8,
                kinds_before,
                kinds_after,
            });
        }
        Ok(())
    }

    /// Certificates issued and config files refused, from the agents' logs.
    fn count_log_lines(&mut self) {
        let mut logs = String::new();
        for node in NODES {
            logs += &self.c.agent_log(node);
            logs += &self.c.previous_agent_log(node);
        }
        self.report.churn.certificates_issued = logs.matches("certificate issued").count() as u64;
        for line in logs.lines().filter(|l| l.contains("refused")) {
            if let Some(reason) = line
                .split_once("reason=\"")
                .and_then(|(_, r)| r.split_once('"'))
                .map(|(r, _)| r.to_owned())
            {
                *self
                    .report
                    .churn
                    .refusals_by_reason
                    .entry(reason)
                    .or_insert(0) += 1;
            }
        }
        self.report.churn.config_rejections_logged = logs
            .lines()
            .filter(|l| l.contains("zz-broken.yaml"))
            .count() as u64;
    }
}
