//! One writer among the node agents, by a `coordination.k8s.io/v1` Lease, as
//! Kubernetes controllers elect a leader: the holder renews it every few seconds; any
//! other agent takes it over once it has seen no renewal for the lease's duration.
//! Time is measured by each agent's own clock from when it saw the Lease last change,
//! never by comparing the holder's timestamps, so clock skew between nodes cannot
//! make two holders.
//!
//! Used for what must happen once per cluster, not once per node: writing route
//! status. A holder that stops renewing (killed, partitioned) stops acting on its own
//! `renew_deadline` before anyone else's `duration` has run out.
use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{PostParams, ResourceExt as _},
};
use tokio::{sync::watch, time::Instant};
use tracing::{debug, info, warn};

#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    /// This agent (its node's name).
    pub identity: String,
    /// Another agent takes over after seeing no renewal for this long.
    pub duration: Duration,
    /// The holder stops acting when it could not renew for this long (< duration).
    pub renew_deadline: Duration,
    /// How often the Lease is read and renewed.
    pub retry: Duration,
}

impl LeaseSettings {
    pub fn new(namespace: String, name: String, identity: String) -> LeaseSettings {
        LeaseSettings {
            namespace,
            name,
            identity,
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

/// The Lease as last read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub holder: Option<String>,
    pub version: String,
}

/// What to do with the Lease this turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Create,
    Renew,
    TakeOver,
    Follow,
}

/// The decision: `unchanged_for` is how long this agent has seen the Lease without a
/// change (its resourceVersion).
pub fn step(
    me: &str,
    lease: Option<&Observed>,
    unchanged_for: Duration,
    duration: Duration,
) -> Step {
    match lease {
        None => Step::Create,
        Some(l) => match l.holder.as_deref() {
            Some(h) if h == me => Step::Renew,
            None | Some("") => Step::TakeOver,
            Some(_) if unchanged_for >= duration => Step::TakeOver,
            Some(_) => Step::Follow,
        },
    }
}

/// Runs the election for as long as the runtime lives; the receiver says whether
/// this agent holds the Lease now.
pub fn start(client: Client, settings: LeaseSettings) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(run(
        Api::namespaced(client, &settings.namespace),
        settings,
        tx,
    ));
    rx
}

async fn run(api: Api<Lease>, s: LeaseSettings, leader: watch::Sender<bool>) {
    // The version last seen, and when it was first seen.
    let mut seen: Option<(String, Instant)> = None;
    let mut renewed: Option<Instant> = None;
    let mut tick = tokio::time::interval(s.retry);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let observed = match api.get_opt(&s.name).await {
            Ok(lease) => lease,
            Err(e) => {
                debug!(lease = %s.name, error = %e, "cannot read the lease");
                set(&leader, held(renewed, now, &s), &s);
                continue;
            }
        };
        let view = observed.as_ref().map(|l| Observed {
            holder: l.spec.as_ref().and_then(|sp| sp.holder_identity.clone()),
            version: l.resource_version().unwrap_or_default(),
        });
        let unchanged_for = match (&view, &seen) {
            (Some(v), Some((version, since))) if &v.version == version => now - *since,
            (Some(v), _) => {
                seen = Some((v.version.clone(), now));
                Duration::ZERO
            }
            (None, _) => Duration::ZERO,
        };
        let result = match step(&s.identity, view.as_ref(), unchanged_for, s.duration) {
            Step::Follow => {
                renewed = None;
                set(&leader, false, &s);
                continue;
            }
            Step::Create => api
                .create(&PostParams::default(), &lease_of(&s))
                .await
                .map(|_| ()),
            Step::Renew | Step::TakeOver => {
                let Some(mut lease) = observed else { continue };
                let spec = lease.spec.get_or_insert_with(Default::default);
                let taking = spec.holder_identity.as_deref() != Some(s.identity.as_str());
                let now_ts = MicroTime(Timestamp::now());
                if taking {
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                    spec.acquire_time = Some(now_ts.clone());
                    spec.holder_identity = Some(s.identity.clone());
                }
                spec.lease_duration_seconds = Some(s.duration.as_secs() as i32);
                spec.renew_time = Some(now_ts);
                // The replace carries the resourceVersion read: a write by anyone
                // else since then makes it fail (409), and nobody holds it twice.
                api.replace(&s.name, &PostParams::default(), &lease)
                    .await
                    .map(|_| ())
            }
        };
        match result {
            Ok(()) => {
                if renewed.is_none() {
                    info!(lease = %s.name, identity = %s.identity, "holding the lease: this agent writes route status");
                }
                renewed = Some(now);
            }
            Err(e) => debug!(lease = %s.name, error = %e, "lease not taken or renewed"),
        }
        set(&leader, held(renewed, Instant::now(), &s), &s);
    }
}

fn held(renewed: Option<Instant>, now: Instant, s: &LeaseSettings) -> bool {
    renewed.is_some_and(|t| now - t < s.renew_deadline)
}

fn set(leader: &watch::Sender<bool>, now: bool, s: &LeaseSettings) {
    leader.send_if_modified(|was| {
        if *was == now {
            return false;
        }
        if !now {
            warn!(lease = %s.name, "no longer holding the lease");
        }
        *was = now;
        true
    });
}

fn lease_of(s: &LeaseSettings) -> Lease {
    let now = MicroTime(Timestamp::now());
    Lease {
        metadata: ObjectMeta {
            name: Some(s.name.clone()),
            namespace: Some(s.namespace.clone()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(s.identity.clone()),
            lease_duration_seconds: Some(s.duration.as_secs() as i32),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: Some(0),
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(h: Option<&str>) -> Observed {
        Observed {
            holder: h.map(str::to_owned),
            version: "7".into(),
        }
    }

    #[test]
    fn one_holder_renews_and_others_wait_out_the_duration() {
        let d = Duration::from_secs(15);
        assert_eq!(step("a", None, Duration::ZERO, d), Step::Create);
        assert_eq!(
            step("a", Some(&held_by(Some("a"))), Duration::ZERO, d),
            Step::Renew
        );
        // Even a holder whose lease looks stale to itself renews it.
        assert_eq!(step("a", Some(&held_by(Some("a"))), d * 2, d), Step::Renew);
        assert_eq!(
            step("b", Some(&held_by(Some("a"))), Duration::ZERO, d),
            Step::Follow
        );
        assert_eq!(
            step(
                "b",
                Some(&held_by(Some("a"))),
                d - Duration::from_millis(1),
                d
            ),
            Step::Follow
        );
        assert_eq!(step("b", Some(&held_by(Some("a"))), d, d), Step::TakeOver);
        // A released lease is free at once.
        assert_eq!(
            step("b", Some(&held_by(None)), Duration::ZERO, d),
            Step::TakeOver
        );
        assert_eq!(
            step("b", Some(&held_by(Some(""))), Duration::ZERO, d),
            Step::TakeOver
        );
    }

    #[test]
    fn a_holder_that_cannot_renew_stops_before_another_may_take_over() {
        let s = LeaseSettings::new("mesh-system".into(), "l".into(), "a".into());
        assert!(s.renew_deadline < s.duration);
        let t = Instant::now();
        assert!(held(Some(t), t + Duration::from_secs(9), &s));
        assert!(!held(Some(t), t + s.renew_deadline, &s));
        assert!(!held(None, t, &s));
    }
}
