//! Where config comes from. A [`ConfigSource`] reads its objects (a directory of YAML
//! today, the Kubernetes API next), translates them with the one translation
//! (`object::translate`) and hands whole configs to its [`Publisher`], which numbers
//! generations and counts reloads the same way for every source.
use std::{future::Future, sync::Arc};

use tokio::sync::watch;

use super::publish::{Generation, Publisher, ReloadStats};

pub trait ConfigSource: Send + 'static {
    /// What feeds the agent, for its log (`dir /etc/mesh`).
    fn describe(&self) -> String;

    /// Feeds `publisher` until nobody listens any more.
    fn run(self, publisher: Publisher) -> impl Future<Output = ()> + Send;
}

/// The agent's view of its config source: the generations, and how loading went.
pub struct ConfigWatch {
    pub updates: watch::Receiver<Arc<Generation>>,
    pub stats: Arc<ReloadStats>,
}

impl ConfigWatch {
    /// Starts `source` on the runtime; it runs until the returned receiver is dropped.
    pub fn start(source: impl ConfigSource) -> ConfigWatch {
        let (publisher, updates, stats) = Publisher::new(source.describe());
        tokio::spawn(source.run(publisher));
        ConfigWatch { updates, stats }
    }
}
