//! The two kernel filesystems the agent needs: cgroup v2 (to attach to) and bpffs (to
//! pin in). Neither location is assumed: cgroup v2 is found from mountinfo.
use std::path::{Path, PathBuf};

/// The cgroup v2 mount point from `/proc/self/mountinfo` text. It is
/// `/sys/fs/cgroup` on most nodes, `/sys/fs/cgroup/unified` on hybrid-hierarchy hosts.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields: id parent major:minor root mount-point options [optional...] - fstype source super-options
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_octal(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let digits: String = chars.clone().take(3).collect();
            if digits.len() == 3
                && let Ok(v) = u8::from_str_radix(&digits, 8)
            {
                out.push(char::from(v));
                chars.nth(2);
                continue;
            }
        }
        out.push(c);
    }
    out
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Makes sure `root` is a mounted bpffs, mounting one if it is not (as a DaemonSet with
/// a hostPath `/sys/fs/bpf` would have it).
pub fn ensure_bpffs(root: &Path) -> std::io::Result<()> {
    use nix::sys::statfs::statfs;
    std::fs::create_dir_all(root)?;
    let is_bpffs = |p: &Path| {
        statfs(p)
            .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
            .unwrap_or(false)
    };
    if is_bpffs(root) {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        root,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(std::io::Error::from)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_cgroup2_on_a_hybrid_host() {
        assert_eq!(
            cgroup2_mount(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_cgroup2_with_optional_fields_and_escapes() {
        let line = "29 23 0:26 / /sys/fs/my\\040cgroup rw,nosuid shared:4 master:1 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            cgroup2_mount(line),
            Some(PathBuf::from("/sys/fs/my cgroup"))
        );
    }

    #[test]
    fn no_cgroup2_is_none() {
        assert_eq!(
            cgroup2_mount("32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"),
            None
        );
    }
}
