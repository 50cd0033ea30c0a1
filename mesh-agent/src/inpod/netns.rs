//! A thread that lives in one pod's network namespace.
//!
//! A socket belongs to the network namespace of the thread that created it and stays
//! there for its whole life. So the agent creates every socket that must live in a pod
//! (its listeners, its outbound connections) on that pod's thread, then hands the fd to
//! tokio, which can drive it from any thread.
use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd},
    path::Path,
    sync::mpsc,
};

use nix::sched::{CloneFlags, setns};

type Job = Box<dyn FnOnce() + Send>;

pub struct Netns {
    jobs: mpsc::Sender<Job>,
}

impl Netns {
    /// Starts a thread inside the network namespace at `path`.
    pub fn enter(path: &Path) -> io::Result<Netns> {
        let file = File::open(path)?;
        let (ready_tx, ready_rx) = mpsc::channel();
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let name = format!(
            "netns-{}",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("?")
        );
        std::thread::Builder::new().name(name).spawn(move || {
            let entered = setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from);
            let ok = entered.is_ok();
            let _ = ready_tx.send(entered);
            drop(file);
            if ok {
                // Runs until every sender (the Netns) is gone.
                while let Ok(job) = job_rx.recv() {
                    job();
                }
            }
        })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("netns thread exited"))??;
        Ok(Netns { jobs })
    }

    /// Runs `f` on the namespace's thread and returns its result.
    pub async fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| io::Error::other("netns thread is gone"))?;
        rx.await
            .map_err(|_| io::Error::other("netns thread is gone"))
    }
}

/// The kernel's cookie for the network namespace a socket lives in (`SO_NETNS_COOKIE`,
/// Linux 5.14+): the same value `bpf_get_netns_cookie` returns in the kernel programs.
pub fn netns_cookie(sock: &impl AsRawFd) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the pointers refer to live locals of the right size for this option.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}
