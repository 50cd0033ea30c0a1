//! The mesh's chained CNI plugin and its protocol with the node agent.
//!
//! The container runtime runs the plugin after the network plugins of the chain have
//! made the pod's network (`prevResult` holds its IPs). The plugin tells the agent the
//! pod's network namespace, name, namespace, UID and IPs over the agent's Unix socket,
//! and answers the runtime only when the agent says the pod is enrolled or is not in
//! the mesh: no enrolled pod's application starts before the mesh holds it.
pub mod args;
pub mod install;
pub mod protocol;
