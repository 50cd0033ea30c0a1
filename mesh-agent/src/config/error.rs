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

    #[error("{}: {object} is defined twice (also in {})", path.display(), first.display())]
    Duplicate {
        path: PathBuf,
        object: String,
        first: PathBuf,
    },
}
