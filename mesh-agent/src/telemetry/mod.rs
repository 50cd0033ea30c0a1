//! Logs, readiness, and (later) metrics.
mod logging;
mod readiness;

pub use logging::{LogFormat, init_logging};
pub use readiness::{Readiness, serve_readiness};
