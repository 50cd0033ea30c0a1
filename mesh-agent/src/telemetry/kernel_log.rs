//! The kernel programs' own log (aya-log records from `AYA_LOGS`), off by default and
//! switched at run time (`meshctl log-level set --kernel debug`). Each record names
//! the network namespace it is about; it is written to the agent's log with the pod
//! that namespace belongs to.
use std::sync::{Arc, OnceLock};

use aya_log::EbpfLogger;
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

/// The pod (`namespace/name`) of a netns cookie, among the pods this agent serves.
pub type PodByNetns = Arc<dyn Fn(u64) -> Option<String> + Send + Sync>;

/// Where aya-log hands each record.
pub struct KernelLog {
    pods: Arc<OnceLock<PodByNetns>>,
}

impl KernelLog {
    /// `pods` is filled once the agent knows its pods (after the programs load).
    pub fn new(pods: Arc<OnceLock<PodByNetns>>) -> KernelLog {
        KernelLog { pods }
    }
}

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let line = record.args().to_string();
        let (cookie, rest) = split_netns(&line);
        let pod = cookie.and_then(|c| self.pods.get().and_then(|f| f(c)));
        info!(
            target: "mesh_agent::kernel",
            pod = %pod.as_deref().unwrap_or("-"),
            netns_cookie = cookie,
            "kernel: {rest}"
        );
    }

    fn flush(&self) {}
}

/// `netns=<cookie> rest` -> (cookie, rest); a line without it is kept whole.
pub fn split_netns(line: &str) -> (Option<u64>, &str) {
    let Some(after) = line.strip_prefix("netns=") else {
        return (None, line);
    };
    let (number, rest) = after.split_once(' ').unwrap_or((after, ""));
    match number.parse() {
        Ok(n) => (Some(n), rest),
        Err(_) => (None, line),
    }
}

/// Reads the records as they come, until the agent stops.
pub async fn run(logger: EbpfLogger<KernelLog>) {
    // SAFETY: the logger owns its ring buffer's map fd for as long as the AsyncFd
    // owns the logger, so the fd stays open while registered.
    let mut fd = match unsafe { AsyncFd::register(logger) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "cannot read the kernel log");
            return;
        }
    };
    loop {
        let mut ready = match fd.readable_mut().await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "kernel log stopped");
                return;
            }
        };
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::split_netns;

    #[test]
    fn the_netns_cookie_leads_each_line() {
        assert_eq!(
            split_netns("netns=8123 redirect dst=::ffff:10.96.0.80 port=80"),
            (Some(8123), "redirect dst=::ffff:10.96.0.80 port=80")
        );
        assert_eq!(split_netns("something else"), (None, "something else"));
        assert_eq!(split_netns("netns=x y"), (None, "netns=x y"));
    }
}
