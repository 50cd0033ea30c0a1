//! Typed access to the maps the agent owns. Each map sits behind its own lock: the
//! per-connection lookup must not wait for a config sync of the services map.
use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    sync::Mutex,
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray},
};
use mesh_common::{
    EnrolledNetns, OrigDst, PROTO_TCP, PeerKey, ServiceKey, ServiceValue, counters, maps,
};

use super::datapath::DatapathError;

/// A (ClusterIP, port) the mesh captures; TCP only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServiceAddr(pub SocketAddr);

impl ServiceAddr {
    fn key(&self) -> ServiceKey {
        ServiceKey {
            addr: ip16(self.0.ip()),
            port: self.0.port(),
            proto: PROTO_TCP,
            _pad: 0,
        }
    }
}

/// The 16-byte map form of an address (IPv4 mapped).
pub fn ip16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address back from its map form (IPv4-mapped becomes IPv4 again).
pub fn from_ip16(raw: [u8; 16]) -> IpAddr {
    IpAddr::V6(raw.into()).to_canonical()
}

type Locked<K, V> = Mutex<HashMap<MapData, K, V>>;

pub struct MeshMaps {
    enrolled: Locked<u64, EnrolledNetns>,
    services: Locked<ServiceKey, ServiceValue>,
    peers: Locked<PeerKey, OrigDst>,
    counters: PerCpuArray<MapData, u64>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DatapathError::MissingMap { name })?;
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

#[derive(Debug, thiserror::Error)]
#[error("map {map}: {source}")]
pub struct MapUpdateError {
    map: &'static str,
    source: aya::maps::MapError,
}

impl MeshMaps {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        Ok(MeshMaps {
            enrolled: Mutex::new(take(ebpf, maps::ENROLLED_NETNS)?),
            services: Mutex::new(take(ebpf, maps::SERVICES)?),
            peers: Mutex::new(take(ebpf, maps::PEER_ORIG_DST)?),
            counters: take(ebpf, maps::COUNTERS)?,
        })
    }

    pub fn enroll(&self, netns_cookie: u64) -> Result<(), MapUpdateError> {
        let mut m = self.enrolled.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(netns_cookie, EnrolledNetns { flags: 0, _pad: 0 }, 0)
            .map_err(|source| MapUpdateError {
                map: maps::ENROLLED_NETNS,
                source,
            })
    }

    pub fn unenroll(&self, netns_cookie: u64) {
        let mut m = self.enrolled.lock().unwrap_or_else(|p| p.into_inner());
        // Not found is fine: the goal is that it is not there.
        let _ = m.remove(&netns_cookie);
    }

    /// Makes the services map hold exactly `desired`. Returns (added, removed).
    pub fn sync_services(
        &self,
        desired: &HashSet<ServiceAddr>,
    ) -> Result<(usize, usize), MapUpdateError> {
        let mut m = self.services.lock().unwrap_or_else(|p| p.into_inner());
        let want: HashSet<ServiceKey> = desired.iter().map(ServiceAddr::key).collect();
        let have: HashSet<ServiceKey> = m.keys().filter_map(Result::ok).collect();
        let mut added = 0;
        for key in want.difference(&have) {
            m.insert(*key, ServiceValue { flags: 0 }, 0)
                .map_err(|source| MapUpdateError {
                    map: maps::SERVICES,
                    source,
                })?;
            added += 1;
        }
        let mut removed = 0;
        for key in have.difference(&want) {
            let _ = m.remove(key);
            removed += 1;
        }
        Ok((added, removed))
    }

    /// The original destination of a connection the agent accepted from `client` on a
    /// listener in the netns `netns_cookie`. The record is consumed.
    pub fn take_orig_dst(&self, netns_cookie: u64, client: SocketAddr) -> Option<SocketAddr> {
        let key = PeerKey {
            netns_cookie,
            addr: ip16(client.ip()),
            port: client.port(),
            _pad: [0; 6],
        };
        let mut m = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let orig = m.get(&key, 0).ok()?;
        let _ = m.remove(&key);
        Some(SocketAddr::new(from_ip16(orig.addr), orig.port))
    }

    /// Kernel counters summed over CPUs, indexed by `mesh_common::counters`.
    pub fn counters(&self) -> [u64; counters::LEN as usize] {
        let mut out = [0u64; counters::LEN as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = self.counters.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        out
    }
}
