//! Pods on this node: entering their network namespaces, holding the agent's listeners
//! inside them, and enrolling them in the kernel maps.
mod manager;
mod netns;

pub use manager::PodManager;
pub use netns::Netns;
