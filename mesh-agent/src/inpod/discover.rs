//! Finding a pod's network namespace without being told: the pods that started before
//! the agent, and every pod after an agent restart, as istio-cni finds them.
//!
//! The container runtime puts every process of a pod in a cgroup whose path carries the
//! pod's UID (`.../kubepods-burstable-pod<uid with _>.slice/...` with the systemd
//! driver, `.../kubepods/burstable/pod<uid>/...` with cgroupfs). So the agent reads
//! `/proc/<pid>/cgroup` of every process, keeps those of the pod's UID, and opens their
//! `/proc/<pid>/ns/net`. A netns is taken only if it is not the host's (a host-network
//! pod cannot be meshed) and it holds one of the pod's IPs, and only if exactly one
//! netns qualifies: a process cannot move itself into another pod's cgroup, and the
//! address check keeps a stale or foreign namespace out. The file is held open from
//! then on, so a PID reused later can never stand for the pod.
use std::{
    collections::HashSet,
    fs::{self, File},
    io,
    net::IpAddr,
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::Path,
};

use nix::sched::{CloneFlags, setns};

#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("no process of pod UID {0} is running yet")]
    NoProcess(String),
    #[error("no network namespace of pod UID {uid} holds the pod's IPs {ips:?}")]
    NoMatch { uid: String, ips: Vec<IpAddr> },
    #[error("{count} network namespaces of pod UID {uid} hold the pod's IPs; refusing to guess")]
    Ambiguous { uid: String, count: usize },
    #[error("reading {what}: {source}")]
    Io { what: String, source: io::Error },
}

/// The pod UID in a `/proc/<pid>/cgroup` text, with dashes, if the process is in a
/// pod's cgroup.
pub fn pod_uid_in_cgroup(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| line.splitn(3, ':').nth(2))
        .flat_map(|path| path.split('/'))
        .find_map(uid_of_segment)
}

/// `pod<uid>` (cgroupfs) or `kubepods[-<qos>]-pod<uid_with_underscores>.slice`
/// (systemd).
fn uid_of_segment(segment: &str) -> Option<String> {
    let rest = if let Some(s) = segment.strip_suffix(".slice") {
        let i = s.rfind("-pod")?;
        &s[i + 4..]
    } else {
        segment.strip_prefix("pod")?
    };
    let uid = rest.replace('_', "-");
    is_uid(&uid).then_some(uid)
}

/// A Kubernetes UID: 36 characters, hex digits and four dashes (8-4-4-4-12).
fn is_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The network namespace of the pod with `uid`, confirmed by one of `ips`, opened.
/// `proc` is the host's `/proc`.
pub fn netns_of(proc: &Path, uid: &str, ips: &[IpAddr]) -> Result<File, DiscoverError> {
    let io_err = |what: String| move |source| DiscoverError::Io { what, source };
    let own = fs::metadata(proc.join("self/ns/net"))
        .map_err(io_err("the agent's own netns".into()))?
        .ino();
    let mut seen = HashSet::new();
    let mut found_process = false;
    let mut matches = Vec::new();
    let entries = fs::read_dir(proc).map_err(io_err(proc.display().to_string()))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        // Processes come and go during the scan: one that is gone is skipped.
        let Ok(text) = fs::read_to_string(proc.join(pid).join("cgroup")) else {
            continue;
        };
        if pod_uid_in_cgroup(&text).as_deref() != Some(uid) {
            continue;
        }
        found_process = true;
        let Ok(file) = File::open(proc.join(pid).join("ns/net")) else {
            continue;
        };
        let Ok(ino) = file.metadata().map(|m| m.ino()) else {
            continue;
        };
        if ino == own || !seen.insert(ino) {
            continue;
        }
        if holds_any(&file, ips) {
            matches.push(file);
        }
    }
    match matches.len() {
        1 => Ok(matches.remove(0)),
        0 if !found_process => Err(DiscoverError::NoProcess(uid.to_owned())),
        0 => Err(DiscoverError::NoMatch {
            uid: uid.to_owned(),
            ips: ips.to_vec(),
        }),
        count => Err(DiscoverError::Ambiguous {
            uid: uid.to_owned(),
            count,
        }),
    }
}

/// Whether the namespace has one of `ips` on an interface. Asked from a short-lived
/// thread that enters it (a thread's netns is its own; the agent's stay where they are).
pub(crate) fn holds_any(netns: &File, ips: &[IpAddr]) -> bool {
    let Ok(fd) = netns.try_clone() else {
        return false;
    };
    let ips = ips.to_vec();
    std::thread::scope(|s| {
        s.spawn(move || {
            if setns(fd.as_fd(), CloneFlags::CLONE_NEWNET).is_err() {
                return false;
            }
            let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
                return false;
            };
            addrs.filter_map(|a| a.address).any(|a| {
                let ip = a
                    .as_sockaddr_in()
                    .map(|v4| IpAddr::from(v4.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::from(v6.ip())));
                ip.is_some_and(|ip| ips.contains(&ip))
            })
        })
        .join()
        .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f2a9c4e-1b3d-4e5f-8a7b-9c0d1e2f3a4b";

    #[test]
    fn the_pod_uid_is_read_from_either_cgroup_driver() {
        let systemd = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f2a9c4e_1b3d_4e5f_8a7b_9c0d1e2f3a4b.slice/cri-containerd-5e1f.scope\n";
        assert_eq!(pod_uid_in_cgroup(systemd).as_deref(), Some(UID));
        let guaranteed = "0::/kubepods.slice/kubepods-pod0f2a9c4e_1b3d_4e5f_8a7b_9c0d1e2f3a4b.slice/crio-1.scope\n";
        assert_eq!(pod_uid_in_cgroup(guaranteed).as_deref(), Some(UID));
        let cgroupfs = "0::/kubepods/besteffort/pod0f2a9c4e-1b3d-4e5f-8a7b-9c0d1e2f3a4b/4d2c\n";
        assert_eq!(pod_uid_in_cgroup(cgroupfs).as_deref(), Some(UID));
        // cgroup v1 lines name controllers; the path is the same.
        let v1 = "12:pids:/kubepods/burstable/pod0f2a9c4e-1b3d-4e5f-8a7b-9c0d1e2f3a4b/4d2c\n";
        assert_eq!(pod_uid_in_cgroup(v1).as_deref(), Some(UID));
    }

    #[test]
    fn other_cgroups_are_not_pods() {
        for text in [
            "0::/system.slice/containerd.service\n",
            "0::/user.slice/user-0.slice/session-1.scope\n",
            "0::/kubepods.slice/kubepods-burstable.slice\n",
            // Not a UID: too short, or not hex.
            "0::/kubepods/burstable/pod1234/abc\n",
            "0::/kubepods/burstable/podzf2a9c4e-1b3d-4e5f-8a7b-9c0d1e2f3a4b/abc\n",
            "0::/podcast.slice\n",
            "",
        ] {
            assert_eq!(pod_uid_in_cgroup(text), None, "{text}");
        }
    }
}
