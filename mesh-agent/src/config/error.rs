//! Config errors. Every error names the file; errors inside an object also name the
//! object (`Service default/web`) and the field (`spec.ports[0].port`), so an operator
//! can go straight to the line that is wrong.
use std::path::PathBuf;

/// A problem with one field of one object, before we know which file it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{}: document {document}: malformed YAML: {message}", path.display())]
    Yaml {
        path: PathBuf,
        document: usize,
        message: String,
    },

    #[error("{}: {object}: {source}", path.display())]
    Object {
        path: PathBuf,
        object: String,
        source: FieldError,
    },

    #[error("{}: {size} bytes, over the limit of {limit} per file", path.display())]
    FileTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },

    #[error("{}: the directory holds {size} bytes of config, over the limit of {limit}", path.display())]
    DirTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },

    #[error("{}: line {line}: YAML {what} are not accepted (Kubernetes objects never need them, and expanding them is a memory bomb)", path.display())]
    Anchors {
        path: PathBuf,
        line: usize,
        what: &'static str,
    },

    #[error("{}: {object} is defined twice (also in {})", path.display(), first.display())]
    Duplicate {
        path: PathBuf,
        object: String,
        first: PathBuf,
    },
}
