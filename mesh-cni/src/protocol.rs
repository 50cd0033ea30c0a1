//! One JSON line each way on the agent's CNI socket: the plugin's [`Request`], the
//! agent's [`Reply`].
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Longest line either side reads.
pub const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    Add,
    Del,
    Check,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub command: Command,
    pub container_id: String,
    /// `CNI_NETNS`: a path to the sandbox's network namespace.
    pub netns: String,
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    pub ips: Vec<IpAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The pod is in the mesh and enrolled: its application may start.
    Enrolled,
    /// The pod is not in the mesh (its labels, or another node's): nothing to hold.
    NotMeshed,
    /// DEL done.
    Released,
    /// The agent could not enroll a pod that is in the mesh, or does not know it.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub outcome: Outcome,
    pub message: String,
}
