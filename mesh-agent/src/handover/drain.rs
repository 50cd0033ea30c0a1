//! The drain of an agent that handed over: it accepts nothing new and relays what it
//! carries until that ends or the deadline passes, reporting to its successor.
use std::{
    sync::mpsc as std_mpsc,
    time::{Duration, Instant, SystemTime},
};

use tokio::signal::unix::Signal;
use tracing::{info, warn};

use super::give::Report;
use crate::proxy::ProxyContext;

/// How often the drain looks at what is left (and reports it).
const TICK: Duration = Duration::from_secs(1);

/// What the drain does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Connections are left and there is time: wait.
    Wait,
    /// Nothing is left: exit now.
    Drained,
    /// The deadline passed: exit, closing what is left.
    Deadline { left: usize },
}

/// The drain's decision, from the connections still open and the time.
pub fn next(open: usize, now: Instant, deadline: Instant) -> Next {
    if open == 0 {
        Next::Drained
    } else if now >= deadline {
        Next::Deadline { left: open }
    } else {
        Next::Wait
    }
}

/// Runs the drain. Signals are logged, not obeyed: the successor owns the node now
/// and this process ends at the deadline anyway (a second SIGINT is for a person at
/// a terminal, and ends it at once).
pub async fn run(
    proxy: &ProxyContext,
    reports: &std_mpsc::Sender<Report>,
    timeout: Duration,
    sigterm: &mut Signal,
    sigint: &mut Signal,
) {
    let started = Instant::now();
    let deadline = started + timeout;
    let deadline_wall = SystemTime::now() + timeout;
    info!(connections = proxy.conns.open(), drain_timeout = ?timeout,
        "a successor took over; draining");
    loop {
        let open = proxy.conns.open();
        let _ = reports.send(Report {
            connections: open as u64,
            deadline: deadline_wall,
        });
        match next(open, Instant::now(), deadline) {
            Next::Wait => {}
            Next::Drained => {
                info!(took = ?started.elapsed(), "drained: every connection ended");
                return;
            }
            Next::Deadline { left } => {
                warn!(left, "drain deadline passed; closing the connections left");
                return;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(TICK) => {}
            _ = sigterm.recv() => info!(connections = open, "SIGTERM while draining; draining on until the deadline"),
            _ = sigint.recv() => { warn!(connections = open, "SIGINT while draining; stopping now"); return; }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drain_ends_when_nothing_is_left_or_at_the_deadline() {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(25);
        assert_eq!(next(3, t0, deadline), Next::Wait);
        assert_eq!(next(0, t0, deadline), Next::Drained);
        assert_eq!(next(3, deadline, deadline), Next::Deadline { left: 3 });
        // Nothing left at the deadline is a drain, not a cut.
        assert_eq!(next(0, deadline, deadline), Next::Drained);
    }
}
