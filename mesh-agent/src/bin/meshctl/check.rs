//! `meshctl check`: can this node run the mesh? Each check names exactly what is
//! missing. It runs locally (no agent needed), so it works before installing.
use std::path::Path;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_map_supported, is_program_supported},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Warn,
    Fail,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub name: String,
    pub outcome: Outcome,
    pub detail: String,
}

fn check(name: &str, outcome: Outcome, detail: impl Into<String>) -> Check {
    Check {
        name: name.to_owned(),
        outcome,
        detail: detail.into(),
    }
}

/// The oldest kernel with every feature the mesh uses; the most recent of them is
/// `SO_NETNS_COOKIE` (5.14). The others: bpf_link for cgroups (5.7), ring buffer (5.8),
/// sk_lookup (5.9).
const MIN_KERNEL: (u32, u32) = (5, 14);

fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn kernel() -> Check {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    match kernel_version(&release) {
        Some(v) if v >= MIN_KERNEL => check("kernel", Outcome::Pass, release.clone()),
        Some(_) => check(
            "kernel",
            Outcome::Fail,
            format!(
                "{release} is older than {}.{} (SO_NETNS_COOKIE, sk_lookup and the BPF ring buffer are needed)",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
        ),
        None => check(
            "kernel",
            Outcome::Warn,
            format!("cannot read the version from {release:?}"),
        ),
    }
}

const BTF: &str = "/sys/kernel/btf/vmlinux";

fn btf() -> Check {
    // BTF starts with the magic 0xeB9F (little endian on x86).
    match std::fs::read(BTF) {
        Ok(b) if b.len() > 4 && b[0] == 0x9f && b[1] == 0xeb => check(
            "BTF",
            Outcome::Pass,
            format!("{BTF} ({} KiB)", b.len() / 1024),
        ),
        Ok(_) => check(
            "BTF",
            Outcome::Fail,
            format!("{BTF} is not kernel BTF: the kernel needs CONFIG_DEBUG_INFO_BTF=y"),
        ),
        Err(e) => check(
            "BTF",
            Outcome::Fail,
            format!("{BTF}: {e}: the kernel needs CONFIG_DEBUG_INFO_BTF=y"),
        ),
    }
}

fn cgroup2() -> Check {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    match mesh_agent::bpf::cgroup2_mount(&mountinfo) {
        Some(p) => check(
            "cgroup v2",
            Outcome::Pass,
            format!("mounted at {}", p.display()),
        ),
        None => check(
            "cgroup v2",
            Outcome::Fail,
            "no cgroup2 mount in /proc/self/mountinfo: boot with systemd.unified_cgroup_hierarchy=1 or mount cgroup2",
        ),
    }
}

/// BPF_FS_MAGIC from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn bpffs(path: &Path) -> Check {
    match nix::sys::statfs::statfs(path) {
        Ok(s) if s.filesystem_type().0 == BPF_FS_MAGIC => check(
            "bpffs",
            Outcome::Pass,
            format!("mounted at {}", path.display()),
        ),
        Ok(_) | Err(_) => check(
            "bpffs",
            Outcome::Warn,
            format!(
                "not mounted at {}: the agent mounts it at start (needs CAP_SYS_ADMIN)",
                path.display()
            ),
        ),
    }
}

fn privileges() -> Check {
    if nix::unistd::geteuid().is_root() {
        check("privileges", Outcome::Pass, "running as root")
    } else {
        check(
            "privileges",
            Outcome::Fail,
            "not root: the agent needs CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN, and the checks below need CAP_BPF",
        )
    }
}

fn netns_cookie() -> Check {
    use std::os::fd::AsRawFd as _;
    let sock = match std::net::UdpSocket::bind("127.0.0.1:0") {
        Ok(s) => s,
        Err(e) => {
            return check(
                "SO_NETNS_COOKIE",
                Outcome::Warn,
                format!("no socket to try: {e}"),
            );
        }
    };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid fd, and a buffer of the size given.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        check("SO_NETNS_COOKIE", Outcome::Pass, "supported")
    } else {
        check(
            "SO_NETNS_COOKIE",
            Outcome::Fail,
            format!(
                "getsockopt failed ({}): needs kernel 5.14+",
                std::io::Error::last_os_error()
            ),
        )
    }
}

fn program(name: &str, t: ProgramType, what: &str) -> Check {
    let label = format!("program {name}");
    match is_program_supported(t) {
        Ok(true) => check(&label, Outcome::Pass, what),
        Ok(false) => check(
            &label,
            Outcome::Fail,
            format!("the kernel cannot load {name} programs ({what})"),
        ),
        Err(e) => check(&label, Outcome::Fail, format!("probing {name}: {e}")),
    }
}

fn map(name: &str, t: MapType, what: &str) -> Check {
    let label = format!("map {name}");
    match is_map_supported(t) {
        Ok(true) => check(&label, Outcome::Pass, what),
        Ok(false) => check(
            &label,
            Outcome::Fail,
            format!("the kernel cannot create {name} maps ({what})"),
        ),
        Err(e) => check(&label, Outcome::Fail, format!("probing {name}: {e}")),
    }
}

pub fn run(bpffs_path: &Path) -> Vec<Check> {
    vec![
        kernel(),
        privileges(),
        btf(),
        cgroup2(),
        bpffs(bpffs_path),
        netns_cookie(),
        program(
            "cgroup_sock_addr",
            ProgramType::CgroupSockAddr,
            "connect4/6 and getpeername4/6: the outbound redirect",
        ),
        program(
            "sock_ops",
            ProgramType::SockOps,
            "re-keys the original destination",
        ),
        program(
            "sk_lookup",
            ProgramType::SkLookup,
            "STRICT / PERMISSIVE inbound",
        ),
        map("hash", MapType::Hash, "services, enrollment, inbound modes"),
        map("lru_hash", MapType::LruHash, "original destinations"),
        map("percpu_array", MapType::PerCpuArray, "counters"),
        map("sockhash", MapType::SockHash, "plaintext listeners"),
        map("ringbuf", MapType::RingBuf, "flow events"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_releases() {
        assert_eq!(kernel_version("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(kernel_version("5.15.0+"), Some((5, 15)));
        assert_eq!(kernel_version("garbage"), None);
        assert!(kernel_version("5.10.0").is_some_and(|v| v < MIN_KERNEL));
    }
}
