//! Where connections run: one single-threaded tokio runtime per core ("shard"), each
//! on a thread of its own. An accepted connection is handed to the next shard and
//! everything it starts (its HTTP server, the request tasks hyper spawns, the
//! connections it dials) runs there too.
//!
//! Why not the one work-stealing runtime for everything: on it, a task woken by a task
//! on the same worker also wakes a parked sibling worker so that it may steal, and a
//! routed request wakes several tasks (the client's connection, the body pipe, the
//! tunnel connection, the application connection). Measured with the benchmark's
//! work counts on the L7 mTLS path, that was about eight futex and eventfd calls per
//! request of twenty-two, and twice the context switches. A shard never wakes another
//! thread for its own tasks; only connections shared across shards (a pooled tunnel
//! or application connection) wake the shard that owns them.
//!
//! The control plane (config, certificates, kernel maps, the accept loops) stays on
//! the main runtime.
use std::{
    future::Future,
    net::TcpStream as StdTcpStream,
    sync::atomic::{AtomicUsize, Ordering},
};

use tokio::{net::TcpStream, runtime::Handle};
use tracing::warn;

thread_local! {
    /// The shard this thread runs, if it is one.
    static CURRENT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The shard the caller runs on; 0 off the shards (the main runtime, tests). Pools key
/// their connections by it.
pub fn current() -> usize {
    CURRENT.with(|c| c.get()).unwrap_or(0)
}

pub struct Shards {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("starting shard {index}: {source}")]
    Start {
        index: usize,
        source: std::io::Error,
    },
    #[error("shard {0} stopped before it started")]
    Gone(usize),
}

impl Shards {
    /// Starts `count` shards (at least one). Their threads live as long as the process.
    pub fn start(count: usize) -> Result<Self, ShardError> {
        let mut handles = Vec::with_capacity(count.max(1));
        for index in 0..count.max(1) {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name(format!("mesh-shard-{index}"))
                .spawn(move || {
                    CURRENT.with(|c| c.set(Some(index)));
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = tx.send(Ok(runtime.handle().clone()));
                    runtime.block_on(std::future::pending::<()>());
                })
                .map_err(|source| ShardError::Start { index, source })?;
            match rx.recv() {
                Ok(Ok(h)) => handles.push(h),
                Ok(Err(source)) => return Err(ShardError::Start { index, source }),
                Err(_) => return Err(ShardError::Gone(index)),
            }
        }
        Ok(Shards {
            handles,
            next: AtomicUsize::new(0),
        })
    }

    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// Runs `serve` on the connection on the next shard, round-robin. The socket (not
    /// registered with any reactor yet, and non-blocking) is registered with that
    /// shard's; if it cannot be, the connection is closed (and logged), as any
    /// connection the agent cannot serve.
    pub fn serve<F, Fut>(&self, std: StdTcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles[i].spawn(async move {
            // Registered with the reactor of the runtime this runs on: the shard's.
            match TcpStream::from_std(std) {
                Ok(s) => serve(s).await,
                Err(e) => warn!(error = %e, "cannot register the connection on its shard"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_run_on_the_shards_round_robin() {
        let shards = Shards::start(2).expect("shards");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut names = Vec::new();
        for _ in 0..4 {
            let mut client = TcpStream::connect(addr).await.expect("connect");
            let (stream, _) = listener.accept().await.expect("accept");
            let stream = stream.into_std().expect("std");
            shards.serve(stream, |mut s| async move {
                let name = std::thread::current().name().unwrap_or("").to_owned();
                assert_eq!(name, format!("mesh-shard-{}", current()));
                let _ = s.write_all(name.as_bytes()).await;
            });
            let mut got = String::new();
            client.read_to_string(&mut got).await.expect("read");
            names.push(got);
        }
        assert_eq!(
            names,
            [
                "mesh-shard-0",
                "mesh-shard-1",
                "mesh-shard-0",
                "mesh-shard-1"
            ]
        );
    }
}
