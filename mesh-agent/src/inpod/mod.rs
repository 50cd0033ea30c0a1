//! Pods on this node: entering their network namespaces, holding the agent's listeners
//! inside them, and enrolling them in the kernel maps.
pub mod cni;
pub mod discover;
mod manager;
mod netns;

pub use manager::{PodManager, findable};
pub use netns::{Netns, netns_cookie};
