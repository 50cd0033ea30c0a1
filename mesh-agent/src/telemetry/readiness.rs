//! What `GET /healthz/ready` answers: 200 only when the programs are attached, a config
//! has been loaded and every local pod of it is enrolled with a valid certificate; 503
//! (with the reason) before.
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Default)]
pub struct Readiness {
    pub programs_attached: AtomicBool,
    pub config_loaded: AtomicBool,
    pub pods_enrolled: AtomicBool,
    pub certs_valid: AtomicBool,
    /// A successor agent is taking over (this agent's readiness ends there).
    pub handing_over: AtomicBool,
}

impl Readiness {
    /// `None` when ready, else what is missing.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if self.handing_over.load(Ordering::Relaxed) {
            Some("handing over to a successor agent")
        } else if !self.programs_attached.load(Ordering::Relaxed) {
            Some("eBPF programs not attached")
        } else if !self.config_loaded.load(Ordering::Relaxed) {
            Some("no valid config loaded")
        } else if !self.pods_enrolled.load(Ordering::Relaxed) {
            Some("local pods not all enrolled")
        } else if !self.certs_valid.load(Ordering::Relaxed) {
            Some("a local workload has no valid certificate")
        } else {
            None
        }
    }
}
