//! Config: Kubernetes objects from a directory of YAML files, watched and hot-reloaded.
mod error;
mod gateway;
mod istio;
mod load;
mod model;
mod route;
mod translate;
mod watch;

#[cfg(test)]
pub use error::ConfigError;
pub use gateway::REGEX_SIZE_LIMIT;
#[cfg(test)]
pub use load::{load_dir, load_text};
pub use model::*;
pub use route::*;
pub use watch::{ConfigWatch, Generation, ReloadStats};

#[cfg(test)]
mod tests;
