//! Workload identity: SPIFFE IDs, the certificates the agent holds for its local
//! workloads (and how it gets them from the CA), and the TLS settings built on them.
mod ca_client;
mod cert;
mod manager;
mod spiffe;
mod tls;
mod verify;

pub use ca_client::CaClient;
#[cfg(test)]
pub use cert::CertInfo;
pub use cert::peer_identity;
pub use manager::SecretManager;
pub use spiffe::{Identity, ParseIdentityError};
pub use tls::{TlsConfigError, client_config, server_config};
