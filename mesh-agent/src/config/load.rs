//! Reading a config directory: every `*.yaml` / `*.yml` file, each holding one or more
//! YAML documents, each document one Kubernetes object. What was loaded before, and
//! which files to read again, is `files`' business.
use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use serde_yaml_ng::Value;

use super::{
    error::{ConfigError, FieldError},
    kind::Kind,
    model::NamespacedName,
    object::{Object, ObjectKey, translate},
};

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

/// Every object of the directory's files, or the first error (the directory source's
/// own way, from nothing loaded).
#[cfg(test)]
pub fn load_dir(dir: &Path) -> Result<Vec<Object>, ConfigError> {
    let mut files = super::files::DirFiles::default();
    files.refresh(dir)?;
    Ok(files.objects())
}

/// A config file's text, refused unread over [`MAX_FILE_BYTES`].
pub fn read_file(path: &Path) -> Result<String, ConfigError> {
    let read_err = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let size = fs::metadata(path).map_err(read_err)?.len();
    if size > MAX_FILE_BYTES {
        return Err(ConfigError::FileTooLarge {
            path: path.to_owned(),
            size,
            limit: MAX_FILE_BYTES,
        });
    }
    // Read at most the limit: a file that grows between the two steps is refused.
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(fs::File::open(path).map_err(read_err)?, MAX_FILE_BYTES + 1),
        &mut text,
    )
    .map_err(read_err)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(ConfigError::FileTooLarge {
            path: path.to_owned(),
            size: text.len() as u64,
            limit: MAX_FILE_BYTES,
        });
    }
    Ok(text)
}

/// Refuses anchors and aliases before anything expands them: a few KB of aliases
/// can stand for gigabytes of objects. The event parser does not expand aliases.
fn refuse_anchors(path: &Path, text: &str) -> Result<(), ConfigError> {
    use yaml_rust2::parser::{Event, Parser};
    // An anchor starts with `&` and an alias with `*`: text with neither has none, and
    // is spared a second parse.
    if !text.contains(['&', '*']) {
        return Ok(());
    }
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

/// Parses one file's text into `config` (for tests of what is built from config).
#[cfg(test)]
pub fn load_text(
    path: &Path,
    text: &str,
    config: &mut super::model::Config,
    seen: &mut HashMap<ObjectKey, PathBuf>,
) -> Result<(), ConfigError> {
    let mut objects = Vec::new();
    parse_text(path, text, &mut objects, seen)?;
    for o in objects {
        config.push(o);
    }
    config.resolve_enrollment(super::enrollment::Default::Enrolled);
    Ok(())
}

/// Parses one file's text into `objects`. `seen` catches an object defined twice.
pub fn parse_text(
    path: &Path,
    text: &str,
    objects: &mut Vec<Object>,
    seen: &mut HashMap<ObjectKey, PathBuf>,
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
        let Some(known) = Kind::of(api_version, kind) else {
            return Err(object_err(
                label,
                FieldError::new(
                    "kind",
                    format!(
                        "{api_version}/{kind} is not supported; expected one of {}",
                        Kind::accepted()
                    ),
                ),
            ));
        };
        let key = ObjectKey {
            kind: known,
            id: id_of(&value, known == Kind::Namespace),
        };
        let label = key.to_string();
        if let Some(first) = seen.get(&key) {
            return Err(ConfigError::Duplicate {
                path: path.to_owned(),
                object: label,
                first: first.clone(),
            });
        }
        seen.insert(key, path.to_owned());
        let object = translate(known, value).map_err(|e| object_err(label, e))?;
        objects.push(object);
    }
    Ok(())
}

/// The object's namespace/name as far as its metadata says (before translation
/// checks it), for duplicate detection and error labels. A cluster-scoped object has
/// no namespace.
fn id_of(value: &Value, cluster_scoped: bool) -> NamespacedName {
    let meta = value.get("metadata");
    let field = |f: &str| meta.and_then(|m| m.get(f)).and_then(Value::as_str);
    let namespace = if cluster_scoped {
        ""
    } else {
        field("namespace").unwrap_or("default")
    };
    NamespacedName {
        namespace: namespace.to_owned(),
        name: field("name").unwrap_or("(unnamed)").to_owned(),
    }
}

/// `Service default/web`, or `document 3` when the object has no kind yet.
fn describe(value: &Value, kind: &str, document: usize) -> String {
    if kind.is_empty() {
        format!("document {document}")
    } else {
        let id = id_of(value, false);
        format!("{kind} {}/{}", id.namespace, id.name)
    }
}
