//! Command line of `mesh-agent`.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "mesh-agent",
    version,
    about = "Node agent of the eBPF sidecarless mesh"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach the kernel programs and carry the node's mesh traffic until SIGTERM.
    Run(RunArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// This node's name: pods whose spec.nodeName equals it are enrolled.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// Directory of YAML files (Service, EndpointSlice, Pod), watched for changes.
    #[arg(long, env = "MESH_CONFIG_DIR")]
    pub config_dir: PathBuf,

    /// cgroup v2 directory to attach the programs to. Default: the cgroup v2 root,
    /// found from /proc/self/mountinfo.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,

    /// bpffs mount; pins go to <bpffs>/mesh/<node-name>. Mounted if absent.
    #[arg(long, default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,

    /// Upstream connect timeout; on expiry the client connection is reset.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// Readiness endpoint (GET /healthz/ready), on the node.
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,

    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}
