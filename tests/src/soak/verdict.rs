//! Whether a soak passed: pure judgements over what it recorded, unit-tested here.
use std::collections::BTreeMap;

use super::procfs::Usage;

/// A stretch of the run during which one node's agent was stopped (SIGSTOP): a new
/// connection that involves that node may fail then, and only then. Or, with the
/// node [`CA`], during which the CA was down (and until a certificate request's
/// longest back-off after it came back): a pod that started then has no certificate,
/// so its own new connections may fail, and only its.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Window {
    pub node: String,
    pub from_ms: u64,
    pub to_ms: u64,
}

/// The node name of a CA outage window.
pub const CA: &str = "ca";

/// A new connection that failed: when (ms from the start of the soak), between which
/// nodes, and why; and whether its pod started while the CA was down.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    pub at_ms: u64,
    pub from_node: String,
    pub to_node: String,
    pub error: String,
    pub pod_born_without_ca: bool,
}

/// A failure is excused only while an agent it depends on (the source's or the
/// destination's) was stopped, or when its pod could not have a certificate yet.
pub fn excused(f: &Failure, windows: &[Window]) -> bool {
    windows.iter().any(|w| {
        let involved = if w.node == CA {
            f.pod_born_without_ca
        } else {
            w.node == f.from_node || w.node == f.to_node
        };
        involved && (w.from_ms..=w.to_ms).contains(&f.at_ms)
    })
}

/// The kind of an error, for the report's errors-by-kind table.
pub fn kind(error: &str) -> &'static str {
    let e = error.to_ascii_lowercase();
    if e.contains("timed out") {
        "timeout"
    } else if e.contains("refused") {
        "refused"
    } else if e.contains("reset") {
        "reset"
    } else if e.contains("differs") {
        "corrupted"
    } else if e.contains("more than sent") {
        "extra bytes"
    } else if e.contains("broken pipe") {
        "broken pipe"
    } else if e.contains("eof") || e.contains("empty answer") {
        "closed early"
    } else {
        "other"
    }
}

/// Counts per kind.
pub fn by_kind<'a>(errors: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for e in errors {
        *m.entry(kind(e).to_owned()).or_insert(0) += 1;
    }
    m
}

/// Descriptors an idle agent may hold beyond its idle count before the start: none.
/// Every connection, tunnel and pod listener of the run is gone once the load is.
pub const FD_SLACK: u64 = 0;

/// The descriptors an agent holds, split: its pre-made spare sockets (a bounded pool
/// per pod network namespace, see `procfs::spare_sockets`) and everything else.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Held {
    pub fds: u64,
    pub spare_sockets: u64,
}

/// A leak of descriptors: once the load is gone and its pools have idled out, the
/// node's agent holds more than before the load (spare sockets apart), or more spare
/// sockets than their bound.
pub fn fd_leak(node: &str, before: Held, after: Held, spare_bound: u64) -> Option<String> {
    let (b, a) = (
        before.fds.saturating_sub(before.spare_sockets),
        after.fds.saturating_sub(after.spare_sockets),
    );
    if a > b + FD_SLACK {
        return Some(format!(
            "{node}: {a} descriptors held after the run, {b} before it (spare sockets apart)"
        ));
    }
    (after.spare_sockets > spare_bound).then(|| {
        format!(
            "{node}: {} spare sockets, more than their bound {spare_bound}",
            after.spare_sockets
        )
    })
}

/// Memory that keeps growing under a steady load: the node's anonymous memory in the
/// last fifth of the loaded run against its peak in the second fifth (after the
/// connections opened and the buffers warmed). Allowed: 10% and 8 MiB, for allocator
/// noise and the certificates and config that churn.
pub fn memory_growth(node: &str, samples: &[(u64, Usage)], run_ms: u64) -> Option<String> {
    let peak = |from: f64, to: f64| {
        samples
            .iter()
            .filter(|(t, _)| {
                (*t as f64) >= run_ms as f64 * from && (*t as f64) < run_ms as f64 * to
            })
            .map(|(_, u)| u.anon_kib)
            .max()
    };
    let (Some(warm), Some(late)) = (peak(0.2, 0.4), peak(0.8, 1.0)) else {
        return Some(format!("{node}: too few samples to judge memory"));
    };
    let allowed = warm + warm / 10 + 8 * 1024;
    (late > allowed).then(|| {
        format!(
            "{node}: anonymous memory grew under steady load: {late} KiB at the end, \
             {warm} KiB peak after warm-up (allowed {allowed} KiB)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(at_ms: u64, from: &str, to: &str) -> Failure {
        Failure {
            at_ms,
            from_node: from.into(),
            to_node: to.into(),
            error: "timed out".into(),
            pod_born_without_ca: false,
        }
    }

    #[test]
    fn only_failures_inside_a_stop_of_an_agent_they_need_are_excused() {
        let w = [Window {
            node: "node-2".into(),
            from_ms: 1000,
            to_ms: 2000,
        }];
        assert!(excused(&failure(1500, "node-1", "node-2"), &w));
        assert!(excused(&failure(1000, "node-2", "node-1"), &w));
        assert!(excused(&failure(2000, "node-2", "node-2"), &w));
        // Outside the window, or between two nodes that both kept running.
        assert!(!excused(&failure(2001, "node-1", "node-2"), &w));
        assert!(!excused(&failure(999, "node-1", "node-2"), &w));
        assert!(!excused(&failure(1500, "node-1", "node-1"), &w));
        assert!(!excused(&failure(1500, "node-1", "node-2"), &[]));
    }

    #[test]
    fn a_ca_outage_excuses_only_pods_that_started_in_it() {
        let w = [Window {
            node: CA.into(),
            from_ms: 1000,
            to_ms: 2000,
        }];
        let old_pod = failure(1500, "node-1", "node-2");
        assert!(!excused(&old_pod, &w));
        let new_pod = Failure {
            pod_born_without_ca: true,
            ..old_pod
        };
        assert!(excused(&new_pod, &w));
        assert!(!excused(
            &Failure {
                at_ms: 2500,
                ..new_pod
            },
            &w
        ));
    }

    #[test]
    fn errors_are_counted_by_kind() {
        let m = by_kind([
            "connect 10.96.0.80:80: Connection refused (os error 111)",
            "timed out",
            "read the echo: Connection reset by peer (os error 104)",
            "the echo differs at byte offset 512",
            "read the echo: early eof",
            "something else",
            "timed out",
        ]);
        assert_eq!(m["timeout"], 2);
        assert_eq!(m["refused"], 1);
        assert_eq!(m["reset"], 1);
        assert_eq!(m["corrupted"], 1);
        assert_eq!(m["closed early"], 1);
        assert_eq!(m["other"], 1);
    }

    fn u(fds: u64, anon_kib: u64) -> Usage {
        Usage {
            fds,
            rss_kib: anon_kib * 2,
            anon_kib,
        }
    }

    fn held(fds: u64, spare_sockets: u64) -> Held {
        Held { fds, spare_sockets }
    }

    #[test]
    fn one_descriptor_more_after_the_run_is_a_leak_spare_sockets_apart() {
        assert!(fd_leak("node-1", held(40, 0), held(40, 0), 16).is_none());
        assert!(fd_leak("node-1", held(40, 0), held(38, 0), 16).is_none());
        let leak = fd_leak("node-1", held(40, 0), held(41, 0), 16).unwrap();
        assert!(
            leak.contains("41 descriptors") && leak.contains("40 before"),
            "{leak}"
        );
        // Spare sockets made during the run are not a leak, up to their bound.
        assert!(fd_leak("node-1", held(40, 0), held(52, 12), 16).is_none());
        assert!(fd_leak("node-1", held(40, 0), held(53, 12), 16).is_some());
        let over = fd_leak("node-1", held(40, 0), held(57, 17), 16).unwrap();
        assert!(over.contains("17 spare sockets"), "{over}");
    }

    #[test]
    fn memory_that_keeps_growing_fails_and_a_plateau_passes() {
        let run = 100_000;
        let flat: Vec<_> = (0..100)
            .map(|i| (i * 1000, u(10, 50_000 + i % 3)))
            .collect();
        assert!(memory_growth("n", &flat, run).is_none());
        // 1 MiB more every second: about 40 MiB between warm-up and the end.
        let leak: Vec<_> = (0..100)
            .map(|i| (i * 1000, u(10, 50_000 + i * 1024)))
            .collect();
        assert!(memory_growth("n", &leak, run).unwrap().contains("grew"));
        assert!(memory_growth("n", &flat[..10], run).is_some());
    }
}
