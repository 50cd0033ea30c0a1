//! How many entries each bounded map holds: the built-in defaults
//! (`mesh_common::limits`), or what the operator set with `--bpf-map-size NAME=N`
//! (a large cluster needs more services; a test needs a bound it can reach). The
//! sizes are part of the pinned layout: an agent with other sizes starts from new maps.
use mesh_common::{limits, maps};

/// A map (or a group of maps sized together) an operator can size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sized {
    /// Service ports (ClusterIP, port) the kernel knows: for fail-open and counters.
    Services,
    /// Ready endpoints of fail-open services, in total.
    Backends,
    /// Original destinations between a captured connect() and the agent's accept().
    OrigDst,
    /// Sockets in the sockmap (two per accelerated hop), and their side maps.
    Sockets,
    /// Enrolled pods (network namespaces) on the node.
    Pods,
}

impl Sized {
    pub const ALL: [Sized; 5] = [
        Sized::Services,
        Sized::Backends,
        Sized::OrigDst,
        Sized::Sockets,
        Sized::Pods,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Sized::Services => "services",
            Sized::Backends => "backends",
            Sized::OrigDst => "orig-dst",
            Sized::Sockets => "sockets",
            Sized::Pods => "pods",
        }
    }

    fn default_entries(self) -> u32 {
        match self {
            Sized::Services => limits::SERVICES,
            Sized::Backends => limits::BACKENDS,
            Sized::OrigDst => limits::PEER_ORIG_DST,
            Sized::Sockets => limits::SOCKETS,
            Sized::Pods => limits::ENROLLED_NETNS,
        }
    }

    /// The kernel maps this size applies to, each with its entries for `n`.
    fn maps(self, n: u32) -> Vec<(&'static str, u32)> {
        match self {
            Sized::Services => vec![(maps::SERVICES, n)],
            Sized::Backends => vec![(maps::BACKENDS, n)],
            Sized::OrigDst => vec![(maps::PEER_ORIG_DST, n)],
            Sized::Sockets => vec![
                (maps::SOCKETS, n),
                (maps::SOCK_IDS, n),
                (maps::SOCK_UNREAD, n),
                (maps::SOCK_SENDING, n),
            ],
            // Two plaintext listeners (IPv4, IPv6) per pod.
            Sized::Pods => vec![
                (maps::ENROLLED_NETNS, n),
                (maps::PLAINTEXT_LISTENERS, n.saturating_mul(2)),
            ],
        }
    }
}

/// The smallest and largest size accepted: below 16 nothing useful fits; above 4M
/// entries a map's memory (tens of bytes per entry, preallocated for hash maps) is
/// more than a node agent should pin.
pub const MIN: u32 = 16;
pub const MAX: u32 = 1 << 22;

/// One `--bpf-map-size` argument: `NAME=ENTRIES`.
pub fn parse(arg: &str) -> Result<(Sized, u32), String> {
    let (name, n) = arg
        .split_once('=')
        .ok_or_else(|| format!("{arg:?}: expected NAME=ENTRIES, e.g. services=131072"))?;
    let names = || {
        Sized::ALL
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let which = Sized::ALL
        .into_iter()
        .find(|s| s.name() == name.trim())
        .ok_or_else(|| format!("{name:?} is not a sized map (one of: {})", names()))?;
    let n: u32 = n
        .trim()
        .parse()
        .map_err(|_| format!("{name}: {n:?} is not a number of entries"))?;
    if !(MIN..=MAX).contains(&n) {
        return Err(format!("{name}: {n} entries is outside {MIN}..={MAX}"));
    }
    Ok((which, n))
}

/// The size of every sized map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSizes {
    entries: [u32; 5],
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            entries: Sized::ALL.map(Sized::default_entries),
        }
    }
}

impl MapSizes {
    /// The defaults with the operator's settings applied (the last one wins).
    pub fn from_args(args: &[(Sized, u32)]) -> MapSizes {
        let mut s = MapSizes::default();
        for (which, n) in args {
            s.entries[*which as usize] = *n;
        }
        s
    }

    pub fn get(&self, which: Sized) -> u32 {
        self.entries[which as usize]
    }

    /// Every kernel map with a size to set at load.
    pub fn max_entries(&self) -> Vec<(&'static str, u32)> {
        Sized::ALL
            .into_iter()
            .flat_map(|s| s.maps(self.get(s)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_refuses_what_it_cannot_use() {
        assert_eq!(parse("services=131072"), Ok((Sized::Services, 131072)));
        assert_eq!(parse("orig-dst=16"), Ok((Sized::OrigDst, 16)));
        let e = parse("conntrack=100").unwrap_err();
        assert!(
            e.contains("not a sized map") && e.contains("services"),
            "{e}"
        );
        assert!(parse("services").unwrap_err().contains("NAME=ENTRIES"));
        assert!(parse("services=lots").unwrap_err().contains("not a number"));
        assert!(parse("services=8").unwrap_err().contains("outside"));
        assert!(parse("services=99999999").unwrap_err().contains("outside"));
    }

    #[test]
    fn defaults_are_the_built_in_limits_and_settings_override_them() {
        let d = MapSizes::default();
        assert_eq!(d.get(Sized::Services), limits::SERVICES);
        assert_eq!(d.get(Sized::Pods), limits::ENROLLED_NETNS);
        let s = MapSizes::from_args(&[(Sized::Sockets, 64), (Sized::Sockets, 32)]);
        assert_eq!(s.get(Sized::Sockets), 32);
        let m = s.max_entries();
        for map in [
            maps::SOCKETS,
            maps::SOCK_IDS,
            maps::SOCK_UNREAD,
            maps::SOCK_SENDING,
        ] {
            assert!(m.contains(&(map, 32)), "{map}: {m:?}");
        }
        assert!(m.contains(&(maps::PLAINTEXT_LISTENERS, 2 * limits::ENROLLED_NETNS)));
        assert!(m.contains(&(maps::SERVICES, limits::SERVICES)));
    }
}
