//! What a process holds, from `/proc`: open descriptors, resident and anonymous memory.
use std::path::Path;

/// One process's (or one node's agents', summed) resources at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub fds: u64,
    pub rss_kib: u64,
    pub anon_kib: u64,
}

impl std::ops::Add for Usage {
    type Output = Usage;
    fn add(self, o: Usage) -> Usage {
        Usage {
            fds: self.fds + o.fds,
            rss_kib: self.rss_kib + o.rss_kib,
            anon_kib: self.anon_kib + o.anon_kib,
        }
    }
}

/// `(VmRSS, RssAnon)` in KiB from the text of `/proc/<pid>/status`.
pub fn parse_status(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("RssAnon:")?))
}

/// The usage of `pid`, or `None` once it has exited.
pub fn usage(pid: u32) -> Option<Usage> {
    let dir = Path::new("/proc").join(pid.to_string());
    let (rss_kib, anon_kib) = parse_status(&std::fs::read_to_string(dir.join("status")).ok()?)?;
    let fds = std::fs::read_dir(dir.join("fd")).ok()?.count() as u64;
    Some(Usage {
        fds,
        rss_kib,
        anon_kib,
    })
}

/// What kind of thing a descriptor is, from its `/proc/<pid>/fd` link: `socket`,
/// `net` (a network namespace), `anon_inode:bpf-map`, `pipe`, or a file's directory.
pub fn fd_kind(link: &str) -> String {
    if let Some(rest) = link.strip_prefix("anon_inode:") {
        return format!("anon_inode:{}", rest.trim_matches(['[', ']']));
    }
    if let Some((kind, _)) = link.split_once(":[") {
        return kind.to_owned();
    }
    match link.rsplit_once('/') {
        Some((dir, _)) if !dir.is_empty() => format!("file:{dir}"),
        _ => link.to_owned(),
    }
}

/// Descriptors of `pid` by kind (empty once it has exited).
pub fn fd_kinds(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let mut m = std::collections::BTreeMap::new();
    let dir = Path::new("/proc").join(pid.to_string()).join("fd");
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if let Ok(link) = std::fs::read_link(e.path()) {
            *m.entry(fd_kind(&link.to_string_lossy())).or_insert(0) += 1;
        }
    }
    m
}

/// Sockets of `pid` that are TCP, unbound and closed: the agent's pre-made spare
/// sockets (each pod's network namespace keeps up to 8 per address family ready for
/// the next dial). They are a bounded pool, not connections, so the leak check counts
/// them apart. Read by duplicating each descriptor (`pidfd_getfd`, root).
pub fn spare_sockets(pid: u32) -> u64 {
    use nix::libc;
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    // SAFETY: plain system calls; every returned descriptor is owned and closed here.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if pidfd < 0 {
        return 0;
    }
    // SAFETY: a fresh descriptor from pidfd_open.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let dir = Path::new("/proc").join(pid.to_string()).join("fd");
    let mut n = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let is_socket =
            std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"));
        let Some(target) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if !is_socket {
            continue;
        }
        // SAFETY: duplicates the target's descriptor into this process.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
        if fd < 0 {
            continue;
        }
        // SAFETY: a fresh descriptor from pidfd_getfd.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let sock = socket2::SockRef::from(&fd);
        let tcp = sock.r#type().is_ok_and(|t| t == socket2::Type::STREAM)
            && sock
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .is_some_and(|a| a.port() == 0);
        // TCP_CLOSE (7): never connected, or a connect that failed.
        if tcp && tcp_state(&fd) == Some(7) {
            n += 1;
        }
    }
    n
}

fn tcp_state(fd: &impl std::os::fd::AsRawFd) -> Option<u8> {
    use nix::libc;
    let mut info = [0u8; 8];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: a buffer of `len` bytes; the kernel writes at most that.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    (rc == 0 && len >= 1).then_some(info[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rss_and_anon_from_the_status_text() {
        let text = "Name:\tmesh-agent\nVmPeak:\t  900 kB\nVmRSS:\t   53412 kB\n\
                    RssAnon:\t   13804 kB\nRssFile:\t 39608 kB\n";
        assert_eq!(parse_status(text), Some((53412, 13804)));
        assert_eq!(parse_status("Name:\tx\nVmRSS:\t1 kB\n"), None);
    }

    #[test]
    fn descriptors_are_grouped_by_kind() {
        assert_eq!(fd_kind("socket:[123456]"), "socket");
        assert_eq!(fd_kind("net:[4026532281]"), "net");
        assert_eq!(fd_kind("pipe:[77]"), "pipe");
        assert_eq!(fd_kind("anon_inode:bpf-map"), "anon_inode:bpf-map");
        assert_eq!(fd_kind("anon_inode:[eventpoll]"), "anon_inode:eventpoll");
        assert_eq!(
            fd_kind("/sys/fs/bpf/x/maps/MESH_SERVICES"),
            "file:/sys/fs/bpf/x/maps"
        );
        assert_eq!(fd_kind("/dev/null"), "file:/dev");
    }

    #[test]
    fn an_unconnected_tcp_socket_counts_as_spare_and_a_listener_does_not() {
        let before = spare_sockets(std::process::id());
        let spare =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(spare_sockets(std::process::id()), before + 1);
        drop((spare, listener));
    }

    #[test]
    fn this_process_has_descriptors_and_memory() {
        let u = usage(std::process::id()).unwrap();
        assert!(u.fds >= 3 && u.rss_kib > 0 && u.anon_kib > 0, "{u:?}");
    }
}
