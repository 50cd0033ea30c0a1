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
    if let Some((kind, _)) = link.split_once(":[") {
        return kind.to_owned();
    }
    if let Some(rest) = link.strip_prefix("anon_inode:") {
        return format!("anon_inode:{}", rest.trim_matches(['[', ']']));
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
    fn this_process_has_descriptors_and_memory() {
        let u = usage(std::process::id()).unwrap();
        assert!(u.fds >= 3 && u.rss_kib > 0 && u.anon_kib > 0, "{u:?}");
    }
}
