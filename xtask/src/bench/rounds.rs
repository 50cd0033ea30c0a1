//! The fixed-rate measurements (latency at each rate, connection churn) as several
//! short runs instead of one long one, so that each figure comes with a spread: the
//! latency runs go in rounds over the rates (1k, 4k, 10k, 1k, 4k, 10k, ...), so a
//! minute of bad luck on the machine touches every rate a little rather than one rate
//! entirely. Each run's cost (the proxies' CPU, the machine's, the proxies' system
//! calls) is added up with its requests, so the per-request figures cover every run.
use super::{
    first_line,
    load::{Latency, anon_rss_mib, cpu_seconds, machine_busy_seconds},
    work,
};

/// Runs per fixed-rate figure; together as long as the one run each used to be.
pub const RUNS: u64 = 3;

/// What the runs of one figure add up to.
#[derive(Default)]
pub struct Tally {
    pub runs: Vec<Latency>,
    /// Requests (or connections) the runs completed: achieved rate times run length.
    pub requests: f64,
    /// Time the load ran, seconds: the runs' length, not the wall time around them,
    /// which adds about half a second per run of the load generator starting in the
    /// pod and exiting, while the proxies idle (a CPU share over it would read low).
    pub secs: f64,
    /// The proxies' CPU time and the whole machine's busy time, seconds.
    pub proxy_cpu_s: f64,
    pub machine_busy_s: f64,
    /// The proxies' system calls and context switches, when every run was counted.
    pub work: Option<work::Work>,
    counted: bool,
    /// The proxies' anonymous memory after the last run.
    pub anon_rss_mib: f64,
    pub errors: Vec<String>,
}

impl Tally {
    /// One run of `secs`, `run` driving the load; with `count_work`, the proxies'
    /// system calls are counted during it.
    pub fn run(
        &mut self,
        proxies: &[u32],
        count_work: bool,
        secs: u64,
        run: impl FnOnce() -> anyhow::Result<Latency>,
    ) {
        let cpu = || proxies.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
        let (cpu0, busy0) = (cpu(), machine_busy_seconds());
        let counting = (count_work && !proxies.is_empty())
            .then(|| work::count(proxies, secs))
            .flatten();
        match run() {
            Ok(l) => {
                self.secs += secs as f64;
                self.proxy_cpu_s += cpu() - cpu0;
                self.machine_busy_s += machine_busy_seconds() - busy0;
                self.requests += l.achieved_rps * secs as f64;
                self.anon_rss_mib = proxies.iter().map(|p| anon_rss_mib(*p)).sum();
                let counted = counting.and_then(work::Counting::finish);
                self.add_work(counted, count_work && !proxies.is_empty());
                self.runs.push(l);
            }
            Err(e) => {
                if let Some(c) = counting {
                    let _ = c.finish();
                }
                self.errors.push(first_line(&e));
            }
        }
    }

    /// Adds one run's counts; a run that should have been counted and was not leaves
    /// the tally without counts (a sum over some of the runs is no per-request figure).
    fn add_work(&mut self, counted: Option<work::Work>, expected: bool) {
        if !expected {
            return;
        }
        let first = !self.counted;
        self.counted = true;
        self.work = match (first, self.work.take(), counted) {
            (true, _, w) => w,
            (false, Some(sum), Some(w)) => Some(work::Work {
                syscalls: sum.syscalls + w.syscalls,
                switches: sum.switches + w.switches,
            }),
            _ => None,
        };
    }

    /// The runs as one figure (medians and ranges, see [`Latency::combined`]).
    pub fn latency(&self) -> Option<Latency> {
        Latency::combined(&self.runs)
    }

    /// A per-request (or per-connection) share of a total, NaN before any request.
    pub fn per_request(&self, total: f64) -> f64 {
        if self.requests > 0.0 {
            total / self.requests
        } else {
            f64::NAN
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(syscalls: f64) -> Option<work::Work> {
        Some(work::Work {
            syscalls,
            switches: syscalls / 10.0,
        })
    }

    #[test]
    fn counts_add_up_only_when_every_run_was_counted() {
        let mut t = Tally::default();
        t.add_work(w(100.0), true);
        t.add_work(w(50.0), true);
        let sum = t.work.as_ref().expect("both runs counted");
        assert_eq!((sum.syscalls, sum.switches), (150.0, 15.0));
        t.add_work(None, true);
        t.add_work(w(10.0), true);
        assert!(t.work.is_none(), "a run without counts spoils the sum");

        let mut uncounted = Tally::default();
        uncounted.add_work(None, false);
        assert!(uncounted.work.is_none());
        assert!(uncounted.per_request(1.0).is_nan());
        uncounted.requests = 4.0;
        assert_eq!(uncounted.per_request(2.0), 0.5);
    }
}
