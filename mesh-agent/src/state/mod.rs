//! What the proxy consults for each connection, rebuilt from each config generation
//! and published whole in the proxy's snapshot (`proxy::Snapshot`).
mod http_routes;
mod routes;
mod workloads;

pub use http_routes::{
    CompiledBackend, CompiledMirror, CompiledRule, DEFAULT_SERVER_FIRST_PORTS, HttpRoutes,
    PortProtocol, PortRoutes, RequestView, Selected, declared, grpc_parts,
};
pub use routes::RouteTable;
pub use workloads::{WorkloadIndex, WorkloadInfo};
