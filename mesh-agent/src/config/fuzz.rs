//! What the fuzz targets reach of the config path (`crate::fuzzing`): the directory
//! source's parse of one file, and the API source's translation of one object, each
//! then resolved into a `Config` as the agent would.
use std::{collections::HashMap, path::Path};

use super::{Config, Kind, enrollment, load, translate};

/// Where the fuzzed text claims to come from: every error must name it.
pub const FILE: &str = "fuzz.yaml";

/// One file of the directory source, parsed and resolved. `Err`: the rejection,
/// as the agent would log it.
pub fn from_yaml(text: &str) -> Result<Config, String> {
    let mut objects = Vec::new();
    let mut seen = HashMap::new();
    load::parse_text(Path::new(FILE), text, &mut objects, &mut seen).map_err(|e| e.to_string())?;
    Ok(resolve(objects))
}

/// One object of the API source (its JSON, as the watcher hands it over), as `kind`.
pub fn from_json(kind: Kind, json: serde_json::Value) -> Result<Config, String> {
    let object = translate(kind, json).map_err(|e| e.to_string())?;
    Ok(resolve(vec![object]))
}

fn resolve(objects: Vec<super::Object>) -> Config {
    let mut config = Config::default();
    for o in objects {
        config.push(o);
    }
    config.resolve_enrollment(enrollment::Default::Enrolled);
    config
}
