//! Says in the log when a bounded kernel map fills up: at 80% (time to raise
//! `--bpf-map-size`), when full, and when it is back to normal. The numbers are in
//! `meshctl status` and the `mesh_bpf_map_entries` / `mesh_bpf_map_capacity` gauges.
use std::{collections::HashMap, sync::Arc, time::Duration};

use tracing::{error, info, warn};

use crate::bpf::{
    MeshMaps,
    fill::{Level, worth_logging},
    sizes::Sized,
};

pub async fn watch(maps: Arc<MeshMaps>, every: Duration) {
    let mut levels: HashMap<Sized, Level> = HashMap::new();
    loop {
        tokio::time::sleep(every).await;
        for f in maps.fill() {
            let before = levels.get(&f.map).copied().unwrap_or(Level::Normal);
            let now = f.level(before);
            levels.insert(f.map, now);
            if !worth_logging(before, now) {
                continue;
            }
            let (map, entries, capacity, left_out) =
                (f.map.name(), f.entries, f.capacity, f.left_out);
            match now {
                Level::Full => error!(
                    map,
                    entries,
                    capacity,
                    left_out,
                    "kernel map full: {}; raise --bpf-map-size {map}=N",
                    consequence(f.map)
                ),
                Level::High => warn!(
                    map,
                    entries,
                    capacity,
                    percent = f.percent(),
                    "kernel map above 80%; raise --bpf-map-size {map}=N before it fills"
                ),
                Level::Normal => info!(map, entries, capacity, "kernel map back below 70%"),
            }
        }
    }
}

/// What a full map costs, in the words an operator needs.
fn consequence(map: Sized) -> &'static str {
    match map {
        Sized::Services => {
            "service ports left out are still captured and routed by the agent, \
             but cannot fail open"
        }
        Sized::Backends => "fail-open services left without endpoints fail closed",
        Sized::OrigDst => {
            "connections whose original destination was pushed out are refused \
             (reason no_orig_dst), never sent elsewhere"
        }
        Sized::Sockets => "new connections stay on the TCP path (no sockmap acceleration)",
        Sized::Pods => "pods beyond it cannot be enrolled; the agent is not ready until they are",
    }
}
