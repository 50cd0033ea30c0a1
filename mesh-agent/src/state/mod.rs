//! What the proxy consults for each connection, rebuilt from each config generation
//! and swapped in whole: a connection sees one consistent generation.
mod routes;
mod workloads;

pub use routes::RouteTable;
pub use workloads::WorkloadIndex;
