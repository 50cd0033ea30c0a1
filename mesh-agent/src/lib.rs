//! The node agent, its CA, and the `meshctl` client share this library. Everything
//! lives in modules named for their concern; the binaries only parse their command
//! line and start a runtime.
// Input and network paths must not panic: no unwrap/expect outside tests.
#![deny(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod api;
pub mod app;
pub mod authz;
pub mod bpf;
pub mod ca;
pub mod cli;
pub mod config;
#[doc(hidden)]
pub mod fuzzing;
pub mod handover;
pub mod identity;
pub mod inpod;
pub mod limits;
pub mod memory;
pub mod proxy;
pub mod state;
pub mod telemetry;
