//! A simulated cluster on one kernel, for the end-to-end tests and `cargo xtask demo`.
//!
//! Each node is a network namespace with its own cgroup; each pod is a network
//! namespace wired to its node by a veth pair (through a bridge on the node), placed in
//! its own cgroup under the node's. Nodes meet on a fabric namespace holding a bridge.
//! No namespace has a default route: nothing can leave the machine, and service VIPs
//! exist only as entries in the agents' kernel maps.
//!
//! Everything created is removed when the [`Cluster`] is dropped, including on panic.
pub mod cluster;
pub mod echo;
pub mod fakeapi;
pub mod grpc;
pub mod pattern;
pub mod proc;
pub mod soak;
pub mod stream;
pub mod tls;
pub mod ws;
pub mod yaml;

pub use cluster::{Cluster, Node, Pod};
