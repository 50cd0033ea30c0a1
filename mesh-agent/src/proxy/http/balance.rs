//! Per-request load balancing: power of two choices over peak-EWMA latency, as
//! Linkerd does. Each endpoint keeps a moving average of its response latency that
//! jumps up at once to a slower sample (the "peak") and decays back over `DECAY`;
//! its cost is that average times one plus its requests in flight. For every request
//! two distinct endpoints are drawn at random and the cheaper one is taken, which
//! spreads load almost as well as looking at all of them, at O(1).
//!
//! An endpoint that has not answered yet costs nothing while idle (so a new endpoint
//! is tried at once rather than starved by fast old ones) and `DEFAULT_RTT` per
//! request in flight.
//!
//! Locality: when some of the endpoints are pods on this node and at least one of
//! them is healthy (no failed request in the last [`UNHEALTHY_FOR`]), the choice is
//! made among those alone; otherwise among all. Same-node delivery skips the tunnel
//! (no encryption, no second agent), so it is preferred whenever it can answer.
//!
//! The state lives in `Loads`, keyed by endpoint address and shared by every route
//! and connection of the agent, so it survives config generations.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use rand::Rng;

/// The latency an endpoint is assumed to have before it has answered (Linkerd's).
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// How fast a past latency is forgotten (Linkerd's).
pub const DECAY: Duration = Duration::from_secs(10);
/// How long a failed request keeps a same-node endpoint from being preferred.
pub const UNHEALTHY_FOR: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Ewma {
    /// Nanoseconds.
    cost: f64,
    stamp: Instant,
    /// Has answered at least once.
    observed: bool,
    /// The last failed request.
    failed_at: Option<Instant>,
}

#[derive(Debug)]
pub struct EndpointLoad {
    ewma: Mutex<Ewma>,
    pending: AtomicUsize,
}

impl EndpointLoad {
    fn new(now: Instant) -> EndpointLoad {
        EndpointLoad {
            ewma: Mutex::new(Ewma {
                cost: DEFAULT_RTT.as_nanos() as f64,
                stamp: now,
                observed: false,
                failed_at: None,
            }),
            pending: AtomicUsize::new(0),
        }
    }

    /// The cost to compare: the decayed latency times (1 + in flight).
    pub fn cost(&self, now: Instant) -> f64 {
        let pending = self.pending.load(Ordering::Acquire) as f64;
        let e = self.ewma.lock().unwrap_or_else(|p| p.into_inner());
        if !e.observed {
            return e.cost * pending;
        }
        decayed(e.cost, now.saturating_duration_since(e.stamp)) * (pending + 1.0)
    }

    /// No request to it failed in the last [`UNHEALTHY_FOR`].
    pub fn healthy(&self, now: Instant) -> bool {
        let e = self.ewma.lock().unwrap_or_else(|p| p.into_inner());
        e.failed_at
            .is_none_or(|t| now.saturating_duration_since(t) >= UNHEALTHY_FOR)
    }

    fn mark_failed(&self, now: Instant) {
        self.ewma
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .failed_at = Some(now);
    }

    /// Records one answer's latency.
    pub fn observe(&self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        let mut e = self.ewma.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(e.stamp);
        e.cost = if !e.observed || rtt > e.cost {
            // The peak: a slower sample counts at once.
            rtt
        } else {
            let w = (-(elapsed.as_secs_f64()) / DECAY.as_secs_f64()).exp();
            e.cost * w + rtt * (1.0 - w)
        };
        e.stamp = now;
        e.observed = true;
    }
}

/// A decayed average with no new sample: it drifts toward zero so an endpoint that
/// was once slow is tried again.
fn decayed(cost: f64, elapsed: Duration) -> f64 {
    cost * (-(elapsed.as_secs_f64()) / DECAY.as_secs_f64()).exp()
}

/// A request in flight on one endpoint; records its latency when it ends well.
pub struct InFlight {
    load: Arc<EndpointLoad>,
    start: Instant,
}

impl InFlight {
    /// The response headers came: record the latency.
    pub fn done(self) {
        self.load.observe(self.start.elapsed(), Instant::now());
    }

    /// The endpoint failed: penalize it as if it took the whole default RTT times
    /// ten, so the next draws avoid it for a while.
    pub fn failed(self) {
        let now = Instant::now();
        self.load.observe(DEFAULT_RTT * 10, now);
        self.load.mark_failed(now);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.load.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Default)]
pub struct Loads {
    by_addr: Mutex<HashMap<SocketAddr, Arc<EndpointLoad>>>,
}

/// Endpoints kept beyond this are forgotten when idle (pruned on insert).
const MAX_TRACKED: usize = 65_536;

impl Loads {
    fn get(&self, addr: SocketAddr, now: Instant) -> Arc<EndpointLoad> {
        let mut map = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_TRACKED && !map.contains_key(&addr) {
            map.retain(|_, l| Arc::strong_count(l) > 1);
        }
        map.entry(addr)
            .or_insert_with(|| Arc::new(EndpointLoad::new(now)))
            .clone()
    }

    /// Picks one of `endpoints` (P2C over peak-EWMA) and counts the request on it.
    pub fn pick(&self, endpoints: &[SocketAddr]) -> Option<(SocketAddr, InFlight)> {
        let now = Instant::now();
        let chosen = match endpoints.len() {
            0 => return None,
            1 => endpoints[0],
            n => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..n);
                let mut b = rng.random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (ea, eb) = (endpoints[a], endpoints[b]);
                if self.get(eb, now).cost(now) < self.get(ea, now).cost(now) {
                    eb
                } else {
                    ea
                }
            }
        };
        let load = self.get(chosen, now);
        load.pending.fetch_add(1, Ordering::AcqRel);
        Some((chosen, InFlight { load, start: now }))
    }

    /// `pick`, among the healthy same-node endpoints when there are any.
    pub fn pick_near(
        &self,
        endpoints: &[SocketAddr],
        on_this_node: impl Fn(&SocketAddr) -> bool,
    ) -> Option<(SocketAddr, InFlight)> {
        let now = Instant::now();
        let near = preferred(endpoints, on_this_node, |e| self.get(*e, now).healthy(now));
        self.pick(near.as_deref().unwrap_or(endpoints))
    }

    /// Forgets endpoints no request is using and that are not in `keep`.
    pub fn retain(&self, keep: impl Fn(&SocketAddr) -> bool) {
        self.by_addr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|a, l| keep(a) || Arc::strong_count(l) > 1);
    }
}

/// The healthy same-node endpoints, if there are any (else every endpoint is a
/// candidate: `None`).
pub fn preferred(
    endpoints: &[SocketAddr],
    on_this_node: impl Fn(&SocketAddr) -> bool,
    healthy: impl Fn(&SocketAddr) -> bool,
) -> Option<Vec<SocketAddr>> {
    if !endpoints.iter().any(&on_this_node) {
        return None;
    }
    let near: Vec<SocketAddr> = endpoints
        .iter()
        .filter(|e| on_this_node(e) && healthy(e))
        .copied()
        .collect();
    (!near.is_empty()).then_some(near)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_same_node_endpoints_come_first_then_any() {
        let eps = addrs(4);
        let near = |e: &SocketAddr| e.port() < 8002;
        assert_eq!(preferred(&eps, near, |_| true), Some(eps[..2].to_vec()));
        assert_eq!(
            preferred(&eps, near, |e| e.port() != 8000),
            Some(vec![eps[1]])
        );
        assert_eq!(preferred(&eps, near, |e| e.port() >= 8002), None);
        assert_eq!(preferred(&eps, |_| false, |_| true), None);
        // A failure takes a same-node endpoint out of the preference for a while.
        let loads = Loads::default();
        let (ep, f) = loads.pick_near(&eps, near).unwrap();
        assert!(near(&ep));
        f.failed();
        for _ in 0..50 {
            let (e, _f) = loads.pick_near(&eps, near).unwrap();
            assert_ne!(e, ep, "a failed endpoint was preferred again at once");
        }
    }

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 0, 0, 1], 8000 + i)))
            .collect()
    }

    #[test]
    fn a_slow_endpoint_gets_far_fewer_requests() {
        let loads = Loads::default();
        let eps = addrs(3);
        let mut count: HashMap<SocketAddr, usize> = HashMap::new();
        for _ in 0..3000 {
            let (ep, f) = loads.pick(&eps).unwrap();
            *count.entry(ep).or_default() += 1;
            // eps[0] answers in 100 ms, the others in 1 ms.
            let rtt = if ep == eps[0] {
                Duration::from_millis(100)
            } else {
                Duration::from_millis(1)
            };
            f.load.observe(rtt, Instant::now());
        }
        let slow = count.get(&eps[0]).copied().unwrap_or(0);
        let fast = count.get(&eps[1]).copied().unwrap_or(0);
        assert!(slow * 10 < fast, "slow {slow}, fast {fast}: {count:?}");
        // The slow one is still tried now and then (it may recover).
        assert!(slow > 0, "{count:?}");
    }

    #[test]
    fn equal_endpoints_share_evenly_and_in_flight_counts() {
        let loads = Loads::default();
        let eps = addrs(3);
        let mut count: HashMap<SocketAddr, usize> = HashMap::new();
        for _ in 0..3000 {
            let (ep, f) = loads.pick(&eps).unwrap();
            *count.entry(ep).or_default() += 1;
            f.load.observe(Duration::from_millis(1), Instant::now());
        }
        for ep in &eps {
            let n = count.get(ep).copied().unwrap_or(0);
            assert!((700..1300).contains(&n), "{count:?}");
        }
        // Requests held open on one endpoint push the others ahead.
        let held: Vec<_> = (0..20).map(|_| loads.pick(&eps[..1]).unwrap().1).collect();
        let picks: Vec<_> = (0..50).map(|_| loads.pick(&eps).unwrap().0).collect();
        assert!(
            picks.iter().filter(|p| **p == eps[0]).count() < 5,
            "{picks:?}"
        );
        drop(held);
        assert_eq!(loads.pick(&[]).map(|p| p.0), None);
    }

    #[test]
    fn the_peak_counts_at_once_and_decays_over_time() {
        let t0 = Instant::now();
        let l = EndpointLoad::new(t0);
        l.observe(Duration::from_millis(500), t0);
        assert!((l.cost(t0) - 500e6).abs() < 1.0);
        let later = t0 + DECAY;
        let c = l.cost(later);
        assert!(c < 500e6 * 0.4 && c > 500e6 * 0.3, "{c}");
    }
}
