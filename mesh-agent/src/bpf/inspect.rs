//! Read-only views of the pinned maps for `meshctl bpf maps`. Each call opens the pins
//! with its own file descriptors, so inspecting never takes the locks the data path
//! uses.
use std::{net::SocketAddr, path::Path};

use aya::{
    Pod,
    maps::{HashMap, Map, MapData, MapError, PerCpuArray, SockHash},
};
use mesh_common::{
    EnrolledNetns, ListenerKey, MODE_PERMISSIVE, MODE_STRICT, OrigDst, PeerKey, ServiceKey,
    ServiceValue, SockFlow, SockKey, SockSending, counters, maps,
};

use super::maps::from_ip16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapSummary {
    pub name: String,
    pub kind: String,
    pub max_entries: u32,
    /// Entries in use (for arrays: their length; for the ring buffer: 0).
    pub entries: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("no map named {0} (see `meshctl bpf maps`)")]
    Unknown(String),
    #[error("map {name}: {source}")]
    Map { name: String, source: MapError },
    #[error("reading {dir}: {source}")]
    Dir { dir: String, source: std::io::Error },
}

type Rows = Vec<(String, String)>;

fn sock(addr: [u8; 16], port: u16) -> String {
    SocketAddr::new(from_ip16(addr), port).to_string()
}

/// One end of a pod-agent hop: its namespace and local address.
fn sock_end(k: &SockKey) -> String {
    format!(
        "netns {} {}",
        k.netns_cookie,
        sock(k.local_addr, k.local_port)
    )
}

fn mode(m: u32) -> &'static str {
    match m {
        MODE_STRICT => "STRICT",
        MODE_PERMISSIVE => "PERMISSIVE",
        _ => "unknown",
    }
}

/// Names a socket the kernel knows by its address without printing the address (a
/// kernel pointer would defeat KASLR): a keyed hash, with a key random per process,
/// so one dump still shows which entries name the same socket.
fn opaque(kernel_addr: u64) -> String {
    use std::hash::BuildHasher as _;
    static KEY: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let h = KEY.get_or_init(Default::default).hash_one(kernel_addr);
    format!("socket #{:08x}", h as u32)
}

pub fn counter_name(i: u32) -> String {
    match counters::NAMES.get(i as usize) {
        Some(name) => (*name).to_owned(),
        None => format!("slot {i}"),
    }
}

/// Counts (and with `rows`, renders) the entries of a hash map. Entries deleted while
/// the iteration runs are skipped.
fn hash_entries<K: Pod, V: Pod>(
    map: Map,
    rows: Option<&mut Rows>,
    key: impl Fn(&K) -> String,
    value: impl Fn(&V) -> String,
) -> Result<u64, MapError> {
    let map: HashMap<MapData, K, V> = HashMap::try_from(map)?;
    let mut n = 0;
    let mut out = Vec::new();
    for (k, v) in map.iter().flatten() {
        n += 1;
        if rows.is_some() {
            out.push((key(&k), value(&v)));
        }
    }
    if let Some(rows) = rows {
        out.sort();
        *rows = out;
    }
    Ok(n)
}

/// The name of a `settings::KERNEL_LOG` value.
pub fn kernel_log_name(v: u32) -> &'static str {
    if v == mesh_common::settings::KERNEL_LOG_DEBUG {
        "debug"
    } else {
        "off"
    }
}

fn entries(name: &str, map: Map, rows: Option<&mut Rows>) -> Result<u64, MapError> {
    match name {
        maps::ENROLLED_NETNS => hash_entries(
            map,
            rows,
            |k: &u64| format!("netns cookie {k}"),
            |v: &EnrolledNetns| {
                let own: Vec<String> = v
                    .own
                    .iter()
                    .filter(|a| **a != [0u8; 16])
                    .map(|a| from_ip16(*a).to_string())
                    .collect();
                let ports: Vec<String> = v
                    .probe_ports
                    .iter()
                    .filter(|p| **p != 0)
                    .map(u16::to_string)
                    .collect();
                let probes = if v.probe_src == [0u8; 16] || ports.is_empty() {
                    String::new()
                } else {
                    format!(
                        " probes from {} to [{}]",
                        from_ip16(v.probe_src),
                        ports.join(", ")
                    )
                };
                format!("{} own [{}]{probes}", mode(v.mode), own.join(", "))
            },
        ),
        maps::SERVICES => hash_entries(
            map,
            rows,
            |k: &ServiceKey| format!("{} proto {}", sock(k.addr, k.port), k.proto),
            |v: &ServiceValue| {
                if v.flags & mesh_common::SERVICE_FAIL_OPEN != 0 {
                    format!("fail-open, {} backends", v.backends)
                } else {
                    "fail-closed".to_owned()
                }
            },
        ),
        maps::BACKENDS => hash_entries(
            map,
            rows,
            |k: &mesh_common::BackendKey| {
                format!("{} #{}", sock(k.service.addr, k.service.port), k.index)
            },
            |v: &mesh_common::BackendValue| sock(v.addr, v.port),
        ),
        // Socket-local storage has no keys to walk from user space (a value is read by
        // the socket's fd, which only the pod holds): it is counted as 0 entries.
        maps::SOCK_ORIG_DST => {
            if let Some(rows) = rows {
                *rows = vec![(
                    "(per-socket storage)".to_owned(),
                    "one record on each captured socket, freed with it".to_owned(),
                )];
            }
            Ok(0)
        }
        maps::PEER_ORIG_DST => hash_entries(
            map,
            rows,
            |k: &PeerKey| format!("netns {} client {}", k.netns_cookie, sock(k.addr, k.port)),
            |v: &OrigDst| sock(v.addr, v.port),
        ),
        maps::PLAINTEXT_LISTENERS => {
            let map: SockHash<MapData, ListenerKey> = SockHash::try_from(map)?;
            let keys: Vec<ListenerKey> = map.keys().flatten().collect();
            if let Some(rows) = rows {
                *rows = keys
                    .iter()
                    .map(|k| {
                        let family = if k.family == mesh_common::AF_INET6 {
                            "ipv6"
                        } else {
                            "ipv4"
                        };
                        (
                            format!("netns cookie {} {family}", k.netns_cookie),
                            "agent :15006 socket".into(),
                        )
                    })
                    .collect();
                rows.sort();
            }
            Ok(keys.len() as u64)
        }
        maps::SOCKETS => {
            let map: SockHash<MapData, SockKey> = SockHash::try_from(map)?;
            let keys: Vec<SockKey> = map.keys().flatten().collect();
            if let Some(rows) = rows {
                *rows = keys
                    .iter()
                    .map(|k| {
                        (
                            sock_end(k),
                            format!("peer {}", sock(k.remote_addr, k.remote_port)),
                        )
                    })
                    .collect();
                rows.sort();
            }
            Ok(keys.len() as u64)
        }
        maps::SOCK_UNREAD => hash_entries(
            map,
            rows,
            |k: &u64| opaque(*k),
            |v: &SockFlow| {
                let path = if v.on_tcp != 0 {
                    "TCP (receiver behind)"
                } else {
                    "sockmap"
                };
                format!("{} bytes unread, sender on {path}", v.unread)
            },
        ),
        maps::SOCK_SENDING => hash_entries(
            map,
            rows,
            |k: &u64| opaque(*k),
            |v: &SockSending| {
                let who = if v.paced != 0 { "agent" } else { "app" };
                format!(
                    "{who} socket, sends to {}, {} bytes charged in the call in progress",
                    opaque(v.receiver),
                    v.charged
                )
            },
        ),
        maps::SOCK_IDS => hash_entries(map, rows, sock_end, |v: &u64| opaque(*v)),
        maps::SOCK_FALLBACK => hash_entries(map, rows, sock_end, |_: &u8| "TCP path".to_owned()),
        maps::SETTINGS => {
            let map: aya::maps::Array<MapData, u32> = aya::maps::Array::try_from(map)?;
            let mut out = Vec::new();
            for i in 0..mesh_common::settings::LEN {
                let v = map.get(&i, 0)?;
                let (name, value) = match i {
                    mesh_common::settings::SOCKMAP => (
                        "sockmap".to_owned(),
                        if v != 0 { "on" } else { "off" }.to_owned(),
                    ),
                    mesh_common::settings::SOCKMAP_UNREAD_LIMIT => {
                        ("sockmap_unread_limit".to_owned(), format!("{v} bytes"))
                    }
                    mesh_common::settings::AGENT_TGID => ("agent_tgid".to_owned(), v.to_string()),
                    mesh_common::settings::PREVIOUS_AGENT_TGID => {
                        ("previous_agent_tgid".to_owned(), v.to_string())
                    }
                    mesh_common::settings::KERNEL_LOG => {
                        ("kernel_log".to_owned(), kernel_log_name(v).to_owned())
                    }
                    mesh_common::settings::FLOW_EVENTS => (
                        "flow_events".to_owned(),
                        if v != 0 { "on" } else { "off" }.to_owned(),
                    ),
                    other => (format!("slot {other}"), v.to_string()),
                };
                out.push((name, value));
            }
            let n = out.len() as u64;
            if let Some(rows) = rows {
                *rows = out;
            }
            Ok(n)
        }
        maps::COUNTERS => {
            let map: PerCpuArray<MapData, u64> = PerCpuArray::try_from(map)?;
            let mut n = 0;
            let mut out = Vec::new();
            for i in 0..counters::LEN {
                let total: u64 = map.get(&i, 0)?.iter().sum();
                n += 1;
                out.push((counter_name(i), total.to_string()));
            }
            if let Some(rows) = rows {
                *rows = out;
            }
            Ok(n)
        }
        // The ring buffer has no entries to list; `meshctl observe` reads it.
        _ => Ok(0),
    }
}

fn open(map_dir: &Path, name: &str) -> Result<(Map, u32, String), InspectError> {
    let err = |source| InspectError::Map {
        name: name.to_owned(),
        source,
    };
    let data = MapData::from_pin(map_dir.join(name)).map_err(err)?;
    let info = data.info().map_err(err)?;
    let kind = info
        .map_type()
        .map_or_else(|_| "unknown".to_owned(), |t| format!("{t:?}"));
    let max = info.max_entries();
    let map = Map::from_map_data(data).map_err(err)?;
    Ok((map, max, kind))
}

/// Every pinned map of this agent, sorted by name.
pub fn summarize(map_dir: &Path) -> Result<Vec<MapSummary>, InspectError> {
    let dir_err = |source| InspectError::Dir {
        dir: map_dir.display().to_string(),
        source,
    };
    let mut names: Vec<String> = std::fs::read_dir(map_dir)
        .map_err(dir_err)?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let (map, max_entries, kind) = open(map_dir, &name)?;
        let entries = entries(&name, map, None).map_err(|source| InspectError::Map {
            name: name.clone(),
            source,
        })?;
        out.push(MapSummary {
            name,
            kind,
            max_entries,
            entries,
        });
    }
    Ok(out)
}

/// Whether `name` is one of the mesh's maps. Only those are ever opened: the name
/// comes from the admin API and is joined to the pin directory (`../x` must not
/// reach another pinned object).
pub fn known_map(name: &str) -> bool {
    mesh_common::maps::ALL.contains(&name)
}

/// The entries of one map, rendered as (key, value) text.
pub fn dump(map_dir: &Path, name: &str) -> Result<Rows, InspectError> {
    if !known_map(name) || !map_dir.join(name).exists() {
        return Err(InspectError::Unknown(name.to_owned()));
    }
    let (map, _, _) = open(map_dir, name)?;
    let mut rows = Vec::new();
    entries(name, map, Some(&mut rows)).map_err(|source| InspectError::Map {
        name: name.to_owned(),
        source,
    })?;
    Ok(rows)
}
