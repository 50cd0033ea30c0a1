//! Config: Kubernetes objects from a directory of YAML files, watched and hot-reloaded.
mod error;
mod istio;
mod load;
mod model;
mod translate;
mod watch;

#[cfg(test)]
pub use error::ConfigError;
#[cfg(test)]
pub use load::{load_dir, load_text};
pub use model::*;
pub use watch::{ConfigWatch, Generation, ReloadStats};

#[cfg(test)]
mod tests;
