//! Hitless restart and upgrade: a new agent takes over from the running one on the
//! same node without a refused connection and without ending any connection the old
//! one carries.
//!
//! The running agent listens on a node-local handover socket. A new agent connects
//! to it before it binds anything ([`take::take_over`]) and receives, as file
//! descriptors, the very listening sockets the old one serves: the node's readiness
//! and metrics listeners and every enrolled pod's outbound, tunnel and plaintext
//! listeners. Both processes then hold the same sockets, so a connection waiting in
//! an accept queue is never lost, whichever of them accepts it. The new agent adopts
//! the pinned kernel state (maps, links) and attaches its own programs next to the
//! old ones; during the overlap both agents' sockets are exempt from capture
//! (`PREVIOUS_AGENT_TGID`). Once it is ready it says so, and the old agent
//! ([`give`]) stops accepting, asks its peers and clients to move on (HTTP/2
//! GOAWAY, HTTP/1 `Connection: close`), keeps relaying what it carries until that
//! ends or the drain deadline passes, and exits leaving every pin to the new agent.
pub mod drain;
pub mod give;
pub mod take;
pub mod wire;

use std::{sync::Mutex, time::SystemTime};

/// How long a successor may take to say hello once connected.
pub const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What this agent knows of the agent it took over from, for `meshctl status`.
#[derive(Debug, Default)]
pub struct PreviousAgentStatus {
    inner: Mutex<Option<PreviousAgent>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviousAgent {
    pub pid: u32,
    pub version: String,
    pub state: PreviousState,
    /// Connections it still carries (while draining).
    pub connections: u64,
    /// When it stops relaying them.
    pub deadline: Option<SystemTime>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreviousState {
    /// Its listeners were handed over; this agent is not ready yet.
    HandingOver,
    /// It stopped accepting and relays what it carries.
    Draining,
    /// It exited.
    Exited,
}

impl PreviousState {
    pub fn name(self) -> &'static str {
        match self {
            PreviousState::HandingOver => "handing over",
            PreviousState::Draining => "draining",
            PreviousState::Exited => "exited",
        }
    }
}

impl PreviousAgentStatus {
    pub fn get(&self) -> Option<PreviousAgent> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, f: impl FnOnce(&mut Option<PreviousAgent>)) {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The inverse of [`unix_ms`].
pub fn from_unix_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms)
}
