//! The agent's heartbeat in the kernel (`MESH_HEARTBEAT`): while it is fresh, pods'
//! connections are captured; once it is older than `HEARTBEAT_STALE_NS` (the agent
//! died, hung, or handed over and stopped accepting), `connect4/6` send fail-open
//! Services straight to an endpoint and refuse everything else.
//!
//! A thread of its own, not a task: a busy runtime must not look like a dead agent.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use tracing::warn;

use super::MeshMaps;

/// How often the heartbeat is written (an eighth of the time after which it is stale).
pub const EVERY: Duration = Duration::from_millis(250);

pub struct Heartbeat {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    /// Starts beating: call it once the agent serves (its first config applied, so
    /// the pods enrolled have their listeners).
    pub fn start(maps: Arc<MeshMaps>) -> std::io::Result<Heartbeat> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new().name("mesh-heartbeat".into()).spawn({
            let stop = stop.clone();
            move || {
                let mut failing = false;
                while !stop.load(Ordering::Relaxed) {
                    match maps.beat() {
                        Ok(()) => failing = false,
                        Err(e) if !failing => {
                            warn!(error = %e, "cannot write the heartbeat; fail-open services will open");
                            failing = true;
                        }
                        Err(_) => {}
                    }
                    std::thread::sleep(EVERY);
                }
            }
        })?;
        Ok(Heartbeat {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops beating (the agent no longer accepts): within the stale time, the kernel
    /// takes the node for unserved unless a successor beats.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
