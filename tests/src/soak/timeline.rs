//! When each fault is injected during a soak: a pure schedule, so its spacing is
//! tested without a cluster.
use std::time::Duration;

/// One step of an injection. Faults with a duration have a start and an end event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// A new agent takes over on the client node (a hitless restart or upgrade).
    RestartClientNodeAgent,
    CaDown,
    CaUp,
    /// SIGSTOP the server node's agent; SIGCONT at the thaw.
    FreezePeerAgent,
    ThawPeerAgent,
    /// The next short-lived pod's netns is deleted while the config still lists it.
    DeleteNetns,
    /// A file the agents cannot parse appears in the config directory, then goes.
    BreakConfig,
    FixConfig,
}

pub const CA_DOWN: Duration = Duration::from_secs(30);
pub const FREEZE: Duration = Duration::from_secs(10);
pub const BROKEN_CONFIG: Duration = Duration::from_secs(20);
/// Below this the faults would overlap.
pub const SHORTEST_RUN: Duration = Duration::from_secs(180);

/// Every event, in order, with its time from the start of the run. Faults are spread
/// over the run, one at a time, so each one's effect is seen on its own and the run
/// ends with time to show that everything recovered.
pub fn schedule(run: Duration) -> Vec<(Duration, Event)> {
    let at = |fraction: f64| run.mul_f64(fraction);
    let mut events = vec![
        (at(0.10), Event::RestartClientNodeAgent),
        (at(0.25), Event::CaDown),
        (at(0.25) + CA_DOWN, Event::CaUp),
        (at(0.45), Event::FreezePeerAgent),
        (at(0.45) + FREEZE, Event::ThawPeerAgent),
        (at(0.60), Event::DeleteNetns),
        (at(0.75), Event::BreakConfig),
        (at(0.75) + BROKEN_CONFIG, Event::FixConfig),
    ];
    events.sort_by_key(|(t, _)| *t);
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_come_one_at_a_time_inside_the_run_in_order() {
        for minutes in [3, 10, 60] {
            let run = Duration::from_secs(minutes * 60);
            let events = schedule(run);
            assert_eq!(events.len(), 8);
            assert!(events.windows(2).all(|w| w[0].0 < w[1].0), "{events:?}");
            // A fault ends before the next begins, and the last ends well before
            // the run does.
            let open = [Event::CaDown, Event::FreezePeerAgent, Event::BreakConfig];
            for (i, (t, e)) in events.iter().enumerate() {
                if open.contains(e) {
                    assert!(
                        !open.contains(&events[i + 1].1),
                        "{e:?} at {t:?} overlaps the next fault"
                    );
                }
            }
            let last = events.last().unwrap();
            assert_eq!(last.1, Event::FixConfig);
            assert!(run - last.0 >= Duration::from_secs(20), "{minutes} min");
        }
    }

    #[test]
    fn the_shortest_run_keeps_a_gap_between_faults() {
        let events = schedule(SHORTEST_RUN);
        for w in events.windows(2) {
            assert!(w[1].0 - w[0].0 >= Duration::from_secs(5), "{events:?}");
        }
    }
}
