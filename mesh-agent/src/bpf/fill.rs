//! How full the bounded maps are, and when that deserves a word: a pure judgement
//! (unit-tested here) over counts the agent reads (`MeshMaps::fill`).
use super::sizes::Sized;

/// A map is reported from this share of its size on: early enough to raise
/// `--bpf-map-size` before anything is turned away.
pub const WARN_PERCENT: u64 = 80;
/// ... and reported as back to normal only below this, so a map hovering around 80%
/// does not log every sample.
pub const CLEAR_PERCENT: u64 = 70;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapFill {
    pub map: Sized,
    pub entries: u64,
    pub capacity: u64,
    /// Entries the agent wanted to write and had no room for (services, backends).
    pub left_out: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Normal,
    /// At or above [`WARN_PERCENT`].
    High,
    /// No room for another entry.
    Full,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Normal => "ok",
            Level::High => "high",
            Level::Full => "full",
        }
    }
}

impl MapFill {
    pub fn percent(&self) -> u64 {
        self.entries.saturating_mul(100) / self.capacity.max(1)
    }

    /// The level now, given the level at the last sample (for the hysteresis).
    /// Anything left out means full, whatever the map holds now.
    pub fn level(&self, before: Level) -> Level {
        let p = self.percent();
        if self.entries >= self.capacity || self.left_out > 0 {
            Level::Full
        } else if p >= WARN_PERCENT || (before != Level::Normal && p >= CLEAR_PERCENT) {
            Level::High
        } else {
            Level::Normal
        }
    }
}

/// Whether going from `before` to `now` is worth a log line: every rise, and the
/// return to normal.
pub fn worth_logging(before: Level, now: Level) -> bool {
    now != before
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(entries: u64, capacity: u64) -> MapFill {
        MapFill {
            map: Sized::Services,
            entries,
            capacity,
            left_out: 0,
        }
    }

    #[test]
    fn levels_rise_at_80_percent_and_at_the_bound() {
        assert_eq!(fill(0, 100).level(Level::Normal), Level::Normal);
        assert_eq!(fill(79, 100).level(Level::Normal), Level::Normal);
        assert_eq!(fill(80, 100).level(Level::Normal), Level::High);
        assert_eq!(fill(99, 100).level(Level::Normal), Level::High);
        assert_eq!(fill(100, 100).level(Level::Normal), Level::Full);
        // A count above the size (a sockhash counted while it changes) is full.
        assert_eq!(fill(101, 100).level(Level::High), Level::Full);
        assert_eq!(fill(3, 0).level(Level::Normal), Level::Full);
        // Entries left out: full, even while the map itself has room.
        let left_out = MapFill {
            left_out: 4,
            ..fill(10, 100)
        };
        assert_eq!(left_out.level(Level::Normal), Level::Full);
    }

    #[test]
    fn a_map_hovering_at_the_threshold_does_not_flap() {
        assert_eq!(fill(75, 100).level(Level::High), Level::High);
        assert_eq!(fill(70, 100).level(Level::Full), Level::High);
        assert_eq!(fill(69, 100).level(Level::High), Level::Normal);
        assert!(!worth_logging(Level::High, Level::High));
        assert!(worth_logging(Level::Normal, Level::High));
        assert!(worth_logging(Level::High, Level::Full));
        assert!(worth_logging(Level::Full, Level::Normal));
    }
}
