//! A thread that lives in one pod's network namespace.
//!
//! A socket belongs to the network namespace of the thread that created it and stays
//! there for its whole life. So the agent creates every socket that must live in a pod
//! (its listeners, its outbound connections) on that pod's thread, then hands the fd to
//! tokio, which can drive it from any thread.
//!
//! Dials are the hot path: each would otherwise wait for that thread to be scheduled.
//! So the thread keeps a few ready sockets per address family (`spare`); a dial takes
//! one and the thread makes another in the background.
use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd},
    path::Path,
    sync::{Arc, Mutex, mpsc},
};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Socket, Type};

type Job = Box<dyn FnOnce() + Send>;

/// Ready sockets kept per family; refilled when fewer than half are left.
const SPARE_SOCKETS: usize = 8;

pub struct Netns {
    jobs: mpsc::Sender<Job>,
    /// Ready TCP sockets (IPv4, IPv6), made on the namespace's thread.
    spare: Arc<[Mutex<Vec<Socket>>; 2]>,
}

/// How a spare socket is made ready (options set before it is handed out).
pub type Prepare = fn(&Socket) -> io::Result<()>;

impl Netns {
    /// Starts a thread inside the network namespace at `path`.
    pub fn enter(path: &Path) -> io::Result<Netns> {
        let file = File::open(path)?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("?");
        Netns::enter_file(file, name)
    }

    /// Starts a thread inside the network namespace `file` is open on. The agent opens
    /// a pod's namespace once and works from that fd only: a path (`/proc/PID/ns/net`
    /// above all) may name another namespace by the time it is opened again.
    pub fn enter_file(file: File, name: &str) -> io::Result<Netns> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let name = format!("netns-{name}");
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
        Ok(Netns {
            jobs,
            spare: Arc::new([Mutex::new(Vec::new()), Mutex::new(Vec::new())]),
        })
    }

    /// A TCP socket of `domain` in this namespace, prepared by `prepare`. Taken from the
    /// spares when there is one (no wait for the namespace's thread), made on the
    /// thread otherwise; either way the spares are topped up in the background.
    pub async fn tcp_socket(&self, domain: Domain, prepare: Prepare) -> io::Result<Socket> {
        let slot = usize::from(domain == Domain::IPV6);
        let (taken, left) = {
            let mut spare = self.spare[slot].lock().unwrap_or_else(|p| p.into_inner());
            (spare.pop(), spare.len())
        };
        if left < SPARE_SOCKETS / 2 {
            let spare = self.spare.clone();
            // Fire and forget: a full job queue only means the thread is gone.
            let _ = self.jobs.send(Box::new(move || {
                // What is missing now, not when the job was queued: sockets taken
                // meanwhile would otherwise leave the set short with no refill queued.
                let missing = SPARE_SOCKETS
                    .saturating_sub(spare[slot].lock().unwrap_or_else(|p| p.into_inner()).len());
                let mut made = Vec::new();
                for _ in 0..missing {
                    match new_tcp_socket(domain, prepare) {
                        Ok(s) => made.push(s),
                        Err(_) => break,
                    }
                }
                let mut spare = spare[slot].lock().unwrap_or_else(|p| p.into_inner());
                spare.extend(made);
                spare.truncate(SPARE_SOCKETS);
            }));
        }
        match taken {
            Some(s) => Ok(s),
            None => self.run(move || new_tcp_socket(domain, prepare)).await?,
        }
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

fn new_tcp_socket(domain: Domain, prepare: Prepare) -> io::Result<Socket> {
    let sock = Socket::new(domain, Type::STREAM, None)?;
    prepare(&sock)?;
    Ok(sock)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn marked(sock: &Socket) -> io::Result<()> {
        sock.set_mark(0x1234)
    }

    #[tokio::test]
    async fn sockets_come_prepared_from_the_spares_and_the_spares_refill() {
        // setns needs CAP_SYS_ADMIN even into our own namespace; the suite runs as root.
        let netns = Netns::enter(Path::new("/proc/self/ns/net")).unwrap();
        let mut fds = std::collections::HashSet::new();
        let mut socks = Vec::new();
        for _ in 0..3 * SPARE_SOCKETS {
            let s = netns.tcp_socket(Domain::IPV4, marked).await.unwrap();
            assert_eq!(s.mark().unwrap(), 0x1234);
            assert_eq!(s.domain().unwrap(), Domain::IPV4);
            assert!(fds.insert(s.as_raw_fd()));
            socks.push(s);
        }
        let v6 = netns.tcp_socket(Domain::IPV6, marked).await.unwrap();
        assert_eq!(v6.domain().unwrap(), Domain::IPV6);
        // The background refill leaves at least half a set behind (a refill is queued
        // whenever a take leaves fewer than half), never more than a set.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while netns.spare[0].lock().unwrap().len() < SPARE_SOCKETS / 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "spares not refilled: {}",
                netns.spare[0].lock().unwrap().len()
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // Let any queued refill finish, then the set is within bounds.
        netns.run(|| ()).await.unwrap();
        let n = netns.spare[0].lock().unwrap().len();
        assert!(
            (SPARE_SOCKETS / 2..=SPARE_SOCKETS).contains(&n),
            "{n} spares"
        );
    }
}
