//! Config: Kubernetes objects from a source (a directory of YAML files, watched and
//! hot-reloaded), translated once into the agent's model.
//!
//!   source (`directory`) -> `object::translate` per object -> `store::Store`
//!     -> `Config` -> `publish::Publisher` (generations, reload stats) -> the agent
mod api;
mod directory;
mod enrollment;
mod error;
mod files;
#[doc(hidden)]
pub mod fuzz;
mod gateway;
mod istio;
mod kind;
mod load;
mod model;
mod object;
mod probes;
mod publish;
mod route;
mod store;
mod translate;
mod watch;

pub use api::{ApiSource, annotate::PodAnnotator, client as api_client, lease::LeaseSettings};
pub use directory::Directory;
pub use enrollment::{DATAPLANE_LABEL, DataplaneMode, ISTIO_DATAPLANE_LABEL};
#[cfg(test)]
pub use error::ConfigError;
pub use gateway::REGEX_SIZE_LIMIT;
pub use kind::Kind;
#[cfg(test)]
pub use load::{load_dir, load_text};
pub use model::*;
pub use object::{Object, ObjectKey, translate};
pub use publish::{Generation, Publisher, ReloadStats};
pub use route::*;
pub use store::{Change, Rejection, Store};
pub use watch::{ConfigSource, ConfigWatch};

#[cfg(test)]
mod tests;
