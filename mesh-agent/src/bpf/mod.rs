//! Everything that touches the kernel's eBPF objects: finding cgroup v2 and bpffs,
//! loading and attaching the programs, and typed access to the maps.
mod datapath;
pub mod fill;
mod fs;
mod heartbeat;
pub mod inspect;
mod maps;
pub mod sizes;

pub use datapath::{Datapath, DatapathOptions, InboundHook, PodInboundLink};
pub use fs::{cgroup2_mount, ensure_bpffs};
pub use heartbeat::Heartbeat;
pub use maps::{InboundMode, MeshMaps, Probes, ServiceAddr, ServiceEntry};
pub use maps::{from_ip16, ip16};
pub use sizes::MapSizes;
