//! Bounds on what a peer can hold open: a global cap and a cap per key (a pod, a
//! source address), and the fd budget they are cut from. A connection over either cap
//! is closed at once, so a flood costs the agent one accept per attempt and nothing it
//! keeps; the connections already admitted, and other pods', are not disturbed.
use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// Caps on concurrent connections, in total and per key.
pub struct ConnLimits<K: Eq + Hash + Clone> {
    name: &'static str,
    global: usize,
    per_key: usize,
    state: Mutex<State<K>>,
}

struct State<K> {
    total: usize,
    by_key: HashMap<K, usize>,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("{name}: {limit} connections open in total")]
    Global { name: &'static str, limit: usize },
    #[error("{name}: {limit} connections open from one source")]
    PerKey { name: &'static str, limit: usize },
}

impl LimitError {
    pub fn reason(&self) -> &'static str {
        match self {
            LimitError::Global { .. } => "global_connection_limit",
            LimitError::PerKey { .. } => "source_connection_limit",
        }
    }
}

/// An admitted connection; its slot is given back on drop.
pub struct ConnPermit<K: Eq + Hash + Clone> {
    limits: Arc<ConnLimits<K>>,
    key: K,
}

impl<K: Eq + Hash + Clone> ConnLimits<K> {
    pub fn new(name: &'static str, global: usize, per_key: usize) -> Arc<Self> {
        Arc::new(ConnLimits {
            name,
            global: global.max(1),
            per_key: per_key.clamp(1, global.max(1)),
            state: Mutex::new(State {
                total: 0,
                by_key: HashMap::new(),
            }),
        })
    }

    /// A slot for one more connection of `key`, if both caps allow it.
    pub fn try_admit(self: &Arc<Self>, key: K) -> Result<ConnPermit<K>, LimitError> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.total >= self.global {
            return Err(LimitError::Global {
                name: self.name,
                limit: self.global,
            });
        }
        let n = s.by_key.entry(key.clone()).or_insert(0);
        if *n >= self.per_key {
            return Err(LimitError::PerKey {
                name: self.name,
                limit: self.per_key,
            });
        }
        *n += 1;
        s.total += 1;
        Ok(ConnPermit {
            limits: self.clone(),
            key,
        })
    }

    /// Connections admitted and still open.
    pub fn open(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl<K: Eq + Hash + Clone> Drop for ConnPermit<K> {
    fn drop(&mut self) {
        let mut s = self.limits.state.lock().unwrap_or_else(|p| p.into_inner());
        s.total = s.total.saturating_sub(1);
        if let Some(n) = s.by_key.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                // Keys come from peers: an empty entry must not stay behind.
                s.by_key.remove(&self.key);
            }
        }
    }
}

/// How the agent's file descriptors are shared out. The node listeners (metrics,
/// readiness) get a small fixed share and the data path the rest, minus a reserve for
/// what the agent itself opens (pod listeners, config files, eBPF objects, the admin
/// socket), so no flood of one kind can starve another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    /// Concurrent connections of the node's metrics and readiness listeners together.
    pub node_listeners: usize,
    /// Concurrent data-path connections (each costs the agent about two fds).
    pub data_path: usize,
}

/// Descriptors never handed to connections.
pub const FD_RESERVE: usize = 512;
/// Connections of the metrics and readiness listeners, together.
pub const NODE_LISTENER_CONNS: usize = 256;

impl FdBudget {
    /// The split for an fd limit of `nofile`.
    pub fn for_limit(nofile: usize) -> FdBudget {
        let node_listeners = NODE_LISTENER_CONNS.min(nofile / 8).max(1);
        let left = nofile.saturating_sub(FD_RESERVE + node_listeners);
        FdBudget {
            node_listeners,
            data_path: (left / 2).max(1),
        }
    }
}

/// The process's open-file limit (soft), as raised at start.
pub fn nofile() -> usize {
    use nix::sys::resource::{Resource, getrlimit};
    getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft as usize)
}

/// Raises the soft open-file limit to the hard one: every connection costs fds, and
/// the default soft limit of 1024 would cap the agent (or the CA) near 500.
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, "cannot raise the open file limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open file limit"),
    }
}

/// A warning that says how often it happened instead of saying it every time: at most
/// one line per `every`, carrying the count since the last one.
pub struct Throttle {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    pub const fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// Counts one event; returns how many happened since the last report when it is
    /// time to report again.
    pub fn hit(&self) -> Option<u64> {
        self.hit_at(Instant::now())
    }

    fn hit_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.1 += 1;
        let due =
            s.0.is_none_or(|last| now.duration_since(last) >= self.every);
        if due {
            let n = s.1;
            *s = (Some(now), 0);
            Some(n)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_cannot_take_more_than_its_share_nor_all_keys_more_than_the_total() {
        let l = ConnLimits::new("t", 3, 2);
        let a1 = l.try_admit("a").unwrap();
        let _a2 = l.try_admit("a").unwrap();
        assert_eq!(
            l.try_admit("a").err(),
            Some(LimitError::PerKey {
                name: "t",
                limit: 2
            })
        );
        let _b1 = l.try_admit("b").unwrap();
        assert_eq!(
            l.try_admit("c").err(),
            Some(LimitError::Global {
                name: "t",
                limit: 3
            })
        );
        drop(a1);
        assert_eq!(l.open(), 2);
        let _c1 = l.try_admit("c").unwrap();
    }

    #[test]
    fn released_keys_leave_nothing_behind() {
        let l = ConnLimits::new("t", 100, 10);
        for i in 0..50 {
            drop(l.try_admit(i).unwrap());
        }
        assert_eq!(l.open(), 0);
        assert!(l.state.lock().unwrap().by_key.is_empty());
    }

    #[test]
    fn the_fd_budget_keeps_a_reserve_and_bounds_the_node_listeners() {
        let b = FdBudget::for_limit(20_000);
        assert_eq!(b.node_listeners, NODE_LISTENER_CONNS);
        assert!(b.node_listeners + 2 * b.data_path + FD_RESERVE <= 20_000);
        let small = FdBudget::for_limit(1024);
        assert!(small.node_listeners <= 128);
        assert!(small.data_path >= 1);
    }

    #[test]
    fn a_throttled_warning_reports_the_count_once_per_period() {
        let t = Throttle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(t.hit_at(t0), Some(1));
        for _ in 0..99 {
            assert_eq!(t.hit_at(t0 + Duration::from_secs(1)), None);
        }
        assert_eq!(t.hit_at(t0 + Duration::from_secs(11)), Some(100));
    }
}
