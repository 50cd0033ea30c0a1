//! Reading a config directory: every `*.yaml` / `*.yml` file, each holding one or more
//! YAML documents, each document one Kubernetes object. Either the whole directory is
//! valid and becomes a new [`Config`], or the first error is returned and the caller
//! keeps the config it had.
use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use serde_yaml_ng::Value;

use super::{
    error::{ConfigError, FieldError},
    gateway, istio,
    model::Config,
    route::RouteKind,
    translate,
};

/// The kinds the agent understands, by `apiVersion` and `kind`.
const KNOWN: &[(&str, &str)] = &[
    ("v1", "Service"),
    ("discovery.k8s.io/v1", "EndpointSlice"),
    ("v1", "Pod"),
    ("security.istio.io/v1", "PeerAuthentication"),
    ("security.istio.io/v1", "AuthorizationPolicy"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
    ("gateway.networking.k8s.io/v1beta1", "HTTPRoute"),
    ("gateway.networking.k8s.io/v1", "GRPCRoute"),
];

/// Lists the config files of `dir` in a stable order. Hidden files are skipped, so an
/// editor's swap files and Kubernetes' `..data` links do not count twice.
pub fn config_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let read_err = |source| ConfigError::Read {
        path: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        if yaml && !name.starts_with('.') && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// A config file larger than this is refused unread (10,000 services with their
/// endpoints fit in a few MiB).
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;
/// ... and so is a directory holding more than this in all.
pub const MAX_DIR_BYTES: u64 = 64 * 1024 * 1024;

pub fn load_dir(dir: &Path) -> Result<Config, ConfigError> {
    let mut config = Config::default();
    let mut seen: HashMap<String, PathBuf> = HashMap::new();
    let mut total = 0u64;
    for path in config_files(dir)? {
        let read_err = |source| ConfigError::Read {
            path: path.clone(),
            source,
        };
        let size = fs::metadata(&path).map_err(read_err)?.len();
        if size > MAX_FILE_BYTES {
            return Err(ConfigError::FileTooLarge {
                path,
                size,
                limit: MAX_FILE_BYTES,
            });
        }
        total += size;
        if total > MAX_DIR_BYTES {
            return Err(ConfigError::DirTooLarge {
                path: dir.to_owned(),
                size: total,
                limit: MAX_DIR_BYTES,
            });
        }
        // Read at most the limit: a file that grows between the two steps is refused.
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut std::io::Read::take(fs::File::open(&path).map_err(read_err)?, MAX_FILE_BYTES + 1),
            &mut text,
        )
        .map_err(read_err)?;
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(ConfigError::FileTooLarge {
                path,
                size: text.len() as u64,
                limit: MAX_FILE_BYTES,
            });
        }
        load_text(&path, &text, &mut config, &mut seen)?;
    }
    Ok(config)
}

/// Refuses anchors and aliases before anything expands them: a few KB of aliases
/// can stand for gigabytes of objects. The event parser does not expand aliases.
fn refuse_anchors(path: &Path, text: &str) -> Result<(), ConfigError> {
    use yaml_rust2::parser::{Event, Parser};
    let mut parser = Parser::new_from_str(text);
    loop {
        let (event, mark) = match parser.next_token() {
            Ok(e) => e,
            // Malformed YAML is reported by the deserializer, with its own words.
            Err(_) => return Ok(()),
        };
        let what = match event {
            Event::StreamEnd => return Ok(()),
            Event::Alias(_) => Some("aliases"),
            Event::Scalar(_, _, anchor, _)
            | Event::SequenceStart(anchor, _)
            | Event::MappingStart(anchor, _)
                if anchor != 0 =>
            {
                Some("anchors")
            }
            _ => None,
        };
        if let Some(what) = what {
            return Err(ConfigError::Anchors {
                path: path.to_owned(),
                line: mark.line(),
                what,
            });
        }
    }
}

/// Parses one file's text into `config`. `seen` catches an object defined twice.
pub fn load_text(
    path: &Path,
    text: &str,
    config: &mut Config,
    seen: &mut HashMap<String, PathBuf>,
) -> Result<(), ConfigError> {
    refuse_anchors(path, text)?;
    for (index, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let document = index + 1;
        let value = Value::deserialize(doc).map_err(|e| ConfigError::Yaml {
            path: path.to_owned(),
            document,
            message: e.to_string(),
        })?;
        if value.is_null() {
            continue; // an empty document, e.g. a trailing `---`
        }
        let object_err = |object: String, source: FieldError| ConfigError::Object {
            path: path.to_owned(),
            object,
            source,
        };
        let api_version = value
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
        let label = describe(&value, kind, document);
        if api_version.is_empty() {
            return Err(object_err(
                label,
                FieldError::new("apiVersion", "is required"),
            ));
        }
        if kind.is_empty() {
            return Err(object_err(label, FieldError::new("kind", "is required")));
        }
        if !KNOWN.contains(&(api_version, kind)) {
            let known: Vec<String> = KNOWN.iter().map(|(a, k)| format!("{a}/{k}")).collect();
            return Err(object_err(
                label,
                FieldError::new(
                    "kind",
                    format!(
                        "{api_version}/{kind} is not supported; expected one of {}",
                        known.join(", ")
                    ),
                ),
            ));
        }
        let key = format!("{kind} {}", label_name(&value));
        if let Some(first) = seen.get(&key) {
            return Err(ConfigError::Duplicate {
                path: path.to_owned(),
                object: label,
                first: first.clone(),
            });
        }
        seen.insert(key, path.to_owned());

        let result = match kind {
            "Service" => typed(value)
                .and_then(|s| translate::service(&s))
                .map(|s| config.services.push(s)),
            "EndpointSlice" => typed(value)
                .and_then(|s| translate::endpoint_slice(&s))
                .map(|s| config.endpoint_slices.push(s)),
            "PeerAuthentication" => typed(value)
                .and_then(|p| istio::peer_authentication(&p))
                .map(|p| config.peer_authentications.push(p)),
            "AuthorizationPolicy" => typed(value)
                .and_then(|p| istio::authorization_policy(&p))
                .map(|p| config.authorization_policies.push(p)),
            "HTTPRoute" => typed(value)
                .and_then(|r| gateway::route(&r, RouteKind::Http))
                .map(|r| config.routes.push(r)),
            "GRPCRoute" => typed(value)
                .and_then(|r| gateway::route(&r, RouteKind::Grpc))
                .map(|r| config.routes.push(r)),
            "Pod" => typed(value)
                .and_then(|p| translate::pod(&p))
                .map(|p| config.pods.push(p)),
            // KNOWN was checked above; a kind added there must be added here.
            other => Err(FieldError::new(
                "kind",
                format!("{other} is known but has no translation (a bug)"),
            )),
        };
        result.map_err(|e| object_err(label, e))?;
    }
    Ok(())
}

/// Deserializes into a k8s-openapi type, reporting the path of the offending field.
fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." {
            "(object)".to_owned()
        } else {
            field
        };
        FieldError::new(field, e.into_inner().to_string())
    })
}

fn label_name(value: &Value) -> String {
    let meta = value.get("metadata");
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match meta.and_then(|m| m.get("name")).and_then(Value::as_str) {
        Some(name) => format!("{ns}/{name}"),
        None => format!("{ns}/(unnamed)"),
    }
}

/// `Service default/web`, or `document 3` when the object has no kind yet.
fn describe(value: &Value, kind: &str, document: usize) -> String {
    if kind.is_empty() {
        format!("document {document}")
    } else {
        format!("{kind} {}", label_name(value))
    }
}
