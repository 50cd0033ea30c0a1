//! The simulated cluster: nodes, pods, agents, and their cleanup.
use std::{
    fs,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::proc::{enter, ip_in, run};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The agent's readiness port.
pub const READINESS_PORT: u16 = mesh_common::READINESS_PORT;
pub const METRICS_PORT: u16 = mesh_common::METRICS_PORT;
/// The CA runs in the fabric namespace, reachable from every node.
pub const CA_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 254);
/// The user of the agents' service account (the CA's default `--agent-service-account`).
pub const AGENT_SERVICE_ACCOUNT_USER: &str = "system:serviceaccount:mesh-system:mesh-agent";
/// The fake Kubernetes API server's port, on [`CA_IP`].
pub const API_PORT: u16 = 6443;
pub const CA_PORT: u16 = 15012;

#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub index: u8,
    /// Name of the node's network namespace (`ip netns`).
    pub netns: String,
    pub cgroup: PathBuf,
    pub fabric_ip: Ipv4Addr,
}

#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub node: String,
    pub ip: IpAddr,
    pub netns: String,
    pub netns_path: PathBuf,
    pub cgroup: PathBuf,
}

/// Longer than the agent's log batch interval (50 ms), with room for the write.
const LOG_BATCH: Duration = Duration::from_millis(120);

pub struct Cluster {
    pub prefix: String,
    /// The config directory the agents watch.
    pub config_dir: PathBuf,
    /// Logs and scratch files.
    pub work_dir: PathBuf,
    pub agent_bin: PathBuf,
    pub testpod_bin: PathBuf,
    /// Root of this cluster's pins (one bpffs subdirectory per cluster).
    pub bpffs: PathBuf,
    cgroup_root: PathBuf,
    fabric: String,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    agents: Vec<(String, Child)>,
    /// Agents a successor took over from (`upgrade_agent`), until they exit.
    previous_agents: Vec<(String, Child)>,
    ca: Option<Child>,
    /// Stopped on purpose ([`Cluster::stop_ca`]): starting an agent leaves it down.
    ca_stopped: bool,
    /// Lifetime of workload certificates (the CA's maximum); default 24h.
    pub cert_ttl: String,
    /// Extra arguments for every agent started from now on.
    pub agent_args: Vec<String>,
    /// The agents' `--connect-timeout`: 2s, so that tests of a silent peer fail
    /// fast (the agent's default is 5s).
    pub connect_timeout: String,
    /// Agents started from now on read the Kubernetes API with this kubeconfig
    /// instead of the config directory (the CA still reads the directory).
    pub kubeconfig: Option<PathBuf>,
    /// The fake API server every config file is mirrored to
    /// ([`Cluster::use_kubernetes_api`]), and what each file put there.
    api: Option<crate::fakeapi::FakeApi>,
    api_files: std::sync::Mutex<std::collections::HashMap<String, Vec<crate::fakeapi::ObjectRef>>>,
    /// Attach the agents here instead of their node's cgroup.
    pub agent_cgroup: Option<PathBuf>,
    /// Agents started from now on write their output to a pipe that nobody reads
    /// (a stalled log collector); their log is then not available.
    pub agent_log_stalled: bool,
    /// The read ends of those pipes, kept open and never read.
    stalled_logs: Vec<std::io::PipeReader>,
    /// Workload pids, killed on drop.
    tracked: Vec<u32>,
    /// Pods added so far (names their host-side interfaces).
    pods_added: usize,
}

fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/var/run/netns").join(name)
}

/// The cgroup v2 mount, from mountinfo (as the agent finds it).
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .context("no cgroup v2 mount")
}

/// Makes sure /sys/fs/bpf is a bpffs.
fn ensure_bpffs() -> anyhow::Result<()> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        run("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"])?;
    }
    Ok(())
}

impl Cluster {
    /// Creates the fabric and the nodes. `agent_bin` and `testpod_bin` are the binaries
    /// to run as agents and workloads.
    pub fn new(nodes: &[&str], agent_bin: &Path, testpod_bin: &Path) -> anyhow::Result<Cluster> {
        let prefix = format!(
            "mt{}x{}",
            std::process::id() % 100_000,
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        Self::with_prefix(&prefix, nodes, agent_bin, testpod_bin)
    }

    /// As [`Cluster::new`], with a fixed name prefix for namespaces and cgroups (the
    /// demo's YAML names its network namespaces). Leftovers of an earlier run with the
    /// same prefix are removed first.
    pub fn with_prefix(
        prefix: &str,
        nodes: &[&str],
        agent_bin: &Path,
        testpod_bin: &Path,
    ) -> anyhow::Result<Cluster> {
        anyhow::ensure!(
            nix::unistd::geteuid().is_root(),
            "the simulated cluster needs root"
        );
        ensure_bpffs()?;
        remove_leftovers(prefix);
        let prefix = prefix.to_owned();
        let work_dir = std::env::temp_dir().join(format!("mesh-{prefix}"));
        let config_dir = work_dir.join("config");
        fs::create_dir_all(&config_dir)?;
        let cgroup_root = cgroup2_mount()?.join("mesh-tests").join(&prefix);
        fs::create_dir_all(&cgroup_root)?;
        let mut cluster = Cluster {
            fabric: format!("{prefix}-fab"),
            bpffs: PathBuf::from("/sys/fs/bpf").join(&prefix),
            prefix,
            config_dir,
            work_dir,
            agent_bin: agent_bin.to_owned(),
            testpod_bin: testpod_bin.to_owned(),
            cgroup_root,
            nodes: Vec::new(),
            pods: Vec::new(),
            agents: Vec::new(),
            previous_agents: Vec::new(),
            ca: None,
            ca_stopped: false,
            cert_ttl: "24h".to_owned(),
            agent_args: Vec::new(),
            connect_timeout: "2s".to_owned(),
            kubeconfig: None,
            api: None,
            api_files: Default::default(),
            agent_log_stalled: false,
            stalled_logs: Vec::new(),
            agent_cgroup: None,
            tracked: Vec::new(),
            pods_added: 0,
        };
        run("ip", &["netns", "add", &cluster.fabric])?;
        ip_in(&cluster.fabric, &["link", "add", "br0", "type", "bridge"])?;
        ip_in(&cluster.fabric, &["link", "set", "br0", "up"])?;
        ip_in(&cluster.fabric, &["link", "set", "lo", "up"])?;
        ip_in(
            &cluster.fabric,
            &["addr", "add", &format!("{CA_IP}/24"), "dev", "br0"],
        )?;
        for (i, name) in nodes.iter().enumerate() {
            cluster.add_node(name, (i + 1) as u8)?;
        }
        // Every node learns every other node's pod subnet; nothing else is routed.
        for a in &cluster.nodes {
            for b in cluster.nodes.iter().filter(|b| b.index != a.index) {
                ip_in(
                    &a.netns,
                    &[
                        "route",
                        "add",
                        &format!("10.244.{}.0/24", b.index),
                        "via",
                        &b.fabric_ip.to_string(),
                    ],
                )?;
            }
        }
        Ok(cluster)
    }

    fn add_node(&mut self, name: &str, index: u8) -> anyhow::Result<()> {
        let netns = format!("{}-{name}", self.prefix);
        run("ip", &["netns", "add", &netns])?;
        ip_in(&netns, &["link", "set", "lo", "up"])?;
        let fabric_ip = Ipv4Addr::new(172, 30, 0, index);
        let peer = format!("n{index}");
        run(
            "ip",
            &[
                "link",
                "add",
                "fab0",
                "netns",
                &netns,
                "type",
                "veth",
                "peer",
                "name",
                &peer,
                "netns",
                &self.fabric,
            ],
        )?;
        ip_in(&self.fabric, &["link", "set", &peer, "master", "br0", "up"])?;
        ip_in(
            &netns,
            &["addr", "add", &format!("{fabric_ip}/24"), "dev", "fab0"],
        )?;
        ip_in(&netns, &["link", "set", "fab0", "up"])?;
        ip_in(&netns, &["link", "add", "cbr0", "type", "bridge"])?;
        ip_in(
            &netns,
            &[
                "addr",
                "add",
                &format!("10.244.{index}.1/24"),
                "dev",
                "cbr0",
            ],
        )?;
        ip_in(&netns, &["link", "set", "cbr0", "up"])?;
        run(
            "ip",
            &[
                "netns",
                "exec",
                &netns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        )?;
        let cgroup = self.cgroup_root.join(name);
        fs::create_dir_all(&cgroup)?;
        self.nodes.push(Node {
            name: name.to_owned(),
            index,
            netns,
            cgroup,
            fabric_ip,
        });
        Ok(())
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Adds a pod on `node`: its own netns and cgroup, wired to the node's bridge.
    pub fn add_pod(&mut self, node: &str, name: &str) -> anyhow::Result<Pod> {
        self.add_pod_with_ip(node, name, None)
    }

    /// Adds a pod with a given IP, which must be in the node's pod subnet
    /// 10.244.<node index>.0/24 (node index: 1 for the first node, ...).
    pub fn add_pod_with_ip(
        &mut self,
        node: &str,
        name: &str,
        ip: Option<Ipv4Addr>,
    ) -> anyhow::Result<Pod> {
        let n = self.node(node).clone();
        // Interface names and addresses are never reused, even after `remove_pod`.
        self.pods_added += 1;
        let k = self.pods_added;
        let host_octet = (10..=254u8)
            .find(|o| {
                !self
                    .pods
                    .iter()
                    .any(|p| p.ip == IpAddr::V4(Ipv4Addr::new(10, 244, n.index, *o)))
            })
            .context("the node's pod subnet is full")?;
        let ip = ip.unwrap_or(Ipv4Addr::new(10, 244, n.index, host_octet));
        let o = ip.octets();
        anyhow::ensure!(
            o[0] == 10 && o[1] == 244 && o[2] == n.index && o[3] > 1,
            "pod {name}: IP {ip} is not in node {node}'s pod subnet 10.244.{}.0/24",
            n.index
        );
        let netns = format!("{}-{name}", self.prefix);
        run("ip", &["netns", "add", &netns])?;
        ip_in(&netns, &["link", "set", "lo", "up"])?;
        let host_if = format!("p{k}");
        run(
            "ip",
            &[
                "link", "add", &host_if, "netns", &n.netns, "type", "veth", "peer", "name", "eth0",
                "netns", &netns,
            ],
        )?;
        ip_in(&n.netns, &["link", "set", &host_if, "master", "cbr0", "up"])?;
        ip_in(&netns, &["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ip_in(&netns, &["link", "set", "eth0", "up"])?;
        ip_in(
            &netns,
            &[
                "route",
                "add",
                "default",
                "via",
                &format!("10.244.{}.1", n.index),
            ],
        )?;
        let cgroup = n.cgroup.join(name);
        fs::create_dir_all(&cgroup)?;
        let pod = Pod {
            name: name.to_owned(),
            node: node.to_owned(),
            ip: IpAddr::V4(ip),
            netns_path: netns_path(&netns),
            netns,
            cgroup,
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Deletes a pod's network namespace under the agent, as a container runtime does
    /// when a pod goes away: its processes are killed and its netns unmounted (it
    /// lives on while something, such as the agent, still holds it). The pod stays in
    /// the config until the caller removes it.
    pub fn remove_pod(&mut self, name: &str) -> anyhow::Result<()> {
        let idx = self
            .pods
            .iter()
            .position(|p| p.name == name)
            .with_context(|| format!("no pod {name}"))?;
        let pod = self.pods.remove(idx);
        crate::proc::kill_cgroup(&pod.cgroup);
        run("ip", &["netns", "del", &pod.netns])?;
        let _ = fs::remove_dir(&pod.cgroup);
        Ok(())
    }

    /// Adds a pod whose cgroup is named as the kubelet's systemd driver names it
    /// (`kubepods-besteffort-pod<uid with _>.slice`), so the agent can find its netns
    /// by `uid` in `/proc` when no annotation names it.
    pub fn add_kubelet_pod(&mut self, node: &str, name: &str, uid: &str) -> anyhow::Result<Pod> {
        let mut pod = self.add_pod(node, name)?;
        let leaf = format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_"));
        let cgroup = pod.cgroup.with_file_name(leaf);
        fs::remove_dir(&pod.cgroup)?;
        fs::create_dir_all(&cgroup)?;
        pod.cgroup = cgroup;
        if let Some(p) = self.pods.iter_mut().find(|p| p.name == name) {
            p.cgroup = pod.cgroup.clone();
        }
        Ok(pod)
    }

    /// Starts `sleep` in `pod`'s cgroup but in a network namespace of its own (named
    /// `<prefix>-<netns>`, created here, holding `ips` on its loopback): what a root
    /// process of the pod could make with `unshare -n`. Killed with the cluster.
    pub fn start_in_foreign_netns(
        &mut self,
        pod: &Pod,
        netns: &str,
        ips: &[IpAddr],
    ) -> anyhow::Result<()> {
        let name = format!("{}-{netns}", self.prefix);
        run("ip", &["netns", "add", &name])?;
        ip_in(&name, &["link", "set", "lo", "up"])?;
        for ip in ips {
            ip_in(&name, &["addr", "add", &format!("{ip}/32"), "dev", "lo"])?;
        }
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("300");
        crate::proc::enter(&mut cmd, &netns_path(&name), Some(&pod.cgroup))?;
        let child = cmd.spawn()?;
        self.tracked.push(child.id());
        Ok(())
    }

    /// How many pods `node` has now.
    pub fn pods_on(&self, node: &str) -> usize {
        self.pods.iter().filter(|p| p.node == node).count()
    }

    /// The IP of a pod added earlier.
    /// The pod named `name`.
    pub fn pod(&self, name: &str) -> Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    pub fn pod_ip(&self, name: &str) -> IpAddr {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.ip)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// The Pod object for the config directory.
    pub fn pod_yaml(&self, pod: &Pod, enrolled: bool) -> String {
        crate::yaml::pod(
            &pod.name,
            &pod.node,
            pod.ip,
            &pod.netns_path.display().to_string(),
            enrolled,
        )
    }

    /// Writes a config file atomically (write then rename), as a careful operator would.
    /// With [`Cluster::use_kubernetes_api`], its objects also go to the fake API server
    /// (and the ones the file no longer has are deleted there).
    pub fn write_config(&self, file: &str, content: &str) -> anyhow::Result<()> {
        let tmp = self.config_dir.join(format!(".{file}.tmp"));
        fs::write(&tmp, content)?;
        fs::rename(&tmp, self.config_dir.join(file))?;
        self.mirror(file, content)
    }

    /// Removes a config file (and, mirrored, its objects).
    pub fn remove_config(&self, file: &str) -> anyhow::Result<()> {
        fs::remove_file(self.config_dir.join(file))?;
        self.mirror(file, "")
    }

    fn mirror(&self, file: &str, content: &str) -> anyhow::Result<()> {
        let Some(api) = &self.api else {
            return Ok(());
        };
        let now = api.apply(content)?;
        let mut files = self.api_files.lock().unwrap_or_else(|p| p.into_inner());
        for gone in files.get(file).into_iter().flatten() {
            if !now.contains(gone) {
                api.delete(&gone.api_version, &gone.kind, &gone.namespace, &gone.name)?;
            }
        }
        files.insert(file.to_owned(), now);
        Ok(())
    }

    /// From now on the agents read a fake Kubernetes API server (in the fabric
    /// namespace) instead of the directory, and every config file written is mirrored
    /// to it. Namespace `default` is labelled into the mesh there: the directory's
    /// default is "in", the API's "out", so a test means the same in either mode.
    pub fn use_kubernetes_api(&mut self) -> anyhow::Result<()> {
        if self.api.is_some() {
            return Ok(());
        }
        let api = crate::fakeapi::FakeApi::start(
            &netns_path(&self.fabric),
            SocketAddr::from((CA_IP, API_PORT)),
            &self.work_dir.join("api"),
        )?;
        api.apply(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n  labels: {mesh.dev/dataplane-mode: enabled}\n",
        )?;
        self.kubeconfig = Some(api.kubeconfig().to_owned());
        self.api = Some(api);
        Ok(())
    }

    /// The fake API server, in the Kubernetes mode.
    pub fn api(&self) -> Option<&crate::fakeapi::FakeApi> {
        self.api.as_ref()
    }

    pub fn agent_log_path(&self, node: &str) -> PathBuf {
        self.work_dir.join(format!("{node}-agent.log"))
    }

    /// The agent's log so far. The agent writes its lines in batches (at most 50 ms
    /// after the event), so this first waits out one batch: a line logged before the
    /// call is in what it returns.
    pub fn agent_log(&self, node: &str) -> String {
        std::thread::sleep(LOG_BATCH);
        fs::read_to_string(self.agent_log_path(node)).unwrap_or_default()
    }

    /// The CA's log so far, once one log batch has been written (as `agent_log`).
    pub fn ca_log(&self) -> String {
        std::thread::sleep(LOG_BATCH);
        fs::read_to_string(self.work_dir.join("ca.log")).unwrap_or_default()
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.work_dir.join("ca")
    }

    /// The CA's generated root certificate and key (PEM files).
    pub fn ca_root(&self) -> (PathBuf, PathBuf) {
        let state = self.ca_dir().join("state");
        (state.join("root-cert.pem"), state.join("root-key.pem"))
    }

    pub fn token_file(&self, node: &str) -> PathBuf {
        self.ca_dir().join(format!("{node}.token"))
    }

    /// Starts `mesh-agent ca` in the fabric namespace with a bootstrap token per node,
    /// and waits until it serves.
    pub fn start_ca(&mut self) -> anyhow::Result<()> {
        self.ca_stopped = false;
        let dir = self.ca_dir();
        fs::create_dir_all(&dir)?;
        let mut tokens = String::from("# node token\n");
        for n in &self.nodes {
            let token = random_hex(32)?;
            fs::write(self.token_file(&n.name), &token)?;
            tokens.push_str(&format!("{} {token}\n", n.name));
            // On the API: the agent's projected service-account token, bound to its
            // pod on this node, for the CA's audience.
            if let Some(api) = &self.api {
                api.add_token(
                    &token,
                    crate::fakeapi::TokenInfo {
                        username: AGENT_SERVICE_ACCOUNT_USER.to_owned(),
                        node: Some(n.name.clone()),
                        audiences: vec!["mesh-ca".to_owned()],
                    },
                );
            }
        }
        fs::write(dir.join("node-tokens"), tokens)?;
        let log = fs::File::create(self.work_dir.join("ca.log"))?;
        let mut cmd = Command::new(&self.agent_bin);
        cmd.args([
            "ca",
            "--listen",
            &format!("{CA_IP}:{CA_PORT}"),
            "--state-dir",
        ])
        .arg(dir.join("state"));
        match &self.kubeconfig {
            Some(k) => cmd.arg("--kubeconfig").arg(k).arg("--token-review"),
            None => cmd
                .arg("--config-dir")
                .arg(&self.config_dir)
                .arg("--node-tokens")
                .arg(dir.join("node-tokens")),
        };
        cmd.args(["--max-cert-ttl", &self.cert_ttl])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        enter(&mut cmd, &netns_path(&self.fabric), None)?;
        let child = cmd.spawn().context("starting the CA")?;
        self.ca = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = SocketAddr::from((CA_IP, CA_PORT));
        loop {
            let up = in_netns(&netns_path(&self.fabric), move || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })?;
            if up && self.ca_root().0.exists() {
                return Ok(());
            }
            if let Some(ca) = self.ca.as_mut()
                && let Some(status) = ca.try_wait()?
            {
                bail!(
                    "CA exited with {status}:\n{}",
                    fs::read_to_string(self.work_dir.join("ca.log")).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("CA not serving after 20s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the CA (SIGTERM); [`Cluster::start_ca`] brings it back with its state.
    /// Agents started meanwhile find it down.
    pub fn stop_ca(&mut self) -> anyhow::Result<()> {
        self.ca_stopped = true;
        if let Some(mut ca) = self.ca.take() {
            terminate(&mut ca, Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// The CA's process id, once it runs.
    pub fn ca_pid(&self) -> Option<u32> {
        self.ca.as_ref().map(Child::id)
    }

    /// Starts the agent of `node` in the node's netns and in a cgroup under the node's
    /// (so the node's programs see the agent's own sockets too), and waits until it
    /// reports ready. Starts the CA first if it is not running.
    pub fn start_agent(&mut self, node: &str) -> anyhow::Result<()> {
        let config_dir = self.config_dir.clone();
        self.start_agent_with(node, &config_dir)
    }

    /// As [`Cluster::start_agent`], with the agent reading its own config directory.
    pub fn start_agent_with(&mut self, node: &str, config_dir: &Path) -> anyhow::Result<()> {
        self.launch_agent(node, config_dir)?;
        self.wait_ready(node, Duration::from_secs(30))
    }

    /// The fabric namespace: the link every node is on.
    pub fn fabric_netns(&self) -> &str {
        &self.fabric
    }

    /// Starts the agent without waiting for it to be ready.
    pub fn launch_agent(&mut self, node: &str, config_dir: &Path) -> anyhow::Result<()> {
        if self.ca.is_none() && !self.ca_stopped {
            self.start_ca()?;
        }
        let n = self.node(node).clone();
        let cgroup = n.cgroup.join("mesh-agent");
        fs::create_dir_all(&cgroup)?;
        let log = fs::File::create(self.agent_log_path(node))?;
        let mut cmd = Command::new(&self.agent_bin);
        cmd.args(["run", "--node-name", node]);
        match &self.kubeconfig {
            Some(k) => cmd.arg("--kubeconfig").arg(k),
            None => cmd.arg("--config-dir").arg(config_dir),
        };
        cmd.args(["--ca-addr", &format!("{CA_IP}:{CA_PORT}"), "--ca-root"])
            .arg(self.ca_root().0)
            .arg("--ca-token-file")
            .arg(self.token_file(node))
            .args(["--cert-ttl", &self.cert_ttl])
            .arg("--cgroup")
            .arg(self.agent_cgroup.as_ref().unwrap_or(&n.cgroup))
            .arg("--bpffs")
            .arg(&self.bpffs)
            .arg("--admin-socket")
            .arg(self.admin_socket(node))
            .arg("--handover-socket")
            .arg(self.work_dir.join(format!("{node}-handover.sock")))
            .args(["--connect-timeout", &self.connect_timeout])
            .args(&self.agent_args)
            .env(
                "RUST_LOG",
                std::env::var("MESH_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null());
        if self.agent_log_stalled {
            let (reader, writer) = std::io::pipe()?;
            cmd.stdout(writer.try_clone()?).stderr(writer);
            self.stalled_logs.push(reader);
        } else {
            cmd.stdout(log.try_clone()?).stderr(log);
        }
        enter(&mut cmd, &netns_path(&n.netns), Some(&cgroup))?;
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.agent_bin.display()))?;
        self.agents.push((node.to_owned(), child));
        Ok(())
    }

    /// Polls the agent's readiness endpoint from inside the node's netns.
    pub fn wait_ready(&mut self, node: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((_, child)) = self.agents.iter_mut().find(|(n, _)| n == node)
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "agent {node} exited with {status}:\n{}",
                    self.agent_log(node)
                );
            }
            if self
                .readiness(node)
                .map(|(code, _)| code == 200)
                .unwrap_or(false)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "agent {node} not ready after {timeout:?}:\n{}",
                    self.agent_log(node)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// (status code, body) of GET /healthz/ready on the node's agent.
    pub fn readiness(&self, node: &str) -> anyhow::Result<(u16, String)> {
        self.http_get(node, READINESS_PORT, "/healthz/ready")
    }

    /// `GET path` on the agent's node address, from inside the node's netns: (status,
    /// whole response).
    pub fn http_get(&self, node: &str, port: u16, path: &str) -> anyhow::Result<(u16, String)> {
        let n = self.node(node);
        let addr = SocketAddr::from((n.fabric_ip, port));
        let request = format!("GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n");
        let resp = in_netns(&netns_path(&n.netns), move || -> anyhow::Result<String> {
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(request.as_bytes())?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })??;
        let code = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        Ok((code, resp))
    }

    /// The Prometheus text the agent of `node` serves on :15020.
    pub fn metrics(&self, node: &str) -> anyhow::Result<String> {
        let (code, resp) = self.http_get(node, METRICS_PORT, "/metrics")?;
        anyhow::ensure!(code == 200, "metrics answered {code}: {resp}");
        Ok(resp)
    }

    /// The admin socket of the agent of `node`.
    pub fn admin_socket(&self, node: &str) -> PathBuf {
        self.work_dir.join(format!("{node}-admin.sock"))
    }

    /// The meshctl binary next to the agent binary.
    pub fn meshctl_bin(&self) -> PathBuf {
        self.agent_bin.with_file_name("meshctl")
    }

    /// Runs `meshctl --socket <node's socket> ARGS` and returns its output.
    pub fn meshctl(&self, node: &str, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Command::new(self.meshctl_bin())
            .arg("--socket")
            .arg(self.admin_socket(node))
            .args(args)
            .output()
            .with_context(|| format!("running {}", self.meshctl_bin().display()))
    }

    /// `meshctl -o json ARGS` parsed, failing on a non-zero exit.
    pub fn meshctl_json(&self, node: &str, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let out = self.meshctl(node, &all)?;
        anyhow::ensure!(
            out.status.success(),
            "meshctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "meshctl {args:?} printed no JSON: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Sends SIGTERM to the agent of `node` and waits for it to exit.
    pub fn stop_agent(&mut self, node: &str) -> anyhow::Result<std::process::ExitStatus> {
        let idx = self
            .agents
            .iter()
            .position(|(n, _)| n == node)
            .context("no such agent")?;
        let (_, mut child) = self.agents.remove(idx);
        terminate(&mut child, Duration::from_secs(10))
    }

    /// Starts a new agent for `node` beside the running one, as a DaemonSet rolling
    /// update with a surge pod does (same binary: an upgrade and a hitless restart
    /// are the same handover). The running agent's log moves to
    /// [`Cluster::previous_agent_log_path`]; the new one's is the node's log.
    /// Returns once the new agent has taken over (the old one drains).
    pub fn upgrade_agent(&mut self, node: &str, timeout: Duration) -> anyhow::Result<()> {
        let old_pid = self
            .agent_pid(node)
            .context("no running agent to upgrade")?;
        let dir = self.config_dir.clone();
        self.launch_successor(node, &dir)?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((_, child)) = self.agents.iter_mut().find(|(n, _)| n == node)
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "the new agent of {node} exited with {status}:\n{}",
                    self.agent_log(node)
                );
            }
            // The new agent's admin socket names the agent it took over from.
            if let Ok(s) = self.meshctl_json(node, &["status"])
                && s["previous_agent"]["pid"].as_u64() == Some(u64::from(old_pid))
                && s["previous_agent"]["state"] != "handing over"
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the new agent of {node} did not take over within {timeout:?}:\n{}\nprevious:\n{}",
                    self.agent_log(node),
                    self.previous_agent_log(node)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts a successor beside the running agent of `node`, reading `config_dir`,
    /// without waiting for it (see [`Cluster::upgrade_agent`]): the running agent's
    /// log moves to [`Cluster::previous_agent_log_path`].
    pub fn launch_successor(&mut self, node: &str, config_dir: &Path) -> anyhow::Result<()> {
        let idx = self
            .agents
            .iter()
            .position(|(n, _)| n == node)
            .context("no running agent")?;
        let old = self.agents.remove(idx);
        self.previous_agents.push(old);
        fs::rename(
            self.agent_log_path(node),
            self.previous_agent_log_path(node),
        )?;
        self.launch_agent(node, config_dir)
    }

    /// SIGKILLs the successor of `node`; the agent it was taking over from is the
    /// node's agent again (its log stays at the previous agent's path).
    pub fn kill_successor(&mut self, node: &str) -> anyhow::Result<()> {
        self.crash_agent(node)?;
        let idx = self
            .previous_agents
            .iter()
            .position(|(n, _)| n == node)
            .context("no previous agent")?;
        let old = self.previous_agents.remove(idx);
        self.agents.push(old);
        Ok(())
    }

    /// Where the log of the agent a successor took over from is.
    pub fn previous_agent_log_path(&self, node: &str) -> PathBuf {
        self.work_dir.join(format!("{node}-agent-previous.log"))
    }

    pub fn previous_agent_log(&self, node: &str) -> String {
        std::thread::sleep(LOG_BATCH);
        fs::read_to_string(self.previous_agent_log_path(node)).unwrap_or_default()
    }

    /// Waits for the agent a successor took over from to exit on its own.
    pub fn wait_previous_agent(
        &mut self,
        node: &str,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let idx = self
            .previous_agents
            .iter()
            .position(|(n, _)| n == node)
            .context("no previous agent")?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.previous_agents[idx].1.try_wait()? {
                self.previous_agents.remove(idx);
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "the previous agent of {node} still runs after {timeout:?}:\n{}",
                    self.previous_agent_log(node)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs the agent of `node`, as a crash would: nothing is cleaned up.
    pub fn crash_agent(&mut self, node: &str) -> anyhow::Result<()> {
        let idx = self
            .agents
            .iter()
            .position(|(n, _)| n == node)
            .context("no such agent")?;
        let (_, mut child) = self.agents.remove(idx);
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// The agent of `node` a successor took over from, while it drains.
    pub fn previous_agent_pid(&mut self, node: &str) -> Option<u32> {
        let (_, child) = self.previous_agents.iter_mut().find(|(n, _)| n == node)?;
        match child.try_wait() {
            Ok(None) => Some(child.id()),
            _ => None,
        }
    }

    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        self.agents
            .iter()
            .find(|(n, _)| n == node)
            .map(|(_, c)| c.id())
    }

    /// Starts `mesh-testpod ARGS` inside `pod`, stdin and stdout piped. The process is
    /// killed when the cluster is dropped.
    pub fn spawn(&mut self, pod: &Pod, args: &[&str]) -> anyhow::Result<Child> {
        let mut cmd = Command::new(&self.testpod_bin);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        enter(&mut cmd, &pod.netns_path, Some(&pod.cgroup))?;
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.testpod_bin.display()))?;
        self.tracked.push(child.id());
        Ok(child)
    }

    /// A command that will run inside `pod` (its netns and cgroup), like the pod's
    /// own processes.
    pub fn command_in_pod(&self, pod: &Pod, program: &Path) -> anyhow::Result<Command> {
        let mut cmd = Command::new(program);
        enter(&mut cmd, &pod.netns_path, Some(&pod.cgroup))?;
        Ok(cmd)
    }

    /// A command that will run in the network namespace of `node`.
    pub fn command_in_node(&self, node: &str, program: &Path) -> anyhow::Result<Command> {
        let mut cmd = Command::new(program);
        enter(&mut cmd, &netns_path(&self.node(node).netns), None)?;
        Ok(cmd)
    }

    /// Keeps `pid` in the list of processes killed when the cluster goes away.
    pub fn track(&mut self, pid: u32) {
        self.tracked.push(pid);
    }

    /// Starts `mesh-testpod serve` in `pod` (answering with the pod's name) and waits
    /// until it listens. Its log (`<work_dir>/<pod>.log`) records half-close tails.
    pub fn start_server(&mut self, pod: &Pod, port: u16) -> anyhow::Result<()> {
        let log = self.work_dir.join(format!("{}.log", pod.name));
        let log = log.display().to_string();
        let port = port.to_string();
        self.start_listening(
            pod,
            &["serve", "--name", &pod.name, "--port", &port, "--log", &log],
        )
    }

    /// Starts `mesh-testpod echo-serve` (the HTTP echo server of the L7 tests) in
    /// `pod`, answering with the pod's name, and waits until it listens.
    pub fn start_echo_server(&mut self, pod: &Pod, port: u16) -> anyhow::Result<()> {
        let port = port.to_string();
        self.start_listening(pod, &["echo-serve", "--name", &pod.name, "--port", &port])
    }

    /// Starts the WebSocket echo server (`mesh-testpod ws-serve`) in `pod`.
    pub fn start_ws_server(&mut self, pod: &Pod, port: u16) -> anyhow::Result<()> {
        let port = port.to_string();
        self.start_listening(pod, &["ws-serve", "--name", &pod.name, "--port", &port])
    }

    /// Starts a `mesh-testpod` server and waits for its "listening" line on stderr.
    fn start_listening(&mut self, pod: &Pod, args: &[&str]) -> anyhow::Result<()> {
        use std::io::BufRead as _;
        let mut child = self.spawn(pod, args)?;
        let stderr = child.stderr.take().context("server stderr")?;
        let mut msg = String::new();
        std::io::BufReader::new(stderr).read_line(&mut msg)?;
        anyhow::ensure!(
            msg.contains("listening"),
            "{} in {} did not start: {msg:?}",
            args.first().unwrap_or(&"server"),
            pod.name
        );
        Ok(())
    }

    /// Runs `mesh-testpod ARGS` inside `pod` to completion and returns its stdout;
    /// fails (with stderr) on a non-zero exit or after `timeout`.
    pub fn run_in(
        &mut self,
        pod: &Pod,
        args: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let mut child = self.spawn(pod, args)?;
        drop(child.stdin.take());
        let deadline = Instant::now() + timeout;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "mesh-testpod {} in {} timed out after {timeout:?}",
                    args.join(" "),
                    pod.name
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "mesh-testpod {} in {} failed ({}): {}{}",
                args.join(" "),
                pod.name,
                out.status,
                stdout,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout)
    }
}

/// Best-effort removal of namespaces and cgroups a killed run left behind.
fn remove_leftovers(prefix: &str) {
    if let Ok(list) = run("ip", &["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if name.starts_with(&format!("{prefix}-")) {
                let _ = run("ip", &["netns", "del", name]);
            }
        }
    }
    if let Ok(root) = cgroup2_mount() {
        let dir = root.join("mesh-tests").join(prefix);
        // rmdir only works bottom-up on empty cgroups.
        let mut dirs: Vec<PathBuf> = Vec::new();
        let mut stack = vec![dir];
        while let Some(d) = stack.pop() {
            if let Ok(rd) = fs::read_dir(&d) {
                stack.extend(
                    rd.filter_map(Result::ok)
                        .map(|e| e.path())
                        .filter(|p| p.is_dir()),
                );
            }
            dirs.push(d);
        }
        for d in dirs.iter().rev() {
            let _ = fs::remove_dir(d);
        }
    }
    let _ = fs::remove_dir_all(PathBuf::from("/sys/fs/bpf").join(prefix));
}

/// Runs `f` on a thread that has entered the network namespace at `path`; sockets it
/// creates stay in that namespace.
pub fn in_netns<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let ns = fs::File::open(path)?;
    std::thread::spawn(move || -> anyhow::Result<T> {
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

/// SIGTERM, then SIGKILL after `grace`.
pub fn terminate(child: &mut Child, grace: Duration) -> anyhow::Result<std::process::ExitStatus> {
    use nix::{
        sys::signal::{Signal, kill},
        unistd::Pid,
    };
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!(
                "process {} ignored SIGTERM for {grace:?}; killed",
                child.id()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        use nix::{
            sys::signal::{Signal, kill},
            unistd::Pid,
        };
        for pid in self.tracked.drain(..) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(Pid::from_raw(pid as i32), None);
        }
        for (_, mut agent) in self.agents.drain(..) {
            let _ = terminate(&mut agent, Duration::from_secs(10));
        }
        for (_, mut agent) in self.previous_agents.drain(..) {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        if let Some(mut ca) = self.ca.take() {
            let _ = terminate(&mut ca, Duration::from_secs(10));
        }
        for pod in self.pods.drain(..) {
            crate::proc::kill_cgroup(&pod.cgroup);
            let _ = run("ip", &["netns", "del", &pod.netns]);
        }
        for node in self.nodes.drain(..) {
            let _ = run("ip", &["netns", "del", &node.netns]);
            let _ = fs::remove_dir(node.cgroup.join("mesh-agent"));
            let _ = fs::remove_dir(&node.cgroup);
        }
        let _ = run("ip", &["netns", "del", &self.fabric]);
        let _ = fs::remove_dir(&self.cgroup_root);
        // Namespaces a test made beside its pods (`start_in_foreign_netns`).
        remove_leftovers(&self.prefix);
        // Pins an agent failed to remove (the tests check that it did).
        let _ = fs::remove_dir_all(&self.bpffs);
        if std::env::var_os("MESH_TEST_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.work_dir);
        }
    }
}

/// `bytes` random bytes from the kernel, hex-encoded.
pub fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buf = vec![0u8; bytes];
    fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}
