//! The proxies' kernel work while a fixed-rate run goes on: system calls and context
//! switches, counted by `perf stat` on every thread of the proxy processes. Counts per
//! request move little with the machine's load, unlike latencies and throughput, so
//! they show a change in the data path's work from one run to the next.
use std::process::{Child, Command, Stdio};

use super::progress;

/// A `perf stat` running beside the load.
pub struct Counting(Child);

/// What it counted.
pub struct Work {
    pub syscalls: f64,
    pub switches: f64,
}

const SYSCALLS: &str = "raw_syscalls:sys_enter";
const SWITCHES: &str = "context-switches";
/// Also counted, for the breakdown in the progress output.
const KINDS: [&str; 19] = [
    "syscalls:sys_enter_read",
    "syscalls:sys_enter_write",
    "syscalls:sys_enter_writev",
    "syscalls:sys_enter_recvfrom",
    "syscalls:sys_enter_sendto",
    "syscalls:sys_enter_epoll_wait",
    "syscalls:sys_enter_epoll_pwait",
    "syscalls:sys_enter_futex",
    "syscalls:sys_enter_sched_yield",
    "syscalls:sys_enter_epoll_ctl",
    // What each new connection costs.
    "syscalls:sys_enter_accept4",
    "syscalls:sys_enter_connect",
    "syscalls:sys_enter_socket",
    "syscalls:sys_enter_close",
    "syscalls:sys_enter_shutdown",
    "syscalls:sys_enter_setsockopt",
    "syscalls:sys_enter_getsockname",
    "syscalls:sys_enter_getpeername",
    "syscalls:sys_enter_bpf",
];

/// Starts counting on the proxies for `secs`; `None` when perf cannot start.
pub fn count(proxies: &[u32], secs: u64) -> Option<Counting> {
    start(proxies, Some(secs))
}

/// Starts counting on the proxies until [`Counting::stop`]: for a measurement whose
/// length is not known in advance (a bulk transfer).
pub fn count_until_stopped(proxies: &[u32]) -> Option<Counting> {
    start(proxies, None)
}

fn start(proxies: &[u32], secs: Option<u64>) -> Option<Counting> {
    let pids: Vec<String> = proxies.iter().map(u32::to_string).collect();
    let mut cmd = Command::new("perf");
    cmd.args(["stat", "-x", ",", "-e"])
        .arg(format!("{SYSCALLS},{SWITCHES},{}", KINDS.join(",")))
        .args(["-p", &pids.join(",")]);
    if let Some(secs) = secs {
        cmd.args(["--", "sleep", &secs.to_string()]);
    }
    cmd.stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| progress(&format!("perf stat did not start: {e}")))
        .ok()
        .map(Counting)
}

impl Counting {
    /// Ends a count started with [`count_until_stopped`] (perf prints its counts on
    /// SIGINT) and reads it.
    pub fn stop(self) -> Option<Work> {
        let _ = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        self.finish()
    }

    /// Waits for the count; `None` if perf failed or printed no count.
    pub fn finish(self) -> Option<Work> {
        let out = self.0.wait_with_output().ok()?;
        let text = String::from_utf8_lossy(&out.stderr);
        let kinds: Vec<String> = KINDS
            .iter()
            .filter_map(|k| {
                let v = value(&text, k)?;
                Some(format!("{}={v}", k.rsplit('_').next().unwrap_or(k)))
            })
            .collect();
        progress(&format!("proxies' system calls: {}", kinds.join(" ")));
        let parsed = parse(&text);
        if parsed.is_none() {
            progress("perf stat gave no counts (are tracepoints available?)");
        }
        parsed
    }
}

/// Reads `perf stat -x,` output: `value,unit,event,...` per line.
fn parse(text: &str) -> Option<Work> {
    Some(Work {
        syscalls: value(text, SYSCALLS)?,
        switches: value(text, SWITCHES)?,
    })
}

fn value(text: &str, event: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let mut f = l.split(',');
        let v = f.next()?;
        let _unit = f.next()?;
        (f.next()? == event)
            .then(|| v.parse::<f64>().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_perf_stat_csv() {
        let text = "123456,,raw_syscalls:sys_enter,5000123,100.00,,\n7890,,context-switches,5000123,100.00,1.58,K/sec\n";
        let w = parse(text).expect("both counts");
        assert_eq!((w.syscalls, w.switches), (123456.0, 7890.0));
        assert!(parse("<not counted>,,raw_syscalls:sys_enter,0,0.00,,\n").is_none());
    }
}
