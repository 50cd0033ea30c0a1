//! Generated gRPC code (tonic + prost) of the mesh's APIs, from `proto/`.
pub mod ca {
    #![allow(
        clippy::all,
        clippy::pedantic,
        clippy::unwrap_used,
        clippy::expect_used
    )]
    tonic::include_proto!("mesh.ca.v1");
}

pub mod admin {
    #![allow(
        clippy::all,
        clippy::pedantic,
        clippy::unwrap_used,
        clippy::expect_used
    )]
    tonic::include_proto!("mesh.admin.v1");
}
