//! Putting the plugin on a node and taking it off: the binary into the CNI bin dir,
//! and an entry at the end of the pod network's conflist (the file the runtime uses:
//! the first `.conflist` of the conf dir in lexical order, as containerd and CRI-O
//! pick it). Done by the agent's DaemonSet (`mesh-cni install --watch`), which keeps
//! the entry there while it runs (a network plugin that rewrites its conflist drops
//! it) and removes it on SIGTERM, so an uninstall leaves no config behind.
//!
//! The JSON edits are pure functions, tested here; the file writes are atomic (a
//! temporary file renamed over the old one), so the runtime never reads half a file.
use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use serde_json::{Value, json};

/// The plugin's `type` in a conflist (and its binary's name).
pub const PLUGIN_TYPE: &str = "mesh-cni";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0}: not JSON: {1}")]
    Json(PathBuf, serde_json::Error),
    #[error("no .conflist in {0}: the pod network's plugin has not written its config yet")]
    NoConfig(PathBuf),
    #[error(
        "{0} is a single-plugin .conf; the mesh chains only into a .conflist (convert it, or let the network plugin write one)"
    )]
    SinglePlugin(PathBuf),
    #[error("{0}: no \"plugins\" list")]
    NoPlugins(PathBuf),
}

/// Our entry in the chain.
pub fn entry(agent_socket: &str, timeout_seconds: u64) -> Value {
    json!({"type": PLUGIN_TYPE, "agent_socket": agent_socket, "timeout_seconds": timeout_seconds})
}

/// The file the runtime uses among `names` (file names of the conf dir): the first in
/// lexical order with a CNI extension. A `.conf` first is an error: it holds one plugin
/// and cannot chain.
pub fn primary(names: &[String]) -> Option<&String> {
    let mut candidates: Vec<&String> = names
        .iter()
        .filter(|n| !n.starts_with('.'))
        .filter(|n| n.ends_with(".conflist") || n.ends_with(".conf") || n.ends_with(".json"))
        .collect();
    candidates.sort();
    candidates.into_iter().next()
}

/// `conf` with `entry` as the last plugin (an older entry of ours replaced); `None`
/// when it already is exactly that.
pub fn chained(conf: &Value, entry: &Value) -> Option<Value> {
    let plugins = conf["plugins"].as_array()?;
    let ours = |p: &Value| p["type"] == PLUGIN_TYPE;
    if plugins.last() == Some(entry) && plugins.iter().filter(|p| ours(p)).count() == 1 {
        return None;
    }
    let mut new = conf.clone();
    let mut list: Vec<Value> = plugins.iter().filter(|p| !ours(p)).cloned().collect();
    list.push(entry.clone());
    new["plugins"] = Value::Array(list);
    Some(new)
}

/// `conf` without our entry; `None` when it has none.
pub fn unchained(conf: &Value) -> Option<Value> {
    let plugins = conf["plugins"].as_array()?;
    if !plugins.iter().any(|p| p["type"] == PLUGIN_TYPE) {
        return None;
    }
    let mut new = conf.clone();
    new["plugins"] = Value::Array(
        plugins
            .iter()
            .filter(|p| p["type"] != PLUGIN_TYPE)
            .cloned()
            .collect(),
    );
    Some(new)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |e| InstallError::Io(path.to_owned(), e)
}

/// Writes `bytes` to `path` through a temporary file in the same directory.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt as _;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.mesh-tmp"));
    let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

/// The conf dir's primary conflist, read.
fn read_primary(conf_dir: &Path) -> Result<(PathBuf, Value), InstallError> {
    let names: Vec<String> = fs::read_dir(conf_dir)
        .map_err(io(conf_dir))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    let name = primary(&names).ok_or_else(|| InstallError::NoConfig(conf_dir.to_owned()))?;
    let path = conf_dir.join(name);
    if !name.ends_with(".conflist") {
        return Err(InstallError::SinglePlugin(path));
    }
    let text = fs::read_to_string(&path).map_err(io(&path))?;
    let conf: Value =
        serde_json::from_str(&text).map_err(|e| InstallError::Json(path.clone(), e))?;
    if !conf["plugins"].is_array() {
        return Err(InstallError::NoPlugins(path));
    }
    Ok((path, conf))
}

/// Copies the plugin binary (unless identical) and chains it into the primary
/// conflist (unless it is there). Returns whether anything changed.
pub fn install(
    binary: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    entry: &Value,
) -> Result<bool, InstallError> {
    let mut changed = false;
    let target = bin_dir.join(PLUGIN_TYPE);
    let bytes = fs::read(binary).map_err(io(binary))?;
    if fs::read(&target).ok().as_deref() != Some(bytes.as_slice()) {
        write_atomically(&target, &bytes, 0o755)?;
        changed = true;
    }
    let (path, conf) = read_primary(conf_dir)?;
    if let Some(new) = chained(&conf, entry) {
        let text =
            serde_json::to_string_pretty(&new).map_err(|e| InstallError::Json(path.clone(), e))?;
        write_atomically(&path, text.as_bytes(), 0o644)?;
        changed = true;
    }
    Ok(changed)
}

/// Takes the entry out of the primary conflist and removes the binary. Nothing there
/// is not an error: the goal is that it is not there.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<(), InstallError> {
    match read_primary(conf_dir) {
        Ok((path, conf)) => {
            if let Some(new) = unchained(&conf) {
                let text = serde_json::to_string_pretty(&new)
                    .map_err(|e| InstallError::Json(path.clone(), e))?;
                write_atomically(&path, text.as_bytes(), 0o644)?;
            }
        }
        Err(InstallError::NoConfig(_)) => {}
        Err(e) => return Err(e),
    }
    let target = bin_dir.join(PLUGIN_TYPE);
    match fs::remove_file(&target) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(InstallError::Io(target, e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridge() -> Value {
        json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [
            {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]})
    }

    #[test]
    fn the_entry_goes_last_once_and_comes_out_leaving_the_rest_as_it_was() {
        let e = entry("/var/run/mesh/cni.sock", 30);
        let with = chained(&bridge(), &e).unwrap();
        let plugins = with["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 3);
        assert_eq!(plugins[2], e);
        assert_eq!(plugins[0]["type"], "bridge");
        // Idempotent.
        assert_eq!(chained(&with, &e), None);
        // A changed entry (another socket) replaces ours, still once and last.
        let e2 = entry("/run/other.sock", 30);
        let moved = chained(&with, &e2).unwrap();
        assert_eq!(moved["plugins"].as_array().unwrap().len(), 3);
        assert_eq!(moved["plugins"][2], e2);
        // An entry not last (another plugin appended after ours) is put last again.
        let mut after = with.clone();
        after["plugins"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "bandwidth"}));
        let fixed = chained(&after, &e).unwrap();
        assert_eq!(fixed["plugins"][3], e);
        assert_eq!(fixed["plugins"].as_array().unwrap().len(), 4);
        // Out again: exactly the original.
        assert_eq!(unchained(&with).unwrap(), bridge());
        assert_eq!(unchained(&bridge()), None);
    }

    #[test]
    fn the_runtimes_file_is_the_first_in_lexical_order() {
        let names: Vec<String> = [
            "99-loopback.conf",
            "10-calico.conflist",
            ".hidden.conflist",
            "README",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            primary(&names).map(String::as_str),
            Some("10-calico.conflist")
        );
        assert_eq!(primary(&["README".to_owned()]), None);
    }
}
